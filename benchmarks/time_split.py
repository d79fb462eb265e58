"""Where a toolkit's time goes: a console entry point run in-process under torch's profiler, its wall time
split into matrix products, fused RNN layer kernels, the other tensor operations and the time outside any
operation (Python, framework, I/O). One JSON line on stdout.

    python benchmarks/time_split.py ENTRY -- ARGS ...

ENTRY is ``module:function`` of a console script, called with ARGS as its command line, e.g. with
OpenNMT-py's venv ``onmt.bin.translate:main -- -model m.pt -src in -output out -beam_size 5 ...`` and with
mtkit's ``mtkit.cli:main -- translate -m ckpt.pt -i in -o out --beam 5 --batch-size 32``. Run each toolkit
with its own interpreter; the script needs only torch. The same operation classes are counted for both,
so the split compares like with like (``benchmarks/compare_rnn_peers.sh split`` runs both decoders).

The entry runs twice, so its command must be one that can: under the profiler for the split (this run also
pays the one-time costs: lazy imports, first-use set-ups), then unprofiled for ``wall_s`` (model loading
included). The profiler's own cost inflates the many small operations, so ``outside_ops`` (``wall_s`` less
the profiled operations) is an underestimate; the matrix-product seconds are the least affected. Self
times are those of the calling thread: an operation's intra-op threads are inside it. If either run
fails, only its exit status is printed, and the script exits 1.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

GEMM = {  # dense matrix products, whatever library runs them
    "aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::_int_mm",
    "mkldnn::_linear_pointwise", "aten::mkldnn_linear", "quantized::linear_dynamic",
}
RNN_KERNELS = {"aten::mkldnn_rnn_layer", "aten::mkldnn_rnn_layer_backward", "aten::_thnn_fused_lstm_cell",
               "aten::_thnn_fused_lstm_cell_backward_impl"}  # whole fused layers/cells (their products inside)


def split(events: list, wall: float) -> dict:
    """Seconds per class from the profiler's per-operation self times; ``wall`` is the unprofiled run's."""
    sums = {"gemm": 0.0, "rnn_kernels": 0.0, "other_ops": 0.0}
    top: dict[str, float] = {}
    for e in events:
        if "::" not in e.key or e.key.startswith("autograd::"):
            continue  # Python functions and autograd wrappers: their time is in their operations or outside
        sec = e.self_cpu_time_total / 1e6
        cls = "gemm" if e.key in GEMM else "rnn_kernels" if e.key in RNN_KERNELS else "other_ops"
        sums[cls] += sec
        if cls == "other_ops":
            top[e.key] = top.get(e.key, 0.0) + sec
    out = {k: round(v, 3) for k, v in sums.items()}
    out["outside_ops"] = round(wall - sum(sums.values()), 3)
    out["gemm_share"] = round(sums["gemm"] / wall, 3) if wall else None
    out["top_other_ops"] = {k: round(v, 3) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:8]}
    return out


def call(entry: Callable[[], object], argv: list[str]) -> object:
    """Run a console entry point with ``argv``; -> its exit status."""
    sys.argv = argv
    try:
        entry()
    except SystemExit as e:  # console entries (click) end with SystemExit
        return e.code or 0
    return 0


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[2] != "--" or ":" not in sys.argv[1]:
        sys.exit("usage: time_split.py module:function -- ARGS ...")
    module, _, func = sys.argv[1].partition(":")
    entry = getattr(importlib.import_module(module), func)
    args = sys.argv[3:]
    torch.set_num_threads(int(os.environ.get("THREADS", torch.get_num_threads())))
    argv = [module, *args]
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        status = call(entry, argv)
    profiled_wall = time.perf_counter() - start
    row = {"bench": "time_split", "entry": f"{module}:{func}", "args": args, "exit": status,
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    if not status:
        start = time.perf_counter()
        status = row["exit"] = call(entry, argv)
        wall = time.perf_counter() - start
        if not status:
            row.update(wall_s=round(wall, 3), profiled_wall_s=round(profiled_wall, 3),
                       **split(prof.key_averages(), wall))
    print(json.dumps(row), flush=True)
    if status:
        sys.exit(1)


if __name__ == "__main__":
    main()

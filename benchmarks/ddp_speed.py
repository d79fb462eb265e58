"""Data-parallel training throughput: N Gloo ranks (``mtkit train --nproc N``) versus one process.

Every run trains the same model on the same data with the same global batch per update
(``--max-tokens`` x ranks x update_freq), through the ``mtkit train`` command line:

- ``1 proc, T threads``: one process, update_freq N, ``--threads`` intra-op threads;
- ``1 proc, 1 thread``: the same on one thread (what one rank gets);
- ``N ranks``: ``--nproc N`` (torchrun on this machine), one thread per rank, update_freq 1.

Throughput is the target tokens per second of training steps that rank 0 logs in
``metrics.jsonl`` (tokens of the whole update over all ranks; validation and saving excluded),
over the log windows after the first (``--warmup`` updates). One JSON line per run on stdout.

    python benchmarks/ddp_speed.py [--data /path/to/multi30k] [--updates 20] [--nproc 2]

On a machine with fewer cores than ranks x threads the ranks compete for the CPU: the figure
then shows the cost of the all-reduce and of sharing, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import add_reference_args, reference_data  # noqa: E402  (the same reference data)


def run(data: Path, save: Path, config: str, overrides: list[str], nproc: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "mtkit", "-q", "train", str(data), "-c", config, "--save-dir", str(save),
           "--device", "cpu", *(["--nproc", str(nproc)] if nproc > 1 else [])]
    for item in overrides + [f"train.num_threads={threads}"]:
        cmd += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"run failed ({' '.join(cmd)}):\n{proc.stderr}")
    events = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
    rates = [e["tgt_tokens_per_s"] for e in events if e["kind"] == "train"][1:]  # drop the warmup window
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"tgt_tokens_per_s": round(statistics.mean(rates), 1), "windows": len(rates),
            "train_seconds": summary["train_seconds"], "wall_seconds": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_reference_args(ap)
    ap.add_argument("--nproc", type=int, default=2, help="ranks of the data-parallel run")
    ap.add_argument("--threads", type=int, default=2, help="threads of the multi-threaded single process")
    ap.add_argument("--max-tokens", type=int, default=2048, help="per rank and batch")
    ap.add_argument("--warmup", type=int, default=4, help="updates in the first (dropped) log window")
    ap.add_argument("--updates", type=int, default=20, help="timed updates (a multiple of --warmup)")
    args = ap.parse_args()

    cache = reference_data(args, workers=2)
    n, w = args.nproc, args.warmup
    base = [f"train.max_tokens={args.max_tokens}", f"train.max_updates={w + args.updates}", f"train.log_interval={w}",
            "train.validate_interval_updates=0", "train.save_interval_updates=0",
            *args.overrides]
    runs = [
        (f"1 proc, {args.threads} threads, update_freq {n}", 1, args.threads, [f"train.update_freq={n}"]),
        (f"1 proc, 1 thread, update_freq {n}", 1, 1, [f"train.update_freq={n}"]),
        (f"{n} ranks (gloo), 1 thread each, update_freq 1", n, 1, ["train.update_freq=1"]),
    ]
    rows = []
    for name, nproc, threads, extra in runs:
        with tempfile.TemporaryDirectory() as tmp:
            # no valid split needed: the data dir's valid set is only read at the end (one validation)
            r = run(cache, Path(tmp) / "ck", args.config, base + extra + ["train.valid_bleu=false"], nproc, threads)
        row = {"benchmark": "ddp_speed", "run": name, "ranks": nproc, "threads": threads, "config": args.config,
               "global_tokens_per_update": args.max_tokens * n, **r, "loadavg_1m": round(os.getloadavg()[0], 2)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"{'run':<46} {'tgt tok/s':>10}", file=sys.stderr)
    for row in rows:
        print(f"{row['run']:<46} {row['tgt_tokens_per_s']:>10}", file=sys.stderr)


if __name__ == "__main__":
    main()

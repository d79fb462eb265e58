"""Peak memory of `mtkit average` on large dummy checkpoints.

Writes N checkpoints of about SIZE MB of float32 weights each, then measures, each in a fresh
process, the peak resident memory (VmHWM, reset after the imports) of loading one checkpoint
and of averaging all N. Averaging keeps one checkpoint plus a float32 running
sum in memory, so its peak above the imports should be about 2 checkpoint sizes, whatever N is.

    python benchmarks/average_memory.py                # 10 x 200 MB
    python benchmarks/average_memory.py --num 4 --mb 50 --optimizer
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch
from mtkit.average import average_checkpoints
from mtkit.checkpoint import load_checkpoint

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key + ":"))

mode, args = sys.argv[1], sys.argv[2:]
try:  # reset the peak (VmHWM) to the current RSS, so import-time transients do not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
base = status("VmRSS")
t = time.perf_counter()
if mode == "load":
    payload = load_checkpoint(args[0])
elif mode == "average":
    average_checkpoints(args[:-1], args[-1])
print(json.dumps({"base_mb": base, "peak_mb": status("VmHWM"), "seconds": time.perf_counter() - t}))
"""


def measure(mode: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_checkpoints(directory: Path, num: int, mb: float, optimizer: bool) -> list[Path]:
    import torch

    from mtkit.checkpoint import build_payload, save_checkpoint
    from mtkit.config import Config

    per_tensor = 1 << 20  # 4 MB float32 tensors
    n_tensors = max(1, round(mb * (1 << 20) / (4 * per_tensor)))
    paths = []
    for i in range(num):
        g = torch.Generator().manual_seed(i)
        state = {f"layer{j}.weight": torch.randn(1024, per_tensor // 1024, generator=g) for j in range(n_tensors)}
        state["steps"] = torch.tensor(i)
        payload = build_payload(
            Config().to_dict(),
            state,
            spm={"src": b"spm", "tgt": b"spm"},
            vocab={"src_size": 8, "tgt_size": 8, "pad": 0, "bos": 2, "eos": 3, "unk": 1, "joint": True},
            update=(i + 1) * 1000,
        )
        if optimizer:  # Adam keeps two moments per weight: a training checkpoint is ~3x the weights
            payload["optimizer"] = {"state": {j: {"exp_avg": torch.zeros_like(v), "exp_avg_sq": torch.zeros_like(v)} for j, v in enumerate(state.values()) if v.is_floating_point()}}
        path = directory / f"checkpoint_{(i + 1) * 1000}.pt"
        save_checkpoint(path, payload)
        paths.append(path)
        del state, payload
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=10, help="checkpoints to average")
    parser.add_argument("--mb", type=float, default=200, help="float32 weights per checkpoint, MB")
    parser.add_argument("--optimizer", action="store_true", help="include Adam state (like training checkpoints)")
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        paths = make_checkpoints(tmp, args.num, args.mb, args.optimizer)
        size_mb = paths[0].stat().st_size / (1 << 20)
        weights_mb = sum(4 * (1 << 20) for _ in range(max(1, round(args.mb / 4)))) / (1 << 20)
        print(f"wrote {args.num} checkpoints of {size_mb:.0f} MB in {time.perf_counter() - t:.1f} s", file=sys.stderr)

        one = measure("load", str(paths[0]))
        avg = measure("average", *map(str, paths), str(tmp / "avg.pt"))
        one_mb, avg_mb = one["peak_mb"] - one["base_mb"], avg["peak_mb"] - avg["base_mb"]
        result = {
            "checkpoints": args.num,
            "checkpoint_mb": round(size_mb, 1),
            "weights_mb": round(weights_mb, 1),
            # peak memory above the interpreter + torch + mtkit, in MB
            "load_one_mb": round(one_mb, 1),
            "average_mb": round(avg_mb, 1),
            "average_seconds": round(avg["seconds"], 1),
            "average_over_checkpoint": round(avg_mb / size_mb, 2),
            "average_over_load_one": round(avg_mb / one_mb, 2),
            "average_over_all_inputs": round(avg_mb / (size_mb * args.num), 3),
        }
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

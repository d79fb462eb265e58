"""Operations per target position in one training step of each recurrent family: JSON lines.

A recurrent decoder that loops over target positions in Python launches its per-step operations
once per position; on a GPU each launch costs microseconds whatever the arithmetic, so the count
of operations that grow with the target length decides training speed there. This script runs
one forward + backward of each ``*_small`` preset (plus Luong without input feeding) on a random
batch at two target lengths under the PyTorch profiler and prints the operator count per extra
target position: ``(ops(T2) - ops(T1)) / (T2 - T1)``, i.e. the loop's cost, independent of what
runs once per batch. Counts are of every ``aten::`` operator the profiler records (nested ones
included), forward and backward together. No data or timing is involved, so it can run anywhere.

    python benchmarks/rnn_ops.py [--batch 32] [--src 20] [--lengths 10 30]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from mtkit.config import load_config
from mtkit.models import build_model

VOCAB, PAD = 8000, 0
SETUPS = [
    ("lstm_small", []),
    ("bahdanau_small", []),
    ("luong_small", []),
    ("luong_small", ["model.input_feed=false"]),
    ("gnmt_small", []),
]


def count_ops(model: torch.nn.Module, batch: int, src_len: int, tgt_len: int) -> int:
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, VOCAB, (batch, src_len), generator=g)
    lengths = torch.full((batch,), src_len)
    tgt = torch.randint(4, VOCAB, (batch, tgt_len), generator=g)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(src, lengths, tgt).float().logsumexp(-1).sum().backward()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--src", type=int, default=20)
    ap.add_argument("--lengths", type=int, nargs=2, default=[10, 30])
    args = ap.parse_args()
    torch.set_num_threads(1)
    t1, t2 = args.lengths
    for preset, overrides in SETUPS:
        try:
            cfg = load_config(preset, overrides)
        except Exception as exc:  # an older checkout may lack a key
            print(json.dumps({"preset": preset, "overrides": overrides, "error": str(exc)}))
            continue
        torch.manual_seed(0)
        model = build_model(cfg.model, VOCAB, VOCAB, PAD).train()
        n1, n2 = (count_ops(model, args.batch, args.src, t) for t in (t1, t2))
        print(json.dumps({
            "benchmark": "rnn_ops", "preset": preset, "overrides": overrides, "ops_per_position": (n2 - n1) / (t2 - t1),
            f"ops_at_T{t1}": n1, f"ops_at_T{t2}": n2,
        }))


if __name__ == "__main__":
    main()

"""Training throughput of mtkit on the reference setup: one JSON line on stdout.

Reference setup (the one the peer toolkits were measured with): Multi30k En->De, joint
SentencePiece BPE 8k, Transformer 3+3 layers, d_model 256, 4 heads, FFN 1024, dropout 0.1,
label smoothing 0.1, pre-norm, tied embeddings (the ``transformer_small`` preset), ~4096-token
batches, Adam(0.9, 0.98) with inverse-sqrt warmup, 2 threads. The preset runs each batch's
forward/backward in passes of at most 2048 tokens (``train.pass_tokens``: the same update with
half the activation memory); ``--set train.pass_tokens=0`` runs whole batches.

    python benchmarks/train_speed.py [--data /path/to/multi30k] [--updates 60] [--threads 2]

The corpus is preprocessed once into a cache directory (``--cache``). After ``--warmup`` updates,
``--updates`` updates are timed (or until ``--minutes``): target tokens/s counts non-pad target
tokens including EOS, per wall-clock second of training steps. Peak RSS is the process maximum.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from mtkit.utils import limit_onednn_caches

limit_onednn_caches()  # as `mtkit train` does, before the first oneDNN matmul
from mtkit.config import load_config  # noqa: E402
from mtkit.training.trainer import Trainer, load_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def add_reference_args(ap: argparse.ArgumentParser) -> None:
    """The options every training benchmark shares: the data, its cache, the model config."""
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "multi30k"), help="raw Multi30k dir")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "mtkit" / "bench" / "multi30k_en_de_bpe8k"))
    ap.add_argument("--config", default="transformer_small")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")


def reference_data(args: argparse.Namespace, workers: int) -> Path:
    """The preprocessed reference data (joint BPE 8k on Multi30k en-de), made once into ``--cache``."""
    cache = Path(args.cache)
    if not (cache / "manifest.json").exists():
        from mtkit.data.preprocess import preprocess

        print(f"preprocessing {args.data} into {cache} ...", file=sys.stderr)
        preprocess("en", "de", f"{args.data}/train", str(cache), valid_prefix=f"{args.data}/val", vocab_size=8000,
                   joint=True, workers=workers, force=True)
    return cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_reference_args(ap)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=5, help="untimed updates first")
    ap.add_argument("--updates", type=int, default=60, help="timed updates")
    ap.add_argument("--minutes", type=float, default=0.0, help="stop timing after this long (0: no limit)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cache = reference_data(args, workers=args.threads)
    cfg = load_config(args.config, [
        f"train.max_tokens={args.max_tokens}", f"train.num_threads={args.threads}", "train.validate_interval_updates=0",
        "train.save_interval_updates=0", *args.overrides,
    ])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(load_data(cache), cfg, tmp, device="cpu")

        def batches():
            while True:
                chunk = []
                while len(chunk) < cfg.train.update_freq:
                    b = trainer.batches.next_batch()
                    if b is None:
                        trainer.batches.next_epoch()
                        continue
                    chunk.append(b)
                yield chunk

        it = batches()
        for _ in range(args.warmup):
            trainer.train_step(next(it))
        load_before = os.getloadavg()[0]
        tokens = done = 0
        start, cpu_start = time.perf_counter(), time.process_time()
        while done < args.updates and not (args.minutes and time.perf_counter() - start > args.minutes * 60):
            stats = trainer.train_step(next(it))
            if stats is not None:
                tokens += stats["ntok"]
            done += 1
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    result = {
        "benchmark": "train_speed", "config": args.config, "threads": args.threads, "max_tokens": args.max_tokens,
        "updates": done, "tgt_tokens": tokens, "seconds": round(wall, 2),
        "tgt_tokens_per_s": round(tokens / wall, 1), "s_per_update": round(wall / max(done, 1), 3),
        "tgt_tokens_per_update": round(tokens / max(done, 1), 1),
        "cpu_s_per_update": round(cpu / max(done, 1), 3), "peak_rss_gib": round(rss_gib, 3),
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)], "torch": torch.__version__,
    }
    print(json.dumps(result))
    print(
        f"{'tgt tok/s':>10} {'s/update':>9} {'tok/update':>10} {'peak RSS':>9}\n"
        f"{result['tgt_tokens_per_s']:>10} {result['s_per_update']:>9} {result['tgt_tokens_per_update']:>10} "
        f"{result['peak_rss_gib']:>7.2f}G  (load {result['loadavg_1m']})",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()

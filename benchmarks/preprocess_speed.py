"""Preprocess throughput (sentence pairs/s) and peak memory on Multi30k and a synthetic corpus.

Each case runs ``mtkit.data.preprocess.preprocess`` (joint BPE) in a fresh process so that the
peak RSS (``resource.getrusage``) belongs to that case alone: the main process and, separately,
the largest of its encoding workers. Prints one JSON line, then a small table.

    python benchmarks/preprocess_speed.py                  # multi30k + 1M synthetic pairs
    python benchmarks/preprocess_speed.py --pairs 100000   # a smaller synthetic corpus
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MULTI30K = Path(os.environ.get("MTKIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"))


def make_synthetic(prefix: Path, pairs: int, seed: int = 0) -> None:
    """Zipf-distributed pseudo-words; the target maps each word and swaps neighbours."""
    rng = np.random.default_rng(seed)
    syllables = np.array(
        ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "ol", "an", "es"]
    )
    n_words = 30_000
    parts = rng.integers(0, len(syllables), size=(n_words, 4))
    sizes = rng.integers(1, 5, size=n_words)
    src_vocab = np.array(["".join(syllables[p[:k]]) for p, k in zip(parts, sizes)])
    tgt_vocab = np.array([w[::-1] + "n" for w in src_vocab])
    chunk = 50_000
    with (
        open(f"{prefix}.src", "w", encoding="utf-8") as fs,
        open(f"{prefix}.tgt", "w", encoding="utf-8") as ft,
    ):
        for start in range(0, pairs, chunk):
            n = min(chunk, pairs - start)
            lens = rng.integers(4, 31, size=n)
            ids = np.minimum(rng.zipf(1.2, size=int(lens.sum())) - 1, n_words - 1)
            ends = np.cumsum(lens)
            src_lines, tgt_lines = [], []
            for end, k in zip(ends, lens):
                sent = ids[end - k : end]
                src_lines.append(" ".join(src_vocab[sent]))
                t = tgt_vocab[sent]
                t[0::2][: len(t[1::2])], t[1::2] = t[1::2], t[0::2][: len(t[1::2])].copy()
                tgt_lines.append(" ".join(t))
            fs.write("\n".join(src_lines) + "\n")
            ft.write("\n".join(tgt_lines) + "\n")


def _case(kwargs: dict[str, Any], queue: Any) -> None:
    from mtkit.data.preprocess import preprocess

    start = time.monotonic()
    manifest = preprocess(**kwargs)
    wall = time.monotonic() - start
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    queue.put(
        {
            "manifest": manifest,
            "wall": wall,
            "rss_main_mb": self_kb / 1024,
            "rss_worker_mb": child_kb / 1024,
        }
    )


def run_case(name: str, **kwargs: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_case, args=(kwargs, queue))
    proc.start()
    result = queue.get()
    proc.join()
    m = result["manifest"]
    pairs = m["filters"]["input_pairs"]
    return {
        "case": name,
        "pairs": pairs,
        "kept": m["splits"]["train"]["pairs"],
        "tokens": m["splits"]["train"]["src_tokens"] + m["splits"]["train"]["tgt_tokens"],
        "seconds": round(result["wall"], 2),
        "spm_seconds": m["seconds"]["spm"],
        "encode_seconds": m["seconds"]["encode"],
        "pairs_per_s": round(pairs / result["wall"]),
        "encode_pairs_per_s": round(pairs / max(m["seconds"]["encode"], 1e-9)),
        "peak_rss_main_mb": round(result["rss_main_mb"], 1),
        "peak_rss_worker_mb": round(result["rss_worker_mb"], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=1_000_000, help="synthetic corpus size (0: skip)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=8000)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="mtkit-bench-") as tmp:
        tmp_path = Path(tmp)
        common = {"vocab_size": args.vocab_size, "workers": args.workers, "dedup": True}
        if (MULTI30K / "train.en.gz").exists():
            results.append(
                run_case(
                    "multi30k",
                    src_lang="en",
                    tgt_lang="de",
                    train_prefix=MULTI30K / "train",
                    valid_prefix=MULTI30K / "val",
                    test_prefixes=[MULTI30K / "test_2016_flickr"],
                    out_dir=tmp_path / "m30k",
                    **common,
                )
            )
        if args.pairs:
            start = time.monotonic()
            make_synthetic(tmp_path / "synth", args.pairs)
            gen = time.monotonic() - start
            size_mb = (
                sum(os.path.getsize(f"{tmp_path / 'synth'}.{x}") for x in ("src", "tgt")) / 2**20
            )
            res = run_case(
                f"synthetic_{args.pairs}",
                src_lang="src",
                tgt_lang="tgt",
                train_prefix=tmp_path / "synth",
                out_dir=tmp_path / "synth_out",
                **common,
            )
            res["input_mb"] = round(size_mb, 1)
            res["generate_seconds"] = round(gen, 1)
            results.append(res)
    env = {"python": platform.python_version(), "cpus": os.cpu_count(), "workers": args.workers}
    print(json.dumps({"benchmark": "preprocess_speed", "env": env, "results": results}))
    cols = [
        "case",
        "pairs",
        "seconds",
        "spm_seconds",
        "encode_seconds",
        "pairs_per_s",
        "encode_pairs_per_s",
        "peak_rss_main_mb",
        "peak_rss_worker_mb",
    ]
    widths = [max(len(c), *(len(str(r[c])) for r in results)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)), file=sys.stdout)
    for r in results:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)))


if __name__ == "__main__":
    main()

"""Peak memory of `mtkit translate` and `mtkit score` on large synthetic files.

Builds a tiny untrained Transformer checkpoint and synthetic input files of each size given by
``--lines`` (default 100k and 1M), then runs, each in a fresh process, ``mtkit translate``
(greedy, at most ``--max-len`` output pieces, so the figure is about streaming, not search)
and ``mtkit score`` (BLEU and chrF of the output against the input). Reports wall time,
lines/s and the peak resident memory (ru_maxrss) of each process. Translation streams through
fixed-size input buffers, so its peak should not grow with the number of lines; ``score`` reads
its files into memory (sacrebleu scores whole corpora), so its peak grows with them.

    python benchmarks/translate_memory.py                       # 100k and 1M lines on CPU
    python benchmarks/translate_memory.py --lines 20000 200000 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("a man woman dog is are riding walking on the in bike street park red blue small big two "
         "people child girl boy sitting standing near water grass young old white black").split()


def make_checkpoint(directory: Path) -> Path:
    import torch

    from mtkit.checkpoint import build_payload, save_checkpoint, subword_entries
    from mtkit.config import load_config
    from mtkit.data.subword import train_sentencepiece
    from mtkit.models import build_model

    rng = random.Random(0)
    spm = train_sentencepiece((" ".join(rng.choices(WORDS, k=8)) for _ in range(2000)), vocab_size=120)
    cfg = load_config("transformer_tiny", ["model.d_model=16", "model.ffn_dim=32", "model.heads=2",
                                           "model.encoder_layers=1", "model.decoder_layers=1"])
    torch.manual_seed(0)
    model = build_model(cfg.model, spm.size, spm.size, spm.pad)
    path = directory / "tiny.pt"
    save_checkpoint(path, build_payload(cfg.to_dict(), model.state_dict(), **subword_entries(spm, spm)))
    return path


def make_input(path: Path, lines: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(lines):
            f.write("" if i % 101 == 0 else " ".join(rng.choices(WORDS, k=rng.randint(1, 20))))
            f.write("\n")


def run(args: list[str], stdout=subprocess.DEVNULL) -> dict:
    """Run ``python -m mtkit ARGS``; wall time and peak RSS (MB) of that process."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mtkit", "-q", *args], stdout=stdout,
                            stderr=subprocess.PIPE, env=env)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"mtkit {' '.join(args[:1])} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--max-len", type=int, default=2, help="output pieces per sentence (max_len_b)")
    parser.add_argument("--dir", default=None, help="where to write the files (default: a temp dir)")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        ckpt = make_checkpoint(tmp)
        for n in args.lines:
            inp, out = tmp / f"in.{n}.txt", tmp / f"out.{n}.txt"
            make_input(inp, n)
            tr = run(["translate", "-m", str(ckpt), "-i", str(inp), "-o", str(out), "--device", args.device,
                      "--beam", "1", "--max-len-a", "0", "--max-len-b", str(args.max_len),
                      "--batch-size", str(args.batch_size)])
            got = count_lines(out)
            if got != n:
                sys.exit(f"translate wrote {got} lines for {n} input lines")
            with open(tmp / "score.json", "wb") as f:
                sc = run(["score", "-r", str(inp), "-i", str(out), "-m", "bleu", "chrf", "-f", "json"], stdout=f)
            scores = json.loads((tmp / "score.json").read_text())
            results.append({
                "lines": n,
                "input_mb": round(inp.stat().st_size / (1 << 20), 1),
                "translate_seconds": tr["seconds"],
                "translate_lines_per_s": round(n / tr["seconds"]),
                "translate_peak_rss_mb": tr["peak_rss_mb"],
                "score_seconds": sc["seconds"],
                "score_peak_rss_mb": sc["peak_rss_mb"],
                "scores": {s["name"]: s["score"] for s in scores},
            })
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            inp.unlink()
            out.unlink()
    print(json.dumps({"device": args.device, "batch_size": args.batch_size, "runs": results}, indent=1))


if __name__ == "__main__":
    main()

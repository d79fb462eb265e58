"""mtkit vs CTranslate2 running the same mtkit model (exported): speed, BLEU and agreement.

    python benchmarks/ct2_vs_mtkit.py [CKPT] [--threads 2] [--lines 1000] [--workdir DIR]

Exports CKPT with `mtkit export --format ctranslate2` (float32 and int8), then translates
Multi30k test_2016_flickr.en with greedy and beam 5 search, batches of 32 sentences, on
``--threads`` threads (torch.set_num_threads / CTranslate2 intra_threads), each setting in its
own process. Settings are the same on both sides: the checkpoint's max length (a * src + b),
length normalisation by |Y| (mtkit ``average`` = CTranslate2 ``length_penalty=1``), mtkit's
default ``stopping=full`` (CTranslate2 4.8 ends a sentence's search the same way), pad/BOS never
generated. Figures: sentences/s and target pieces/s (EOS excluded; translation time incl.
sentencepiece, model loading excluded), sacreBLEU against test_2016_flickr.de, the share of
lines identical to mtkit's, and the ratio mtkit / CTranslate2 of pieces/s. One JSON line per
setting, then a table.

Without CKPT a random-weight checkpoint of the reference configuration (Transformer 3+3,
d_model 256, 4 heads, FFN 1024, tied embeddings, joint 8k BPE on Multi30k) is built and the
figures say so: random weights run to the length limit, so only speed is meaningful.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_speed import random_checkpoint  # noqa: E402  (the same random reference model)

DATA = Path(os.environ.get("MTKIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"))  # the multi30k files
TEST_SRC = DATA / "test_2016_flickr.en.gz"
TEST_REF = DATA / "test_2016_flickr.de.gz"
SEARCHES = {"greedy": 1, "beam5": 5}
ENGINES = ("mtkit", "ct2-float32", "ct2-int8")
LENGTH_PENALTY = "average"


def read_lines(path: Path, n: int) -> list[str]:
    from mtkit.data.text import iter_lines

    out = []
    for line in iter_lines(path):
        if len(out) >= n:
            break
        out.append(line)
    return out


def run_one(engine: str, search: str, ckpt: str, export_dir: str, lines: int, threads: int, out_path: str) -> dict:
    """One setting in this process: translate, write hypotheses to ``out_path``, return figures."""
    beam = SEARCHES[search]
    src = read_lines(TEST_SRC, lines)
    if engine == "mtkit":
        import torch

        from mtkit.decoding.translate import translate_file

        torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory() as tmp:
            inp = Path(tmp) / "in.en"
            inp.write_text("\n".join(src) + "\n", encoding="utf-8")
            stats = translate_file([ckpt], inp, out_path, device="cpu", batch_size=32, buffer_lines=lines + 1,
                                   decode_overrides={"beam": beam, "nbest": 1, "length_penalty": LENGTH_PENALTY})
        seconds, pieces = stats["seconds"], stats["tgt_tokens"]
    else:
        import dataclasses

        from mtkit.decoding.ct2_engine import CT2Engine

        eng = CT2Engine.load(export_dir, device="cpu", intra_threads=threads)
        cfg = dataclasses.replace(eng.cfg, beam=beam, nbest=1, length_penalty=LENGTH_PENALTY)
        t0 = time.monotonic()
        src_pieces = [eng.src_spm.encode_pieces([s])[0] if s.strip() else [] for s in src]
        hyps = eng.translate_pieces(src_pieces, cfg, batch_size=32)
        text = [eng.tgt_spm.decode_pieces([h])[0] if h else "" for h in hyps]
        seconds = time.monotonic() - t0
        pieces = sum(len(h) for h in hyps)
        Path(out_path).write_text("\n".join(text) + "\n", encoding="utf-8")
    n = sum(1 for s in src if s.strip())
    return {
        "sentences": n,
        "tgt_pieces": pieces,
        "translate_s": round(seconds, 3),
        "sentences_per_s": round(n / seconds, 2),
        "tgt_pieces_per_s": round(pieces / seconds, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def bleu(hyp_path: Path, lines: int) -> float:
    import sacrebleu

    hyps = hyp_path.read_text(encoding="utf-8").split("\n")[:lines]
    return round(sacrebleu.corpus_bleu(hyps, [read_lines(TEST_REF, lines)]).score, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", help="mtkit Transformer checkpoint (default: a random-weight reference model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lines", type=int, default=1000)
    ap.add_argument("--workdir", default=None, help="where exports and outputs go (default: a temp dir)")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: ENGINE:SEARCH:EXPORT:OUT
    args = ap.parse_args()

    if args.only:
        engine, search, export_dir, out = args.only.split(":")
        print(json.dumps(run_one(engine, search, args.checkpoint, export_dir, args.lines, args.threads, out)))
        return

    from mtkit.export import export_ctranslate2

    work = Path(args.workdir or tempfile.mkdtemp(prefix="mtkit-ct2-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    random_weights = args.checkpoint is None
    ckpt = args.checkpoint or str(work / "random.pt")
    if random_weights and not Path(ckpt).exists():
        print("no checkpoint given: building a RANDOM-WEIGHT reference Transformer (speed figures only)",
              file=sys.stderr)
        random_checkpoint(Path(ckpt))
    exports = {}
    for q in ("float32", "int8"):
        t0 = time.monotonic()
        export_ctranslate2(ckpt, work / f"ct2-{q}", quantization=None if q == "float32" else q, force=True)
        exports[f"ct2-{q}"] = str(work / f"ct2-{q}")
        print(f"exported {q} in {time.monotonic() - t0:.1f} s", file=sys.stderr)

    rows = []
    for search in SEARCHES:
        for engine in ENGINES:
            out = work / f"{engine}.{search}.de"
            cmd = [sys.executable, __file__, ckpt, "--only", f"{engine}:{search}:{exports.get(engine, '-')}:{out}",
                   "--threads", str(args.threads), "--lines", str(args.lines)]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                print(res.stderr, file=sys.stderr)
                raise SystemExit(f"setting {engine}:{search} failed")
            fig = json.loads(res.stdout.strip().splitlines()[-1])
            row = {"bench": "ct2_vs_mtkit", "engine": engine, "search": search, "batch": 32, "threads": args.threads,
                   "length_penalty": LENGTH_PENALTY, "checkpoint": ckpt, "random_weights": random_weights, **fig,
                   "bleu": bleu(out, args.lines)}
            if engine != "mtkit":
                ours = (work / f"mtkit.{search}.de").read_text(encoding="utf-8").split("\n")[: fig["sentences"]]
                theirs = out.read_text(encoding="utf-8").split("\n")[: fig["sentences"]]
                row["same_as_mtkit"] = round(sum(a == b for a, b in zip(ours, theirs)) / max(len(ours), 1), 4)
                base = next(r for r in rows if r["engine"] == "mtkit" and r["search"] == search)
                row["ratio_mtkit_over_ct2"] = round(base["tgt_pieces_per_s"] / row["tgt_pieces_per_s"], 3)
                row["bleu_diff_vs_mtkit"] = round(row["bleu"] - base["bleu"], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)

    print(f"\n{'engine':<12} {'search':<7} {'sent/s':>8} {'pieces/s':>9} {'pieces':>7} {'BLEU':>6} "
          f"{'same':>6} {'mtkit/ct2':>9} {'RSS MiB':>8}")
    for r in rows:
        same = f"{r['same_as_mtkit']:.3f}" if "same_as_mtkit" in r else "-"
        ratio = f"{r['ratio_mtkit_over_ct2']:.2f}" if "ratio_mtkit_over_ct2" in r else "-"
        print(f"{r['engine']:<12} {r['search']:<7} {r['sentences_per_s']:>8.1f} {r['tgt_pieces_per_s']:>9.1f} "
              f"{r['tgt_pieces']:>7d} {r['bleu']:>6.2f} {same:>6} {ratio:>9} {r['peak_rss_mib']:>8.1f}")
    if random_weights:
        print("(random weights: outputs run to the length limit and BLEU is ~0; speed figures only)")


if __name__ == "__main__":
    main()

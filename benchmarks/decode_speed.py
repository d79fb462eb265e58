"""Decoding speed: Multi30k test_2016_flickr.en (1000 sentences) with greedy and beam 5,
batches of 32 sentences and by-token batches, on 2 threads.

    python benchmarks/decode_speed.py CKPT [--threads 2] [--max-tokens 2000] [--lines 1000] \
        [--decode stopping=first ...] [--dtype bfloat16]

Each setting runs in its own process (so peak RSS is that setting's) and prints one JSON line:
sentences/s, target pieces/s (hypothesis pieces, EOS excluded; translation time only, model
loading excluded), sacreBLEU against test_2016_flickr.de, peak RSS; a table follows.
``--decode KEY=VALUE`` overrides the checkpoint's decode settings (e.g. ``stopping=first``);
``--dtype bfloat16`` decodes with bf16 weights (``translate --dtype``). Without CKPT a
random-weight checkpoint of the reference configuration (Transformer 3+3, d_model 256, 4 heads,
FFN 1024, joint 8k BPE on Multi30k) is built and the figures say so: random weights always run
to the length limit, so only pieces/s is comparable with a trained model.
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

import yaml

DATA = Path(os.environ.get("MTKIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"))  # the multi30k files
TEST = DATA / "test_2016_flickr.en.gz"
REF = DATA / "test_2016_flickr.de.gz"
SETTINGS = [
    ("greedy", 1, "batch32"),
    ("greedy", 1, "tokens"),
    ("beam5", 5, "batch32"),
    ("beam5", 5, "tokens"),
]


def random_checkpoint(path: Path) -> None:
    """A random-weight reference-size Transformer with a joint 8k BPE model of Multi30k."""
    import itertools

    import torch

    from mtkit.checkpoint import build_payload, save_checkpoint, subword_entries
    from mtkit.config import load_config
    from mtkit.data.subword import train_sentencepiece
    from mtkit.data.text import iter_lines
    from mtkit.models import build_model

    train = DATA
    text = itertools.chain(iter_lines(train / "train.en.gz"), iter_lines(train / "train.de.gz"))
    spm = train_sentencepiece(text, vocab_size=8000)
    overrides = [
        "model.arch=transformer", "model.d_model=256", "model.heads=4", "model.encoder_layers=3",
        "model.decoder_layers=3", "model.ffn_dim=1024", "model.tie_embeddings=true",
    ]
    cfg = load_config("transformer_small", overrides)
    torch.manual_seed(1)
    model = build_model(cfg.model, spm.size, spm.size, spm.pad)
    save_checkpoint(path, build_payload(cfg.to_dict(), model.state_dict(), **subword_entries(spm, spm)))


def run_one(ckpt: str, beam: int, batching: str, threads: int, max_tokens: int, lines: int, device: str,
            decode: dict, dtype: str = "float32") -> dict:
    import sacrebleu
    import torch

    from mtkit.data.text import iter_lines
    from mtkit.decoding.translate import translate_file

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.en"
        with open(src, "w", encoding="utf-8") as f:
            for i, line in enumerate(iter_lines(TEST)):
                if i >= lines:
                    break
                f.write(line + "\n")
        size = {"batch_size": 32} if batching == "batch32" else {"max_tokens": max_tokens}
        t0 = time.monotonic()
        stats = translate_file([ckpt], src, Path(tmp) / "out", device=device, buffer_lines=lines, dtype=dtype,
                               decode_overrides={**decode, "beam": beam, "nbest": 1}, **size)
        wall = time.monotonic() - t0
        hyps = (Path(tmp) / "out").read_text(encoding="utf-8").split("\n")[:lines]
        refs = [line for _, line in zip(range(len(hyps)), iter_lines(REF))]
        bleu = sacrebleu.corpus_bleu(hyps, [refs]).score
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "sentences": stats["translated"],
        "tgt_pieces": stats["tgt_tokens"],
        "translate_s": stats["seconds"],
        "wall_s_incl_load": round(wall, 3),
        "sentences_per_s": stats["sentences_per_s"],
        "tgt_pieces_per_s": stats["tgt_tokens_per_s"],
        "peak_rss_mib": round(rss_mib, 1),
        "batches": stats["batches"],
        "bleu": round(bleu, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", help="mtkit checkpoint (default: a random-weight reference model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=2000, help="source tokens per by-token batch")
    ap.add_argument("--lines", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--decode", action="append", default=[], metavar="KEY=VALUE",
                    help="decode setting over the checkpoint's (repeatable), e.g. stopping=first")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (translate --dtype)")
    ap.add_argument("--only", default=None, help="run one setting, e.g. beam5:tokens (internal)")
    args = ap.parse_args()

    decode = {}
    for kv in args.decode:
        key, _, value = kv.partition("=")
        decode[key] = yaml.safe_load(value)
    if args.only:
        name, batching = args.only.split(":")
        beam = dict((s[0], s[1]) for s in SETTINGS)[name]
        print(json.dumps(run_one(args.checkpoint, beam, batching, args.threads, args.max_tokens, args.lines, args.device,
                                 decode, args.dtype)))
        return

    random_weights = args.checkpoint is None
    tmpdir = tempfile.mkdtemp(prefix="mtkit-bench-")
    ckpt = args.checkpoint or str(Path(tmpdir) / "random.pt")
    if random_weights:
        print("no checkpoint given: building a RANDOM-WEIGHT reference Transformer (figures are for speed only)",
              file=sys.stderr)
        random_checkpoint(Path(ckpt))
    rows = []
    for name, _, batching in SETTINGS:
        cmd = [sys.executable, __file__, ckpt, "--only", f"{name}:{batching}", "--threads", str(args.threads),
               "--max-tokens", str(args.max_tokens), "--lines", str(args.lines), "--device", args.device,
               "--dtype", args.dtype, *[f"--decode={kv}" for kv in args.decode]]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            raise SystemExit(f"setting {name}:{batching} failed")
        fig = json.loads(res.stdout.strip().splitlines()[-1])
        batch_desc = "32 sentences" if batching == "batch32" else f"{args.max_tokens} src tokens"
        row = {"bench": "decode_speed", "search": name, "batch": batch_desc, "threads": args.threads,
               "device": args.device, "dtype": args.dtype, "checkpoint": ckpt, "random_weights": random_weights, "decode": decode, **fig}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{'search':<8} {'batch':<18} {'sent/s':>8} {'pieces/s':>9} {'pieces':>7} {'time s':>7} {'peak RSS MiB':>13} {'BLEU':>6}")
    for r in rows:
        print(f"{r['search']:<8} {r['batch']:<18} {r['sentences_per_s']:>8.1f} {r['tgt_pieces_per_s']:>9.1f} "
              f"{r['tgt_pieces']:>7d} {r['translate_s']:>7.1f} {r['peak_rss_mib']:>13.1f} {r['bleu']:>6.2f}")
    if random_weights:
        print("(random weights: outputs run to the length limit; train a model for comparable sentences/s)")


if __name__ == "__main__":
    main()

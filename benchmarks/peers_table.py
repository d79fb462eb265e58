"""The mtkit-vs-peers table from one run of ``benchmarks/compare_peers.sh``.

    python benchmarks/peers_table.py OUT_DIR [DECODE_DIR ...] --peers-dir PEERS_DIR

Reads the peers' throughput summaries (``PEERS_DIR/<peer>/work/throughput.summary``) and mtkit's
``train_speed`` JSON lines in OUT_DIR, and the decoding figures (``decode_speed``/``ct2_vs_mtkit``
JSON lines, OpenNMT-py decoding summaries) in every directory given: a decoder's pieces/s and
sent/s are the medians over the directories holding it, each directory's figure in brackets.
Prints markdown tables with every figure and the ratio mtkit / peer. Missing parts are skipped,
so the table can be printed for a partial run.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path


def summary(path: Path) -> dict[str, str]:
    """``key: value`` lines (the peers' scripts' format)."""
    out: dict[str, str] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            key, sep, value = line.partition(": ")
            if sep:
                out.setdefault(key.strip(), value.strip())
            m = re.match(r"BLEU=([\d.]+)", line)
            if m:
                out["BLEU"] = m.group(1)
    return out


def json_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("{")]


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("decode_dirs", type=Path, nargs="*", help="more directories with decoding figures (repeats)")
    ap.add_argument("--peers-dir", type=Path, required=True)
    args = ap.parse_args()

    train = {}
    for name, peer in (("OpenNMT-py 3.5.1", "onmt"), ("Sockeye 3.1.34", "sockeye"), ("JoeyNMT 2.3.0", "joeynmt")):
        s = summary(args.peers_dir / peer / "work" / "throughput.summary")
        if "tgt_tok_per_s" in s:
            train[name] = (float(s["tgt_tok_per_s"]), float(s.get("sec_per_update", "nan")),
                           float(s.get("peak_rss_MiB", "nan")) / 1024)
    variants = (("fp32", "fp32"), ("bf16", "bf16"), ("fp32_whole", "fp32, whole batches: pass_tokens=0"),
                ("fp32_before", "fp32, code at BEFORE"), ("bf16_before", "bf16, code at BEFORE"))
    for tag, label in variants:
        rows = json_lines(args.out / f"mtkit_train_{tag}.txt")
        if rows:
            r = rows[-1]
            train[f"mtkit ({label})"] = (r["tgt_tokens_per_s"], r["s_per_update"], r["peak_rss_gib"])
    if train:
        peers = [k for k in train if not k.startswith("mtkit")]
        print("## Training, reference setup (target tokens/s, 2 threads)\n")
        print("| toolkit | tgt tok/s | s/update | peak RSS GiB | " + " | ".join(f"vs {p.split()[0]} (tok/s, RSS)" for p in peers) + " |")
        print("|---" * (4 + len(peers)) + "|")
        for name, (tok, spu, rss) in train.items():
            cells = [f"{ratio(tok, train[p][0])}, {ratio(rss, train[p][2])}" if name.startswith("mtkit") else "" for p in peers]
            print(f"| {name} | {tok:.0f} | {spu:.2f} | {rss:.2f} | " + " | ".join(cells) + " |")
        print()

    runs: dict[tuple[str, str], list[tuple[float, float, float]]] = {}  # (decoder, search) -> per-run figures
    for d in [args.out, *args.decode_dirs]:
        if not d.is_dir():
            continue
        for beam, search in (("5", "beam5"), ("1", "greedy")):
            s = summary(d / "onmt" / f"test.beam{beam}.summary")
            if "tok_per_s" in s:
                runs.setdefault(("onmt_translate (same model)", search), []).append(
                    (float(s["sent_per_s"]), float(s["tok_per_s"]), float(s.get("BLEU", "nan"))))
        for r in json_lines(d / "ct2_vs_mtkit.txt"):
            name = "mtkit (ct2_vs_mtkit run)" if r["engine"] == "mtkit" else f"CTranslate2 {r['engine'][4:]}"
            runs.setdefault((name, r["search"]), []).append((r["sentences_per_s"], r["tgt_pieces_per_s"], r["bleu"]))
        for file, label in (("mtkit_decode.txt", "mtkit"), ("mtkit_decode_before.txt", "mtkit at BEFORE")):
            for r in json_lines(d / file):
                if r["batch"] == "32 sentences":
                    rule = (r.get("decode") or {}).get("stopping", "full")
                    dtype = "" if r.get("dtype", "float32") == "float32" else f", {r['dtype']}"
                    runs.setdefault((f"{label} (stopping {rule}{dtype})", r["search"]), []).append(
                        (r["sentences_per_s"], r["tgt_pieces_per_s"], r.get("bleu", float("nan"))))
    decode = []  # (decoder, search, sent/s, pieces/s, BLEU, per-run pieces/s)
    for (name, search), figs in runs.items():
        decode.append((name, search, statistics.median(f[0] for f in figs), statistics.median(f[1] for f in figs),
                       figs[0][2], [f[1] for f in figs]))
    if decode:
        print("## Decoding the same model: test_2016_flickr, batches of 32 sentences, 2 threads"
              " (medians over the runs, each run's pieces/s in brackets)\n")
        refs = sorted({d[0] for d in decode if not d[0].startswith("mtkit")})
        print("| decoder | search | sent/s | pieces/s | BLEU | " + " | ".join(f"pieces/s vs {n}" for n in refs) + " |")
        print("|---" * (5 + len(refs)) + "|")
        for name, search, sps, pps, bleu, each in decode:
            cells = []
            for ref in refs:
                other = next((d[3] for d in decode if d[0] == ref and d[1] == search), None)
                cells.append(ratio(pps, other) if name.startswith("mtkit") else "")
            runs_txt = f" ({', '.join(f'{x:.0f}' for x in each)})" if len(each) > 1 else ""
            print(f"| {name} | {search} | {sps:.1f} | {pps:.0f}{runs_txt} | {bleu:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

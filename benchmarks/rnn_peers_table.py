"""The mtkit-vs-OpenNMT-py (and JoeyNMT training) figures from one run of ``benchmarks/compare_rnn_peers.sh``, as JSON.

    python benchmarks/rnn_peers_table.py OUT_DIR

Reads, in OUT_DIR: ``onmt_train.summary`` and ``joey_train.summary`` (shared/bench/peers/parse_train_log.py) and
``mtkit_train.txt`` (train_speed.py's JSON line, then the parameter count), in OUT_DIR itself or per
repeat in ``train*/`` (medians over the repeats), ``onmt_model.summary``
and ``mtkit_model.json`` (the TRAIN_MIN-minute models), and per repeat ``decode*/onmt/test.beam5.summary``
and ``decode*/mtkit_beam5_<stopping>.json``. Decoding figures are medians over the repeats (each
repeat's value under ``runs``). Ratios are mtkit / OpenNMT-py (above 1: mtkit is faster). Parts
that did not run are left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers_table import json_lines, summary  # noqa: E402  (the peers' summary format, read once)


def num(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def median_of(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(vals), 2) if vals else None


def train_figures(d: Path) -> dict:
    """Training throughput of each toolkit from one directory's summaries."""
    train: dict = {}
    for peer in ("onmt", "joey"):
        s = summary(d / f"{peer}_train.summary")
        if not s:
            continue
        train[peer] = {
            "tgt_tok_per_s": num(s.get("tgt_tok_per_s")), "s_per_update": num(s.get("sec_per_update")),
            "tgt_tokens_per_update": num(s.get("tgt_tokens_per_update")), "updates": num(s.get("updates")),
            "peak_rss_gib": round(num(s.get("peak_rss_MiB")) / 1024, 3) if num(s.get("peak_rss_MiB")) else None,
            "parameters": int(s["parameters"]) if s.get("parameters", "").isdigit() else None,
        }
        if "error" in s:
            train[peer]["error"] = s["error"]
    rows = json_lines(d / "mtkit_train.txt")
    speed = next((r for r in rows if r.get("benchmark") == "train_speed"), None)
    params = next((r for r in rows if "parameters" in r), None)
    if speed or params:
        train["mtkit"] = {}
        if speed:
            train["mtkit"].update(
                tgt_tok_per_s=speed["tgt_tokens_per_s"], s_per_update=speed["s_per_update"],
                tgt_tokens_per_update=speed["tgt_tokens_per_update"], updates=speed["updates"],
                peak_rss_gib=speed["peak_rss_gib"], loadavg_1m=speed["loadavg_1m"])
        if params:
            train["mtkit"]["parameters"] = params["parameters"]
    return train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    out: Path = args.out
    res: dict = {"out": str(out)}

    # --- training throughput: medians over OUT/train*/ (the ``train`` part), else OUT's own files
    train: dict = {}
    runs = [train_figures(d) for d in sorted(out.glob("train*")) if d.is_dir()] or [train_figures(out)]
    for name in ("onmt", "joey", "mtkit"):
        mine = [r[name] for r in runs if name in r]
        if not mine:
            continue
        train[name] = dict(mine[-1])
        for key in ("tgt_tok_per_s", "s_per_update", "tgt_tokens_per_update", "peak_rss_gib"):
            train[name][key] = median_of(mine, key)
        if len(mine) > 1:
            train[name]["runs_tgt_tok_per_s"] = [r.get("tgt_tok_per_s") for r in mine]
    if "onmt" in train and "mtkit" in train:
        o, m = train["onmt"], train["mtkit"]
        train["ratio_mtkit_over_onmt"] = {
            "tgt_tok_per_s": ratio(m.get("tgt_tok_per_s"), o.get("tgt_tok_per_s")),
            "peak_rss": ratio(m.get("peak_rss_gib"), o.get("peak_rss_gib")),
            "parameters": ratio(m.get("parameters"), o.get("parameters")),
        }
    if "joey" in train and "mtkit" in train:
        train["ratio_mtkit_over_joey"] = {
            "tgt_tok_per_s": ratio(train["mtkit"].get("tgt_tok_per_s"), train["joey"].get("tgt_tok_per_s"))}
    if train:
        res["train_throughput"] = train

    # --- the models that are decoded
    models: dict = {}
    s = summary(out / "onmt_model.summary")
    if s:
        models["onmt"] = {"checkpoint": s.get("checkpoint"), "updates": num(s.get("updates")),
                          "budget_s": num(s.get("budget_s")), "wall": s.get("wall")}
    rows = json_lines(out / "mtkit_model.json")
    if rows:
        r = rows[-1]
        models["mtkit"] = {"checkpoint": r.get("last_checkpoint"), "updates": r.get("updates"),
                           "train_seconds": r.get("train_seconds"), "epochs": r.get("epochs"),
                           "valid_loss": (r.get("valid") or {}).get("loss")}
    if models:
        res["models"] = models

    # --- decoding: beam 5, 32 sentences per batch
    decode: dict = {}
    dirs = sorted(d for d in out.glob("decode*") if d.is_dir())
    onmt_runs = []
    for d in dirs:
        s = summary(d / "onmt" / "test.beam5.summary")
        if "tok_per_s" in s:
            onmt_runs.append({"dir": d.name, "sent_per_s": num(s.get("sent_per_s")),
                              "tgt_pieces_per_s": num(s.get("tok_per_s")), "tgt_pieces": num(s.get("tgt_pieces")),
                              "translate_s": num(s.get("translate_only_s")), "bleu": num(s.get("BLEU")),
                              "peak_rss_mib": num(s.get("peak_rss_MiB")), "sentences": num(s.get("sentences"))})
    if onmt_runs:
        decode["onmt_translate"] = {k: median_of(onmt_runs, k) for k in ("sent_per_s", "tgt_pieces_per_s", "bleu",
                                                                          "tgt_pieces", "peak_rss_mib")}
        decode["onmt_translate"]["runs"] = onmt_runs
    rules = sorted({p.stem.split("_")[-1] for d in dirs for p in d.glob("mtkit_beam5_*.json")})
    for rule in rules:
        runs = []
        for d in dirs:
            for r in json_lines(d / f"mtkit_beam5_{rule}.json"):
                runs.append({"dir": d.name, "sent_per_s": r["sentences_per_s"], "tgt_pieces_per_s": r["tgt_pieces_per_s"],
                             "tgt_pieces": r["tgt_pieces"], "translate_s": r["translate_s"], "bleu": r.get("bleu"),
                             "peak_rss_mib": r.get("peak_rss_mib"), "sentences": r["sentences"]})
        if not runs:
            continue
        fig = {k: median_of(runs, k) for k in ("sent_per_s", "tgt_pieces_per_s", "bleu", "tgt_pieces", "peak_rss_mib")}
        if onmt_runs:
            o = decode["onmt_translate"]
            fig["ratio_mtkit_over_onmt"] = {k: ratio(fig[k], o[k]) for k in ("tgt_pieces_per_s", "sent_per_s")}
        fig["runs"] = runs
        decode[f"mtkit stopping={rule}"] = fig
    if decode:
        decode["settings"] = ("test_2016_flickr, beam 5, 32 sentences per batch, 2 threads, length normalisation "
                              "by |Y|, translation time only; OpenNMT-py stops a sentence once its top beam ends "
                              "(as mtkit stopping=first)")
        res["decode"] = decode

    # --- the figures that matter, first
    head: dict = {}
    if "mtkit" in train and "onmt" in train:
        head["train_tgt_tok_per_s"] = {"mtkit": train["mtkit"].get("tgt_tok_per_s"), "onmt": train["onmt"].get("tgt_tok_per_s"),
                                       "ratio": train["ratio_mtkit_over_onmt"]["tgt_tok_per_s"]}
    if "ratio_mtkit_over_joey" in train:
        head["train_tgt_tok_per_s vs JoeyNMT"] = {"mtkit": train["mtkit"].get("tgt_tok_per_s"),
                                                  "joey": train["joey"].get("tgt_tok_per_s"),
                                                  "ratio": train["ratio_mtkit_over_joey"]["tgt_tok_per_s"]}
    for name, fig in decode.items():
        if name.startswith("mtkit") and "ratio_mtkit_over_onmt" in fig:
            head[f"decode_pieces_per_s ({name})"] = {
                "mtkit": fig["tgt_pieces_per_s"], "onmt": decode["onmt_translate"]["tgt_pieces_per_s"],
                "ratio": fig["ratio_mtkit_over_onmt"]["tgt_pieces_per_s"],
                "bleu": {"mtkit": fig["bleu"], "onmt": decode["onmt_translate"]["bleu"]}}
    if head:
        res = {"headline": head, **res}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

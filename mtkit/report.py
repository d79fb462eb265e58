"""The end of a recipe run: ``results.json``, ``report.md`` and a PNG of the training curves.

The report lists the test-set scores with their sacrebleu signatures, then sets each published
number beside our output scored with the same metric (``reproduces.metric``: e.g. tokenized
BLEU with compound splitting, computed on our detokenized output and the raw reference), with
the difference, and beside our sacreBLEU; every figure carries its signature.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtkit.errors import MtkitError
from mtkit.utils import atomic_write_text

if TYPE_CHECKING:
    from mtkit.recipes import RunContext

logger = logging.getLogger("mtkit.report")

OUR_METRIC = "sacreBLEU"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The events of a ``metrics.jsonl`` file (unreadable lines are skipped)."""
    events = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    events.append(obj)
    except FileNotFoundError:
        return []
    return events


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def plot_curves(metrics_file: str | Path, out_png: str | Path, title: str = "") -> Path:
    """Train/valid loss and valid BLEU against updates, drawn from a training run's
    ``metrics.jsonl``; a missing file, a file without metrics or a missing matplotlib is an error."""
    if not Path(metrics_file).is_file():
        raise MtkitError(f"metrics file not found: {metrics_file}")
    events = read_metrics(metrics_file)
    train = [(e["update"], e["loss"]) for e in events if e.get("kind") == "train" and _finite(e.get("loss"))]
    valid = [(e["update"], e["loss"]) for e in events if e.get("kind") == "valid" and _finite(e.get("loss"))]
    bleu = [(e["update"], e["bleu"]) for e in events if e.get("kind") == "valid" and _finite(e.get("bleu"))]
    if not (train or valid or bleu):
        raise MtkitError(f"no training metrics in {metrics_file}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MtkitError("drawing curves needs matplotlib (pip install 'mtkit[plot]')") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        ax1.plot(*zip(*train), label="train loss", alpha=0.7)
    if valid:
        ax1.plot(*zip(*valid), "o-", label="valid loss")
    ax1.set_xlabel("updates")
    ax1.set_ylabel("loss (nats/token)")
    ax1.legend()
    ax1.grid(alpha=0.3)
    if bleu:
        ax2.plot(*zip(*bleu), "o-", color="tab:green")
    ax2.set_xlabel("updates")
    ax2.set_ylabel("valid BLEU")
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def count_parameters(checkpoint: str | Path) -> int | None:
    """Number of model parameters in a checkpoint (``None`` if it cannot be read)."""
    from mtkit.checkpoint import load_model
    from mtkit.models.base import num_parameters

    try:
        model = load_model(checkpoint)[0]
    except (MtkitError, OSError, RuntimeError) as exc:
        logger.warning("could not count parameters of %s: %s", checkpoint, exc)
        return None
    return num_parameters(model)


def _bleu(scores: list[dict[str, Any]]) -> dict[str, Any] | None:
    for s in scores:
        if str(s.get("name", "")).lower().startswith("bleu"):
            return s
    return None


def compare(reference: dict[str, Any], tests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One published number beside ours by the same metric on the same test set, with the difference.

    ``tests[name]["metrics"]`` holds our output's score by each metric (``{metric: {score,
    signature}}``); our sacreBLEU is always set beside it.
    """
    by_metric = (tests.get(reference["test_set"]) or {}).get("metrics") or {}
    ours = by_metric.get(reference["metric"]) or {}
    sacre = by_metric.get(OUR_METRIC) or {}
    value = ours.get("score")
    diff = round(value - reference["value"], 2) if _finite(value) and _finite(reference.get("value")) else None
    return {
        **reference,
        "ours": value,
        "our_metric": reference["metric"],
        "our_signature": ours.get("signature"),
        "sacrebleu": sacre.get("score"),
        "sacrebleu_signature": sacre.get("signature"),
        "difference": diff,
        "comparable": value is not None,
        "caveat": None if value is not None else (
            f"our output was not scored with {reference['metric']} on {reference['test_set']}, so there is "
            "no difference to give"
        ),
    }


def build_results(
    ctx: RunContext,
    scores: dict[str, list[dict[str, Any]]],
    metric_scores: dict[str, dict[str, dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """``results.json``'s content; ``metric_scores``: per test set, our BLEU by each published metric."""
    from mtkit.provenance import manifest_info
    from mtkit.recipes import STAGES, Markers

    r = ctx.recipe
    tests = {}
    for name, result in scores.items():
        b = _bleu(result) or {}
        tests[name] = {"bleu": b.get("score"), "signature": b.get("signature"), "scores": result,
                       "metrics": (metric_scores or {}).get(name, {}),
                       "lines": (ctx.outputs.get("prepare") or {}).get("lines", {}).get(name)}
    train = ctx.outputs.get("train") or {}
    translate = ctx.outputs.get("translate") or {}
    ckpt = translate.get("checkpoint")
    markers = Markers(ctx.workdir)
    stage_seconds = {}
    for stage in STAGES:
        m = markers.read(stage)
        if m and m.get("status") == "done":
            stage_seconds[stage] = m.get("seconds")
    return {
        "recipe": r.name,
        "recipe_file": str(r.path),
        "smoke": r.smoke,
        "src_lang": r.src_lang,
        "tgt_lang": r.tgt_lang,
        "tests": tests,
        "reproduces": compare(r.raw["reproduces"], tests),
        "see_also": [compare(x, tests) for x in r.raw.get("see_also") or []],
        "training": {k: train.get(k) for k in
                     ("updates", "epochs", "train_seconds", "best_checkpoint", "last_checkpoint", "metrics_file")},
        "model": {
            "arch": r.config.model.arch,
            "preset": r.raw.get("preset"),
            "parameters": count_parameters(ckpt) if ckpt else None,
            "checkpoint": ckpt,
            "averaged_from": (ctx.outputs.get("average") or {}).get("from"),
        },
        "decode": {k: getattr(r.config.decode, k) for k in ("beam", "length_penalty", "alpha")},
        "stage_seconds": stage_seconds,
        "total_seconds": round(sum(v for v in stage_seconds.values() if _finite(v)), 1),
        "provenance": {**ctx.provenance, "data": manifest_info(ctx.data_path)},
    }


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def render_markdown(res: dict[str, Any]) -> str:
    rep = res["reproduces"]
    lines = [
        f"# {res['recipe']}{' (smoke run: tiny model, not a real result)' if res['smoke'] else ''}",
        "",
        f"{res['src_lang']} -> {res['tgt_lang']}, model `{res['model']['arch']}` "
        f"(preset `{res['model']['preset']}`, {_fmt(res['model']['parameters'])} parameters), "
        f"{_fmt(res['training']['updates'])} updates in {_fmt((res['training']['train_seconds'] or 0) / 60, 1)} min of "
        f"training; {_fmt(res['total_seconds'] / 60, 1)} min for all stages.",
        "",
        "## Test sets",
        "",
        "| test set | lines | score | sacrebleu signature |",
        "| --- | --- | --- | --- |",
    ]
    for name, t in res["tests"].items():
        for s in t["scores"]:
            lines.append(f"| {name} | {_fmt(t['lines'])} | {s.get('name')} {_fmt(s.get('score'))} | `{s.get('signature')}` |")
    rows = [rep, *res["see_also"]]
    lines += ["", "## Against the published number", "",
              "Ours is this run's output scored with the paper's metric (against the raw reference); "
              "the difference compares the two.", "",
              f"| source | table | test set | metric | theirs | ours | difference | ours, {OUR_METRIC} |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in rows:
        lines.append(
            f"| {c['paper']} | {c['table']} | {c['test_set']} | {c['metric']} | {_fmt(c.get('value'))} | "
            f"{_fmt(c['ours'])} | {_fmt(c['difference'])} | {_fmt(c.get('sacrebleu'))} |"
        )
    signatures = {}
    for c in rows:
        signatures.setdefault((c["metric"], c["test_set"]), c.get("our_signature"))
        signatures.setdefault((OUR_METRIC, c["test_set"]), c.get("sacrebleu_signature"))
    lines += [""] + [f"- {metric} on {test}: `{sig}`" for (metric, test), sig in signatures.items() if sig]
    notes = [c for c in rows if c.get("note") or c.get("caveat")]
    if notes:
        lines += [""]
        for c in notes:
            text = " ".join(x for x in (c.get("note"), c.get("caveat")) if x)
            lines.append(f"- {c['paper']}: {text.strip()}")
    lines += ["", "## Stages", "", "| stage | seconds |", "| --- | --- |"]
    for stage, secs in res["stage_seconds"].items():
        lines.append(f"| {stage} | {_fmt(secs, 1)} |")
    if res.get("curves"):
        lines += ["", f"![training curves]({Path(res['curves']).name})"]
    return "\n".join(lines) + "\n"


def write_report(
    ctx: RunContext,
    scores: dict[str, list[dict[str, Any]]],
    metric_scores: dict[str, dict[str, dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Write results.json, report.md and training_curves.png into the work dir (see :func:`build_results`)."""
    res = build_results(ctx, scores, metric_scores)
    metrics = res["training"].get("metrics_file") or ctx.save_dir / "metrics.jsonl"
    try:
        png: Path | None = plot_curves(metrics, ctx.workdir / "training_curves.png", title=ctx.recipe.name)
    except MtkitError as exc:
        logger.warning("no training-curve PNG: %s", exc)
        png = None
    res["curves"] = str(png) if png else None
    results = atomic_write_text(ctx.workdir / "results.json", json.dumps(res, indent=1, default=str) + "\n")
    report = atomic_write_text(ctx.workdir / "report.md", render_markdown(res))
    rep = res["reproduces"]
    logger.info(
        "%s: %s %s on %s (paper: %s), %s %s", ctx.recipe.name, rep["metric"], _fmt(rep["ours"]), rep["test_set"],
        _fmt(rep.get("value")), OUR_METRIC, _fmt(rep.get("sacrebleu")),
    )
    return {"results": str(results), "report": str(report), "curves": res["curves"],
            "bleu": {k: v["bleu"] for k, v in res["tests"].items()}}

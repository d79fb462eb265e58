"""The end of a recipe run: ``results.json``, ``report.md`` and a PNG of the training curves.

The report lists the test-set scores with their sacrebleu signatures, then sets each published
number beside our output scored with the same metric (``reproduces.metric``: e.g. tokenized BLEU
with compound splitting, computed on our detokenized output and the raw reference), with the
difference, and beside our sacreBLEU; every figure carries its signature. It takes plain data (a
:class:`RecipeRun` and the scores), which the recipe runner gathers."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

from mtkit.errors import MtkitError
from mtkit.utils import atomic_write_text

logger = logging.getLogger("mtkit.report")

OUR_METRIC = "sacreBLEU"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The events of a ``metrics.jsonl`` file (unreadable lines are skipped)."""
    events = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    if isinstance(obj := json.loads(line), dict):
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
    ax1.legend()
    if bleu:
        ax2.plot(*zip(*bleu), "o-", color="tab:green")
    for ax, ylabel in ((ax1, "loss (nats/token)"), (ax2, "valid BLEU")):
        ax.set(xlabel="updates", ylabel=ylabel)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def compare(reference: dict[str, Any], tests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One published number beside our score by its metric on its test set (``tests[name]["metrics"]``:
    ``{metric: {score, signature}}``), with the difference and, always, our sacreBLEU."""
    by_metric = (tests.get(reference["test_set"]) or {}).get("metrics") or {}
    ours = by_metric.get(reference["metric"]) or {}
    sacre = by_metric.get(OUR_METRIC) or {}
    value = ours.get("score")
    diff = round(value - reference["value"], 2) if _finite(value) and _finite(reference.get("value")) else None
    return {
        **reference, "ours": value, "our_metric": reference["metric"],
        "our_signature": ours.get("signature"), "sacrebleu": sacre.get("score"),
        "sacrebleu_signature": sacre.get("signature"), "difference": diff, "comparable": value is not None,
        "caveat": None if value is not None else (
            f"our output was not scored with {reference['metric']} on {reference['test_set']}, so there is "
            "no difference to give"
        ),
    }


@dataclasses.dataclass
class RecipeRun:
    """A finished recipe run as plain data: what the report needs besides the scores."""

    recipe: str  # the recipe's name
    recipe_file: str
    smoke: bool
    src_lang: str
    tgt_lang: str
    reproduces: dict[str, Any]  # the recipe's published number (its ``reproduces`` mapping)
    see_also: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    test_lines: dict[str, int] = dataclasses.field(default_factory=dict)  # pairs in each test set
    training: dict[str, Any] = dataclasses.field(default_factory=dict)  # the train stage's summary
    model: dict[str, Any] = dataclasses.field(default_factory=dict)  # arch, preset, parameters, checkpoint, averaged_from
    decode: dict[str, Any] = dataclasses.field(default_factory=dict)  # beam, length_penalty, alpha
    stage_seconds: dict[str, Any] = dataclasses.field(default_factory=dict)  # finished stages, in order
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)


TRAINING_KEYS = ("updates", "epochs", "train_seconds", "best_checkpoint", "last_checkpoint", "metrics_file")


def build_results(
    run: RecipeRun, scores: dict[str, list[dict[str, Any]]],
    metric_scores: dict[str, dict[str, dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """``results.json``'s content; ``metric_scores``: per test set, our BLEU by each published metric."""
    tests = {}
    for name, result in scores.items():
        b = next((s for s in result if str(s.get("name", "")).lower().startswith("bleu")), None) or {}
        tests[name] = {"bleu": b.get("score"), "signature": b.get("signature"), "scores": result,
                       "metrics": (metric_scores or {}).get(name, {}), "lines": run.test_lines.get(name)}
    return {
        **{k: getattr(run, k) for k in ("recipe", "recipe_file", "smoke", "src_lang", "tgt_lang")},
        "tests": tests,
        "reproduces": compare(run.reproduces, tests),
        "see_also": [compare(x, tests) for x in run.see_also],
        "training": {k: run.training.get(k) for k in TRAINING_KEYS},
        "model": {k: run.model.get(k) for k in ("arch", "preset", "parameters", "checkpoint", "averaged_from")},
        "decode": dict(run.decode),
        "stage_seconds": dict(run.stage_seconds),
        "total_seconds": round(sum(v for v in run.stage_seconds.values() if _finite(v)), 1),
        "provenance": run.provenance,
    }


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def render_markdown(res: dict[str, Any]) -> str:
    """``report.md``'s text from ``results.json``'s content (:func:`build_results`)."""
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
    notes = [(c["paper"], " ".join(x for x in (c.get("note"), c.get("caveat")) if x)) for c in rows]
    if any(text for _, text in notes):
        lines += [""] + [f"- {paper}: {text.strip()}" for paper, text in notes if text]
    lines += ["", "## Stages", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {stage} | {_fmt(secs, 1)} |" for stage, secs in res["stage_seconds"].items()]
    if res.get("curves"):
        lines += ["", f"![training curves]({Path(res['curves']).name})"]
    return "\n".join(lines) + "\n"


def write_report(
    run: RecipeRun, workdir: str | Path, scores: dict[str, list[dict[str, Any]]],
    metric_scores: dict[str, dict[str, dict[str, Any]]] | None = None, metrics_file: str | Path | None = None,
) -> dict[str, Any]:
    """Write results.json, report.md and training_curves.png into ``workdir`` (see
    :func:`build_results`); the curves come from ``metrics_file``, by default the training summary's."""
    workdir = Path(workdir)
    res = build_results(run, scores, metric_scores)
    metrics_file = metrics_file or res["training"].get("metrics_file")
    res["curves"] = None
    if metrics_file is None:
        logger.warning("no training-curve PNG: the run names no metrics file")
    else:
        try:
            res["curves"] = str(plot_curves(metrics_file, workdir / "training_curves.png", title=run.recipe))
        except MtkitError as exc:
            logger.warning("no training-curve PNG: %s", exc)
    results = atomic_write_text(workdir / "results.json", json.dumps(res, indent=1, default=str) + "\n")
    report = atomic_write_text(workdir / "report.md", render_markdown(res))
    rep = res["reproduces"]
    logger.info("%s: %s %s on %s (paper: %s), %s %s", run.recipe, rep["metric"], _fmt(rep["ours"]),
                rep["test_set"], _fmt(rep.get("value")), OUR_METRIC, _fmt(rep.get("sacrebleu")))
    return {"results": str(results), "report": str(report), "curves": res["curves"],
            "bleu": {k: v["bleu"] for k, v in res["tests"].items()}}

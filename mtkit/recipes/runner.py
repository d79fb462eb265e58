"""Running a recipe: its stages in order, resumable.

Each stage records a marker ``WORKDIR/stages/<stage>.json``: ``{"status": "running"}`` at its
start, ``{"status": "done", "outputs": ...}`` at its end, with the hash of all the stage (and those
before it) read from the recipe. A rerun skips the stages done with the same hash and starts at the
first other one: a stage left ``running`` by an interruption is resumed (training continues from
``checkpoint_last.pt``), one whose inputs changed is redone from scratch, and each stage that runs
invalidates the markers after it."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from mtkit import provenance
from mtkit.data.catalog import load_catalog
from mtkit.errors import MtkitError, unknown_name
from mtkit.recipes.context import STAGES, Markers, RunContext, short_hash
from mtkit.recipes.load import load_recipe
from mtkit.recipes.schema import Recipe
from mtkit.recipes.stages import STAGE_FUNCS

logger = logging.getLogger("mtkit.recipes")


def stage_inputs(recipe: Recipe) -> dict[str, str]:
    """Per stage, a hash of what it reads from the recipe, chained through the stages before it."""
    raw, cfg = recipe.raw, recipe.config.to_dict()
    own = {
        "prepare": [raw["src_lang"], raw["tgt_lang"], raw["corpora"], raw.get("smoke") if recipe.smoke else None],
        "preprocess": [raw.get("preprocess")],
        "train": [{k: v for k, v in cfg.items() if k != "decode"}],
        "average": [raw.get("average")],
        "translate": [cfg["decode"]],
        "score": [raw.get("score"), raw["reproduces"], raw.get("see_also")],
    }
    hashes, prev = {}, ""
    for stage in STAGES:
        prev = hashes[stage] = short_hash([prev, stage, own[stage]])
    return hashes


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def parse_stages(stages: Sequence[str] | None) -> list[str]:
    """``["train,average", "score"]`` -> ordered stage names; ``a-b`` ranges are allowed."""
    if not stages:
        return list(STAGES)
    chosen: set[str] = set()
    for item in stages:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            ends = part.split("-")  # "a-b", or one stage
            for end in ends:
                if end not in STAGES:
                    raise MtkitError(unknown_name("stage", end, list(STAGES)))
            a, b = STAGES.index(ends[0]), STAGES.index(ends[-1])
            chosen.update(STAGES[min(a, b) : max(a, b) + 1])
    return [s for s in STAGES if s in chosen]


def run_recipe(
    path: str | Path, workdir: str | Path, stages: Sequence[str] | None = None, overrides: Sequence[str] = (),
    data_dir: Any = None, smoke: bool = False, device: str = "auto", force: bool = False,
) -> dict[str, Any]:
    """Run (or resume) a recipe's stages in ``workdir``; returns what each stage did."""
    catalog = load_catalog()
    recipe = load_recipe(path, overrides, smoke=smoke, catalog=catalog)
    selected = parse_stages(stages)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "recipe.yaml").write_text(
        f"# {recipe.name} as run{' (--smoke)' if smoke else ''}, overrides: {list(overrides)}\n"
        + yaml.safe_dump(recipe.raw, sort_keys=False, allow_unicode=True),
        encoding="utf-8",
    )
    ctx = RunContext(recipe, workdir, data_dir=data_dir, device=device, catalog=catalog)
    ctx.provenance = provenance.collect(recipe.config.to_dict(), ctx.data_path)
    with provenance.run_log(workdir / "run.log", ctx.provenance, f"mtkit recipe run {recipe.name}"):
        markers = Markers(workdir)
        hashes = stage_inputs(recipe)
        report: dict[str, Any] = {"workdir": str(workdir), "stages": {}}
        t_start = time.monotonic()
        for stage in STAGES:
            report["stages"][stage] = _visit_stage(ctx, stage, markers, hashes[stage], selected, force)
        report["seconds"] = round(time.monotonic() - t_start, 2)
        if "score" in ctx.outputs:
            report["results"] = ctx.outputs["score"].get("results")
            report["report"] = ctx.outputs["score"].get("report")
        return report


def _visit_stage(
    ctx: RunContext, stage: str, markers: Markers, inputs: str, selected: list[str], force: bool
) -> str:
    """Skip, resume or run one stage; returns what happened to it."""
    marker = markers.read(stage)
    current = marker is not None and marker.get("inputs") == inputs
    done = current and marker.get("status") == "done"
    if stage not in selected:
        if done:
            ctx.outputs[stage] = marker.get("outputs") or {}
        elif any(STAGES.index(s) > STAGES.index(stage) for s in selected):
            raise MtkitError(
                f"stage '{stage}' has not finished in {ctx.workdir} (with this recipe), so the stages "
                f"after it cannot run yet; add it to --stages or run without --stages"
            )
        return "not selected"
    if done and not force:
        logger.info("stage %s: done earlier, skipping (%s)", stage, markers.path(stage))
        ctx.outputs[stage] = marker.get("outputs") or {}
        return "skipped (done)"
    # run it between its "running" and "done" markers; later markers are invalidated
    resume = current and not force  # interrupted earlier with the same inputs
    if not resume:
        _clean(ctx, stage)
    for later in STAGES[STAGES.index(stage) + 1 :]:
        markers.remove(later)
    started = _now()
    markers.write(stage, {"stage": stage, "status": "running", "inputs": inputs, "started": started})
    logger.info("stage %s: %s", stage, "resuming" if resume else "running")
    t0 = time.monotonic()
    outputs = STAGE_FUNCS[stage](ctx, resume)
    seconds = round(time.monotonic() - t0, 2)
    ctx.outputs[stage] = outputs
    markers.write(stage, {
        "stage": stage, "status": "done", "inputs": inputs, "started": started,
        "finished": _now(), "seconds": seconds, "resumed": resume, "outputs": outputs,
    })
    logger.info("stage %s: done in %.1f s", stage, seconds)
    return f"{'resumed' if resume else 'ran'} ({seconds:.1f} s)"


def _clean(ctx: RunContext, stage: str) -> None:
    """Remove what an earlier (different or forced) run of ``stage`` left behind."""
    targets = {
        "prepare": [ctx.raw_dir],
        "preprocess": [ctx.data_path],
        "train": [ctx.save_dir],
        "average": [ctx.save_dir / "averaged.pt"],
        "translate": [ctx.hyp_dir],
        "score": [ctx.workdir / n for n in ("results.json", "report.md", "training_curves.png")],
    }[stage]
    for t in targets:
        if t.is_dir():
            logger.info("removing %s (stage %s starts afresh)", t, stage)
            shutil.rmtree(t)
        elif t.exists():
            t.unlink()

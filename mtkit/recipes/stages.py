"""The six stages of a recipe run, each a function ``(ctx, resume) -> outputs`` over a
:class:`~mtkit.recipes.context.RunContext`; :data:`STAGE_FUNCS` maps the stage names to them."""

from __future__ import annotations

import gzip
import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mtkit.data.catalog import SplitSource, resolve_file
from mtkit.errors import MtkitError
from mtkit.recipes.context import Markers, RunContext, short_hash
from mtkit.recipes.schema import METRICS
from mtkit.recipes.smoke import SMOKE_TRAIN_LINES
from mtkit.report import OUR_METRIC, RecipeRun, write_report

logger = logging.getLogger("mtkit.recipes")


def generated_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Deterministic toy parallel text (a word-for-word cipher with reordering): what smoke runs
    train on where no local corpus exists."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(300)]
    cipher = {w: w[::-1] + rng.choice("aeiou") for w in words}
    pairs = []
    for _ in range(n):
        sent = [rng.choice(words) for _ in range(rng.randint(3, 12))]
        tgt = [cipher[w] for w in sent]
        if len(tgt) > 3:
            tgt[0], tgt[1] = tgt[1], tgt[0]
        pairs.append((" ".join(sent).capitalize() + " .", " ".join(tgt).capitalize() + " ."))
    return pairs


def _read_pairs(ctx: RunContext, ref: str, limit: int | None) -> tuple[list[str], list[str], dict[str, str]]:
    """One catalog split's (src lines, tgt lines, where they came from), first ``limit`` lines."""
    from mtkit.data.text import iter_lines

    split: SplitSource = ctx.catalog.split(ref)
    r = ctx.recipe
    sides, origin = {}, {}
    try:
        for lang in (r.src_lang, r.tgt_lang):
            path = resolve_file(split, lang, ctx.data_dir, allow_download=not r.smoke)
            sides[lang], origin[f"{ref}.{lang}"] = [], str(path)
            for i, line in enumerate(iter_lines(path)):
                if limit is not None and i >= limit:
                    break
                sides[lang].append(line)
    except MtkitError as exc:
        if not r.smoke:
            raise
        logger.warning("smoke: %s; using generated text for %s", exc, ref)
        pairs = generated_pairs(limit or SMOKE_TRAIN_LINES, seed=int(short_hash(ref), 16) % 10_000)
        sides = {r.src_lang: [p[0] for p in pairs], r.tgt_lang: [p[1] for p in pairs]}
        origin = {f"{ref}.{lang}": "generated" for lang in (r.src_lang, r.tgt_lang)}
    src, tgt = sides[r.src_lang], sides[r.tgt_lang]
    if len(src) != len(tgt):
        raise MtkitError(
            f"{ref}: {origin[f'{ref}.{r.src_lang}']} has {len(src)} lines but "
            f"{origin[f'{ref}.{r.tgt_lang}']} has {len(tgt)}"
        )
    return src, tgt, origin


def _gather(
    ctx: RunContext, refs: Sequence[str], limit: int | None, origin: dict[str, str]
) -> tuple[list[str], list[str]]:
    """The pairs of ``refs`` one after another, at most ``limit`` in all; records their origin."""
    src: list[str] = []
    tgt: list[str] = []
    for ref in refs:
        left = None if limit is None else limit - len(src)
        if left is not None and left <= 0:
            break
        s, t, o = _read_pairs(ctx, ref, left)
        src += s
        tgt += t
        origin.update(o)
    return src, tgt


def stage_prepare(ctx: RunContext, resume: bool) -> dict[str, Any]:
    """Resolve every corpus file and write WORKDIR/raw/{train,valid,<test>}.<lang>."""
    r = ctx.recipe
    smoke = r.raw.get("smoke") or {}
    train_limit = smoke.get("train_lines") if r.smoke else None
    eval_limit = smoke.get("eval_lines") if r.smoke else None
    origin: dict[str, str] = {}
    train = _gather(ctx, r.train_refs, train_limit, origin)
    if r.holdout_every:  # every Nth pair as validation data (at most eval_limit)
        n = r.holdout_every
        valid = tuple([x for i, x in enumerate(side, 1) if not i % n][: eval_limit or None] for side in train)
        train = tuple([x for i, x in enumerate(side, 1) if i % n] for side in train)
    else:
        valid = _gather(ctx, r.valid_refs, eval_limit, origin)
    splits = {"train": train, "valid": valid}
    splits.update((t.name, _gather(ctx, t.refs, eval_limit, origin)) for t in r.tests)
    files: dict[str, dict[str, str]] = {}
    for name, (src, tgt) in splits.items():
        if not src:
            raise MtkitError(f"split '{name}' of recipe {r.name} is empty")
        suffix = ".gz" if name == "train" else ""
        files[name] = {}
        for lang, side in ((r.src_lang, src), (r.tgt_lang, tgt)):
            out = ctx.raw_dir / f"{name}.{lang}{suffix}"
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            with (gzip.open if suffix else open)(tmp, "wt", encoding="utf-8", newline="\n") as f:
                f.writelines(line + "\n" for line in side)
            tmp.replace(out)
            files[name][lang] = str(out)
        logger.info("prepare: %s = %d pairs", name, len(src))
    return {"files": files, "lines": {name: len(src) for name, (src, _) in splits.items()}, "sources": origin}


def stage_preprocess(ctx: RunContext, resume: bool) -> dict[str, Any]:
    from mtkit.data.preprocess import preprocess

    r = ctx.recipe
    manifest = preprocess(r.src_lang, r.tgt_lang, train_prefix=ctx.raw_dir / "train", out_dir=ctx.data_path,
                          valid_prefix=ctx.raw_dir / "valid", force=True,
                          test_prefixes=[ctx.raw_dir / t.name for t in r.tests], **r.section("preprocess"))
    keep = {k: manifest[k] for k in ("splits", "filters", "spm") if k in manifest}
    return {"data_dir": str(ctx.data_path), **json.loads(json.dumps(keep, default=str))}


def stage_train(ctx: RunContext, resume: bool) -> dict[str, Any]:
    from mtkit.checkpoint import LAST
    from mtkit.training.trainer import train

    last = ctx.save_dir / LAST
    summary = train(ctx.data_path, ctx.recipe.config, ctx.save_dir, resume=last.exists(), device=ctx.device)
    return json.loads(json.dumps(summary, default=str))


def stage_average(ctx: RunContext, resume: bool) -> dict[str, Any]:
    from mtkit.average import average_checkpoints, select_checkpoints

    avg = ctx.recipe.section("average")
    last, best = avg.get("last") or None, avg.get("best") or None
    if not last and not best:
        return {"skipped": "averaging is not configured"}
    paths = select_checkpoints(ctx.save_dir, last=last, best=None if last else best)
    if len(paths) < 2:
        return {"skipped": f"only {len(paths)} checkpoint(s) to average", "from": [str(p) for p in paths]}
    out = ctx.save_dir / "averaged.pt"
    average_checkpoints(paths, out)
    return {"checkpoint": str(out), "from": [str(p) for p in paths]}


def stage_translate(ctx: RunContext, resume: bool) -> dict[str, Any]:
    from mtkit.checkpoint import BEST, LAST
    from mtkit.decoding.translate import translate_file

    r = ctx.recipe
    # the averaged checkpoint where there is one, else the best, else the last
    averaged = (ctx.outputs.get("average") or {}).get("checkpoint")
    found = [Path(averaged)] if averaged and Path(averaged).exists() else []
    found += [ctx.save_dir / name for name in (BEST, LAST) if (ctx.save_dir / name).exists()]
    if not found:
        raise MtkitError(f"no checkpoint to translate with in {ctx.save_dir}; run the train stage")
    ckpt = found[0]
    ctx.hyp_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"checkpoint": str(ckpt), "tests": {}}
    for test in r.tests:
        hyp = ctx.hyp_dir / f"{test.name}.{r.tgt_lang}"
        stats = translate_file([str(ckpt)], str(ctx.raw_dir / f"{test.name}.{r.src_lang}"), str(hyp),
                               decode_cfg=r.config.decode, device=ctx.device, resume=resume and hyp.exists())
        out["tests"][test.name] = {"hyp": str(hyp), "stats": json.loads(json.dumps(stats, default=str))}
    return out


def stage_score(ctx: RunContext, resume: bool) -> dict[str, Any]:
    from mtkit.scoring import score_files

    r = ctx.recipe
    opts = r.section("score")
    published = [r.raw["reproduces"], *(r.raw.get("see_also") or [])]
    scores: dict[str, list[dict[str, Any]]] = {}
    metric_scores: dict[str, dict[str, dict[str, Any]]] = {}
    for test in r.tests:
        hyp = ctx.hyp_dir / f"{test.name}.{r.tgt_lang}"
        ref = ctx.raw_dir / f"{test.name}.{r.tgt_lang}"
        result = score_files(str(hyp), [str(ref)], metrics=tuple(opts.get("metrics", ["bleu"])),
                             tokenize=opts.get("tokenize"), lowercase=bool(opts.get("lowercase", False)),
                             split_compounds=bool(opts.get("compound_split", False)), lang=r.tgt_lang)
        scores[test.name] = json.loads(json.dumps(result, default=str))
        # BLEU by the published numbers' metrics on the same output and raw reference, sacreBLEU
        # always: {metric: {score, signature}}
        metric_scores[test.name] = {}
        names = [OUR_METRIC] + [p["metric"] for p in published if p["test_set"] == test.name]
        for name in dict.fromkeys(names):
            (d,) = score_files(str(hyp), [str(ref)], ["bleu"], lang=r.tgt_lang, width=2, **METRICS[name])
            metric_scores[test.name][name] = {"score": d["score"], "signature": d["signature"]}
    return write_run_report(ctx, scores, metric_scores)


def write_run_report(
    ctx: RunContext, scores: dict[str, list[dict[str, Any]]],
    metric_scores: dict[str, dict[str, dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Have :mod:`mtkit.report` write results.json, report.md and the curves of this run, given
    the run as the report takes it: the recipe's published numbers, what the stages did."""
    from mtkit.checkpoint import load_model
    from mtkit.models.base import num_parameters
    from mtkit.provenance import manifest_info

    r = ctx.recipe
    ckpt = (ctx.outputs.get("translate") or {}).get("checkpoint")
    parameters = None
    if ckpt:
        try:
            parameters = num_parameters(load_model(ckpt)[0])
        except (MtkitError, OSError, RuntimeError) as exc:
            logger.warning("could not count parameters of %s: %s", ckpt, exc)
    run = RecipeRun(
        recipe=r.name, recipe_file=str(r.path), smoke=r.smoke, src_lang=r.src_lang, tgt_lang=r.tgt_lang,
        reproduces=r.raw["reproduces"], see_also=list(r.raw.get("see_also") or []),
        test_lines=(ctx.outputs.get("prepare") or {}).get("lines", {}),
        training=ctx.outputs.get("train") or {},
        model={"arch": r.config.model.arch, "preset": r.raw.get("preset"), "parameters": parameters,
               "checkpoint": ckpt, "averaged_from": (ctx.outputs.get("average") or {}).get("from")},
        decode={k: getattr(r.config.decode, k) for k in ("beam", "length_penalty", "alpha")},
        stage_seconds=Markers(ctx.workdir).stage_seconds(),
        provenance={**ctx.provenance, "data": manifest_info(ctx.data_path)},
    )
    metrics_file = run.training.get("metrics_file") or ctx.save_dir / "metrics.jsonl"
    return write_report(run, ctx.workdir, scores, metric_scores, metrics_file=metrics_file)


STAGE_FUNCS: dict[str, Callable[[RunContext, bool], dict[str, Any]]] = {
    "prepare": stage_prepare, "preprocess": stage_preprocess, "train": stage_train,
    "average": stage_average, "translate": stage_translate, "score": stage_score,
}

"""Recipes: one YAML file that takes a named corpus to a scored, averaged model.

``run_recipe`` chains six stages, each a small function over a :class:`RunContext`::

    prepare -> preprocess -> train -> average -> translate -> score

Every stage records a marker ``WORKDIR/stages/<stage>.json``: ``{"status": "running"}`` when it
starts and ``{"status": "done", "outputs": ...}`` when it ends, together with the hash of
everything the stage (and the stages before it) read from the recipe. A rerun skips the stages
that are done with the same hash and starts at the first one that is not: a stage left
``running`` by an interruption is resumed (training continues from ``checkpoint_last.pt``); a
stage whose inputs changed is redone from scratch, and every stage that runs invalidates the
markers after it.

``--smoke`` swaps in the model family's ``*_tiny`` preset, a few updates, a small vocabulary
and the first few hundred lines of each corpus (generated text where no local copy exists), so
every stage runs in seconds without a download.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import hashlib
import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from mtkit import provenance
from mtkit.config import (
    PRESET_DIR,
    RECIPE_SECTIONS,
    Config,
    build_section,
    config_from_dict,
    load_raw_config,
    parse_override,
    read_yaml,
)
from mtkit.config_fields import ModelConfig
from mtkit.data.catalog import Catalog, SplitSource, load_catalog, resolve_file
from mtkit.errors import MtkitError, unknown_name
from mtkit.utils import atomic_write_text

logger = logging.getLogger("mtkit.recipes")

STAGES = ("prepare", "preprocess", "train", "average", "translate", "score")
CONFIG_SECTIONS = ("data", "model", "train", "decode")
# The metric a published number was computed with, as options of `mtkit score`: the report scores
# our output with the same metric and sets it beside the published number (and sacreBLEU beside it).
METRICS: dict[str, dict[str, Any]] = {
    "sacreBLEU": {},  # detokenized text, cased, sacrebleu's 13a tokenization
    "NIST BLEU": {},  # mteval-v13a on detokenized text, which sacreBLEU's defaults reproduce
    "tokenized BLEU": {"tokenize": "moses"},  # Moses tokenizer, cased, multi-bleu.perl's BLEU
    "tokenized BLEU, compound-split": {"tokenize": "moses", "split_compounds": True},  # a ##AT##-##AT## b
    "tokenized BLEU, lowercased": {"tokenize": "moses", "lowercase": True},
}

# --- the recipe schema: key -> one-line description (also the did-you-mean vocabulary) ---
TOP_KEYS = {
    "description": "free text",
    "reproduces": "the published number this recipe aims at",
    "see_also": "further published numbers (same keys as reproduces)",
    "src_lang": "source language code",
    "tgt_lang": "target language code",
    "corpora": "train / valid / test data as <dataset>/<split> names from the catalog",
    "preprocess": "options of mtkit preprocess",
    "preset": "built-in config preset the model/train/decode sections start from",
    "data": "config section data (merged over the preset)",
    "model": "config section model (merged over the preset)",
    "train": "config section train (merged over the preset)",
    "decode": "config section decode (merged over the preset)",
    "average": "checkpoint averaging: last N or best N",
    "score": "metrics and sacrebleu options for the test sets",
    "smoke": "overrides used only by --smoke",
}
REQUIRED = ("reproduces", "src_lang", "tgt_lang", "corpora")
REPRODUCES_KEYS = ("paper", "table", "metric", "value", "test_set", "note", "url")
CORPORA_KEYS = ("train", "valid", "test")


SMOKE_KEYS = ("preset", "model", "train", "decode", "preprocess", "train_lines", "eval_lines")

# --- what --smoke changes ---
SMOKE_TRAIN = {
    "max_updates": 12, "max_epochs": 0, "max_time_minutes": 0.0, "update_freq": 1,
    "max_tokens": 512, "warmup_updates": 4, "validate_interval_updates": 6,
    "save_interval_updates": 4, "keep_last": 3, "log_interval": 4,
    "valid_bleu_max_sentences": 10, "patience": 0, "num_threads": 1,
}
SMOKE_PREPROCESS = {"vocab_size": 128, "workers": 1}
SMOKE_TRAIN_LINES = 200
SMOKE_EVAL_LINES = 20


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Loading and validating


@dataclasses.dataclass
class TestSet:
    name: str
    refs: list[str]


@dataclasses.dataclass
class Recipe:
    """A validated recipe: the raw mapping (after overrides / smoke) and its resolved config."""

    name: str
    path: Path
    raw: dict[str, Any]
    config: Config
    smoke: bool
    train_refs: list[str]
    valid_refs: list[str]
    holdout_every: int
    tests: list[TestSet]

    @property
    def src_lang(self) -> str:
        return self.raw["src_lang"]

    @property
    def tgt_lang(self) -> str:
        return self.raw["tgt_lang"]

    def section(self, key: str) -> dict[str, Any]:
        return dict(self.raw.get(key) or {})

    def data_refs(self) -> list[str]:
        refs = self.train_refs + self.valid_refs + [r for t in self.tests for r in t.refs]
        return list(dict.fromkeys(refs))


def apply_recipe_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``key.sub=value`` items set keys of the recipe (``train.lr=5e-4``, ``average.last=3``)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise MtkitError(f"override '{item}' must look like key.sub=value")
        key, _, text = item.partition("=")
        parts = [p for p in key.strip().split(".")]
        if not all(parts):
            raise MtkitError(f"override key '{key}' must look like section.key (e.g. train.lr)")
        if len(parts) == 2 and parts[0] in CONFIG_SECTIONS:
            _, value = parse_override(item)  # the config's own typing rules
        else:
            try:
                value = yaml.safe_load(text) if text.strip() else ""
            except yaml.YAMLError:
                raise MtkitError(f"override '{item}': value is not valid YAML") from None
        node = raw
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise MtkitError(f"override '{item}': '{p}' is not a section")
            node = node[p]
        node[parts[-1]] = value
    return raw


def _check_keys(section: str, mapping: Any, keys: Sequence[str], where: str) -> dict[str, Any]:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise MtkitError(f"{where}: '{section}' must be a mapping")
    for key in mapping:
        if key not in keys:
            raise MtkitError(f"{where}: " + unknown_name("recipe key", f"{section}.{key}", [f"{section}.{k}" for k in keys]))
    return mapping


def _ref_list(value: Any, what: str, where: str, catalog: Catalog) -> list[str]:
    refs = [value] if isinstance(value, str) else value
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise MtkitError(f"{where}: {what} must be a <dataset>/<split> name or a non-empty list of them")
    for r in refs:
        catalog.split(r)
    return refs


def _check_reproduces(value: Any, key: str, where: str) -> None:
    rep = _check_keys(key, value, REPRODUCES_KEYS, where)
    for k in ("paper", "table", "metric", "test_set"):
        if not isinstance(rep.get(k), str) or not rep[k].strip():
            raise MtkitError(f"{where}: {key}.{k} is required (a string)")
    if rep["metric"] not in METRICS:
        valid = ", ".join(f"'{m}'" for m in METRICS)
        raise MtkitError(f"{where}: {key}.metric '{rep['metric']}' must be one of: {valid}")
    v = rep.get("value")
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise MtkitError(f"{where}: {key}.value must be a number (or null where the source gives none)")


def tiny_preset(preset: str | None, arch: str) -> str:
    """The ``*_tiny`` preset of a recipe's family: ``luong_small`` -> ``luong_tiny``, else ``<arch>_tiny``."""
    candidates = []
    if preset:
        stem = preset.rsplit("_", 1)[0] if "_" in preset else preset
        candidates.append(f"{stem}_tiny")
    candidates.append(f"{arch}_tiny")
    for name in candidates:
        if (PRESET_DIR / f"{name}.yaml").exists():
            return name
    raise MtkitError(f"no tiny preset for model.arch '{arch}' (looked for {', '.join(candidates)}.yaml)")


def _config_raw(raw: dict[str, Any]) -> dict[str, Any]:
    base = load_raw_config(raw["preset"]) if raw.get("preset") else {}
    over = {k: raw[k] for k in CONFIG_SECTIONS if raw.get(k)}
    if "arch" in (over.get("model") or {}) and over["model"]["arch"] != (base.get("model") or {}).get("arch"):
        base.pop("model", None)  # another family: the preset's model keys do not apply
    return _deep_merge(base, over)


def smoke_variant(raw: dict[str, Any]) -> dict[str, Any]:
    """The recipe as ``--smoke`` runs it: tiny model, few updates, small vocabulary."""
    raw = copy.deepcopy(raw)
    smoke = raw.pop("smoke", None) or {}
    full = _config_raw(raw)
    arch = (full.get("model") or {}).get("arch", "transformer")
    preset = smoke.get("preset") or tiny_preset(raw.get("preset"), arch)
    tiny = load_raw_config(preset)
    model = dict(tiny.get("model") or {})
    if model.get("arch", arch) == arch:  # keep the recipe's choices (strings, flags), not its sizes
        for key, value in (raw.get("model") or {}).items():
            if isinstance(value, (str, bool)):
                model[key] = value
    model.update(smoke.get("model") or {})
    train = _deep_merge(dict(tiny.get("train") or {}), SMOKE_TRAIN)
    train.update(smoke.get("train") or {})
    decode = dict(full.get("decode") or {})
    decode["beam"] = min(int(decode.get("beam", 2)), 2)
    decode.update(smoke.get("decode") or {})
    raw.update(preset=preset, model=model, train=train, decode=decode)
    raw["preprocess"] = {**(raw.get("preprocess") or {}), **SMOKE_PREPROCESS, **(smoke.get("preprocess") or {})}
    avg = dict(raw.get("average") or {})
    raw["average"] = {k: min(int(v), 2) for k, v in avg.items() if v}
    raw["smoke"] = {
        "train_lines": int(smoke.get("train_lines", SMOKE_TRAIN_LINES)),
        "eval_lines": int(smoke.get("eval_lines", SMOKE_EVAL_LINES)),
    }
    return raw


def validate(raw: dict[str, Any], where: str, catalog: Catalog | None = None) -> dict[str, Any]:
    """Check a recipe mapping; returns the parts the runner needs. Any problem: one-line error."""
    catalog = catalog or load_catalog()
    if not isinstance(raw, dict):
        raise MtkitError(f"{where}: a recipe must be a mapping")
    for key in raw:
        if key not in TOP_KEYS:
            raise MtkitError(f"{where}: " + unknown_name("recipe key", key, list(TOP_KEYS)))
    for key in REQUIRED:
        if raw.get(key) in (None, "", {}):
            raise MtkitError(f"{where}: recipe key '{key}' is required")
    for key in ("src_lang", "tgt_lang"):
        if not isinstance(raw[key], str):
            raise MtkitError(f"{where}: {key} must be a language code string")
    _check_reproduces(raw["reproduces"], "reproduces", where)
    see_also = raw.get("see_also") or []
    if not isinstance(see_also, list):
        raise MtkitError(f"{where}: see_also must be a list of mappings like reproduces")
    for i, item in enumerate(see_also):
        _check_reproduces(item, f"see_also[{i}]", where)

    corpora = _check_keys("corpora", raw["corpora"], CORPORA_KEYS, where)
    for k in CORPORA_KEYS:
        if k not in corpora:
            raise MtkitError(f"{where}: corpora.{k} is required")
    train_refs = _ref_list(corpora["train"], "corpora.train", where, catalog)
    holdout = 0
    if isinstance(corpora["valid"], dict):
        _check_keys("corpora.valid", corpora["valid"], ("holdout_every",), where)
        holdout = corpora["valid"].get("holdout_every")
        if isinstance(holdout, bool) or not isinstance(holdout, int) or holdout < 2:
            raise MtkitError(f"{where}: corpora.valid.holdout_every must be an integer >= 2")
        valid_refs: list[str] = []
    else:
        valid_refs = _ref_list(corpora["valid"], "corpora.valid", where, catalog)
    tests_raw = corpora["test"] if isinstance(corpora["test"], list) else [corpora["test"]]
    tests: list[TestSet] = []
    for item in tests_raw:
        if isinstance(item, str):
            tests.append(TestSet(catalog.split(item).name, [item]))
        elif isinstance(item, dict):
            _check_keys("corpora.test[]", item, ("name", "from"), where)
            if not isinstance(item.get("name"), str) or not item["name"]:
                raise MtkitError(f"{where}: a corpora.test entry needs a 'name'")
            tests.append(TestSet(item["name"], _ref_list(item.get("from"), f"corpora.test {item['name']}.from", where, catalog)))
        else:
            raise MtkitError(f"{where}: corpora.test entries are <dataset>/<split> names or {{name, from}} mappings")
    names = [t.name for t in tests]
    for name in names:
        if name in ("train", "valid") or names.count(name) > 1 or not name.replace("_", "").replace("-", "").isalnum():
            raise MtkitError(f"{where}: test set name '{name}' is reserved, repeated or not a plain name")
    for ref in train_refs + valid_refs + [r for t in tests for r in t.refs]:
        split = catalog.split(ref)
        for lang in (raw["src_lang"], raw["tgt_lang"]):
            if lang not in split.langs:
                raise MtkitError(f"{where}: {ref} has no '{lang}' side (languages: {', '.join(split.langs)})")
    for key, rep in [("reproduces", raw["reproduces"])] + [(f"see_also[{i}]", x) for i, x in enumerate(see_also)]:
        if rep["test_set"] not in names:
            raise MtkitError(f"{where}: {key}.test_set '{rep['test_set']}' is not one of the test sets ({', '.join(names)})")

    for key, cls in RECIPE_SECTIONS.items():
        try:
            build_section(cls, raw.get(key), key)
        except MtkitError as exc:
            raise MtkitError(f"{where}: {exc}") from None
    smoke = _check_keys("smoke", raw.get("smoke"), SMOKE_KEYS, where)
    for key in ("model", "train", "decode", "preprocess"):
        if key in smoke and not isinstance(smoke[key], dict):
            raise MtkitError(f"{where}: smoke.{key} must be a mapping")
    for key in CONFIG_SECTIONS:
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise MtkitError(f"{where}: '{key}' must be a mapping of config keys")
    if raw.get("preset") is not None and not isinstance(raw["preset"], str):
        raise MtkitError(f"{where}: preset must be a preset name")
    try:
        config = config_from_dict(_config_raw(raw))
    except MtkitError as exc:
        raise MtkitError(f"{where}: {exc}") from None
    return {"config": config, "train_refs": train_refs, "valid_refs": valid_refs, "holdout": holdout, "tests": tests}


def load_recipe(
    path: str | Path, overrides: Sequence[str] = (), smoke: bool = False, catalog: Catalog | None = None
) -> Recipe:
    """Read, override and validate a recipe (and, with ``smoke``, its smoke variant); ``path``
    may also be a shipped recipe's name (:func:`find_recipe`)."""
    path = find_recipe(path)
    catalog = catalog or load_catalog()
    raw = apply_recipe_overrides(read_yaml(path), overrides)
    parts = validate(raw, str(path), catalog)
    if smoke:
        raw = apply_recipe_overrides(smoke_variant(raw), overrides)
        parts = validate(raw, f"{path} (--smoke)", catalog)
    return Recipe(
        name=path.stem, path=path, raw=raw, config=parts["config"], smoke=smoke,
        train_refs=parts["train_refs"], valid_refs=parts["valid_refs"],
        holdout_every=parts["holdout"], tests=parts["tests"],
    )


def check_recipe(
    path: str | Path, overrides: Sequence[str] = (), data_dir: Any = None, smoke: bool = False
) -> dict[str, Any]:
    """Validate a recipe without running anything; says where each data file would come from."""
    from mtkit.data.catalog import resolution_plan

    catalog = load_catalog()
    recipe = load_recipe(path, overrides, smoke=smoke, catalog=catalog)
    if not smoke:
        load_recipe(path, overrides, smoke=True, catalog=catalog)  # the smoke variant must hold too
    files = [(ref, lang) for ref in recipe.data_refs() for lang in (recipe.src_lang, recipe.tgt_lang)]
    rep = recipe.raw["reproduces"]
    return {
        "recipe": recipe.name,
        "ok": True,
        "arch": recipe.config.model.arch,
        "preset": recipe.raw.get("preset"),
        "reproduces": f"{rep['paper']}, {rep['table']}: {rep.get('value')} {rep['metric']} on {rep['test_set']}",
        "tests": [t.name for t in recipe.tests],
        "data": resolution_plan(files, data_dir, catalog),
    }


# ---------------------------------------------------------------------------------------------
# The runner


@dataclasses.dataclass
class RunContext:
    recipe: Recipe
    workdir: Path
    data_dir: Any = None
    device: str = "auto"
    catalog: Catalog | None = None
    outputs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)  # of this run (mtkit.provenance)

    @property
    def raw_dir(self) -> Path:
        return self.workdir / "raw"

    @property
    def data_path(self) -> Path:
        return self.workdir / "data"

    @property
    def save_dir(self) -> Path:
        return self.workdir / "checkpoints"

    @property
    def hyp_dir(self) -> Path:
        return self.workdir / "translations"


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
        prev = hashes[stage] = _hash([prev, stage, own[stage]])
    return hashes


class Markers:
    """Completion markers: ``WORKDIR/stages/<stage>.json``, written atomically."""

    def __init__(self, workdir: Path):
        self.dir = workdir / "stages"

    def path(self, stage: str) -> Path:
        return self.dir / f"{stage}.json"

    def read(self, stage: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.path(stage).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            logger.warning("marker %s is unreadable; redoing stage %s", self.path(stage), stage)
            return None

    def write(self, stage: str, marker: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path(stage), json.dumps(marker, indent=1, default=str) + "\n")

    def remove(self, stage: str) -> None:
        self.path(stage).unlink(missing_ok=True)


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
            ends = part.split("-") if "-" in part else [part, part]
            for end in ends:
                if end not in STAGES:
                    raise MtkitError(unknown_name("stage", end, list(STAGES)))
            a, b = STAGES.index(ends[0]), STAGES.index(ends[-1])
            chosen.update(STAGES[min(a, b) : max(a, b) + 1])
    return [s for s in STAGES if s in chosen]


def run_recipe(
    path: str | Path,
    workdir: str | Path,
    stages: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    data_dir: Any = None,
    smoke: bool = False,
    device: str = "auto",
    force: bool = False,
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
        return _run_stages(ctx, selected, force)


def _run_stages(ctx: RunContext, selected: list[str], force: bool) -> dict[str, Any]:
    """The stage loop of :func:`run_recipe`."""
    workdir = ctx.workdir
    markers = Markers(workdir)
    hashes = stage_inputs(ctx.recipe)
    report: dict[str, Any] = {"workdir": str(workdir), "stages": {}}
    t_start = time.monotonic()
    for stage in STAGES:
        marker = markers.read(stage)
        current = marker is not None and marker.get("inputs") == hashes[stage]
        done = current and marker.get("status") == "done"
        if stage not in selected:
            if done:
                ctx.outputs[stage] = marker.get("outputs") or {}
            elif any(STAGES.index(s) > STAGES.index(stage) for s in selected):
                raise MtkitError(
                    f"stage '{stage}' has not finished in {workdir} (with this recipe), so the stages "
                    f"after it cannot run yet; add it to --stages or run without --stages"
                )
            report["stages"][stage] = "not selected"
            continue
        if done and not force:
            logger.info("stage %s: done earlier, skipping (%s)", stage, markers.path(stage))
            ctx.outputs[stage] = marker.get("outputs") or {}
            report["stages"][stage] = "skipped (done)"
            continue
        resume = current and not force  # interrupted earlier with the same inputs
        if not resume:
            _clean(ctx, stage)
        for later in STAGES[STAGES.index(stage) + 1 :]:
            markers.remove(later)
        started = _now()
        markers.write(stage, {"stage": stage, "status": "running", "inputs": hashes[stage], "started": started})
        logger.info("stage %s: %s", stage, "resuming" if resume else "running")
        t0 = time.monotonic()
        outputs = STAGE_FUNCS[stage](ctx, resume)
        seconds = round(time.monotonic() - t0, 2)
        ctx.outputs[stage] = outputs
        markers.write(stage, {
            "stage": stage, "status": "done", "inputs": hashes[stage], "started": started,
            "finished": _now(), "seconds": seconds, "resumed": resume, "outputs": outputs,
        })
        report["stages"][stage] = f"{'resumed' if resume else 'ran'} ({seconds:.1f} s)"
        logger.info("stage %s: done in %.1f s", stage, seconds)
    report["seconds"] = round(time.monotonic() - t_start, 2)
    if "score" in ctx.outputs:
        report["results"] = ctx.outputs["score"].get("results")
        report["report"] = ctx.outputs["score"].get("report")
    return report


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


# ---------------------------------------------------------------------------------------------
# Stages


def _open_text(path: Path) -> Iterator[str]:
    from mtkit.data.text import iter_lines

    yield from iter_lines(path)


def generated_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Deterministic toy parallel text (a word-for-word cipher with reordering) for smoke runs."""
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
    split: SplitSource = ctx.catalog.split(ref)
    r = ctx.recipe
    sides, origin = {}, {}
    try:
        for lang in (r.src_lang, r.tgt_lang):
            path = resolve_file(split, lang, ctx.data_dir, allow_download=not r.smoke)
            lines = []
            for i, line in enumerate(_open_text(path)):
                if limit is not None and i >= limit:
                    break
                lines.append(line)
            sides[lang], origin[f"{ref}.{lang}"] = lines, str(path)
    except MtkitError as exc:
        if not r.smoke:
            raise
        logger.warning("smoke: %s; using generated text for %s", exc, ref)
        pairs = generated_pairs(limit or SMOKE_TRAIN_LINES, seed=int(_hash(ref), 16) % 10_000)
        sides = {r.src_lang: [p[0] for p in pairs], r.tgt_lang: [p[1] for p in pairs]}
        origin = {f"{ref}.{lang}": "generated" for lang in (r.src_lang, r.tgt_lang)}
    src, tgt = sides[r.src_lang], sides[r.tgt_lang]
    if len(src) != len(tgt):
        raise MtkitError(
            f"{ref}: {origin[f'{ref}.{r.src_lang}']} has {len(src)} lines but "
            f"{origin[f'{ref}.{r.tgt_lang}']} has {len(tgt)}"
        )
    return src, tgt, origin


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(tmp, "wt", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")
    tmp.replace(path)


def stage_prepare(ctx: RunContext, resume: bool) -> dict[str, Any]:
    """Resolve every corpus file and write WORKDIR/raw/{train,valid,<test>}.<lang>."""
    r = ctx.recipe
    smoke = r.raw.get("smoke") or {}
    train_limit = smoke.get("train_lines") if r.smoke else None
    eval_limit = smoke.get("eval_lines") if r.smoke else None
    origin: dict[str, str] = {}
    lines: dict[str, int] = {}

    def gather(refs: Sequence[str], limit: int | None) -> tuple[list[str], list[str]]:
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

    train_src, train_tgt = gather(r.train_refs, None if train_limit is None else train_limit)
    if r.holdout_every:
        n = r.holdout_every
        valid_src = [x for i, x in enumerate(train_src, 1) if i % n == 0]
        valid_tgt = [x for i, x in enumerate(train_tgt, 1) if i % n == 0]
        train_src = [x for i, x in enumerate(train_src, 1) if i % n]
        train_tgt = [x for i, x in enumerate(train_tgt, 1) if i % n]
        if eval_limit:
            valid_src, valid_tgt = valid_src[:eval_limit], valid_tgt[:eval_limit]
    else:
        valid_src, valid_tgt = gather(r.valid_refs, eval_limit)
    splits = {"train": (train_src, train_tgt), "valid": (valid_src, valid_tgt)}
    for test in r.tests:
        splits[test.name] = gather(test.refs, eval_limit)
    files: dict[str, dict[str, str]] = {}
    for name, (src, tgt) in splits.items():
        if not src:
            raise MtkitError(f"split '{name}' of recipe {r.name} is empty")
        suffix = ".gz" if name == "train" else ""
        files[name] = {}
        for lang, side in ((r.src_lang, src), (r.tgt_lang, tgt)):
            out = ctx.raw_dir / f"{name}.{lang}{suffix}"
            _write_lines(out, side)
            files[name][lang] = str(out)
        lines[name] = len(src)
        logger.info("prepare: %s = %d pairs", name, len(src))
    return {"files": files, "lines": lines, "sources": origin}


def stage_preprocess(ctx: RunContext, resume: bool) -> dict[str, Any]:
    from mtkit.data.preprocess import preprocess

    r = ctx.recipe
    manifest = preprocess(
        r.src_lang, r.tgt_lang,
        train_prefix=ctx.raw_dir / "train",
        out_dir=ctx.data_path,
        valid_prefix=ctx.raw_dir / "valid",
        test_prefixes=[ctx.raw_dir / t.name for t in r.tests],
        force=True,
        **r.section("preprocess"),
    )
    keep = {k: manifest[k] for k in ("splits", "filters", "spm") if k in manifest}
    return {"data_dir": str(ctx.data_path), **json.loads(json.dumps(keep, default=str))}


def stage_train(ctx: RunContext, resume: bool) -> dict[str, Any]:
    from mtkit.training.trainer import train

    last = ctx.save_dir / "checkpoint_last.pt"
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


def translation_checkpoint(ctx: RunContext) -> Path:
    """The averaged checkpoint where there is one, else the best, else the last."""
    averaged = (ctx.outputs.get("average") or {}).get("checkpoint")
    if averaged and Path(averaged).exists():
        return Path(averaged)
    for name in ("checkpoint_best.pt", "checkpoint_last.pt"):
        if (ctx.save_dir / name).exists():
            return ctx.save_dir / name
    raise MtkitError(f"no checkpoint to translate with in {ctx.save_dir}; run the train stage")


def stage_translate(ctx: RunContext, resume: bool) -> dict[str, Any]:
    from mtkit.decoding.translate import translate_file

    r = ctx.recipe
    ckpt = translation_checkpoint(ctx)
    ctx.hyp_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"checkpoint": str(ckpt), "tests": {}}
    for test in r.tests:
        hyp = ctx.hyp_dir / f"{test.name}.{r.tgt_lang}"
        stats = translate_file(
            [str(ckpt)], str(ctx.raw_dir / f"{test.name}.{r.src_lang}"), str(hyp),
            decode_cfg=r.config.decode, device=ctx.device, resume=resume and hyp.exists(),
        )
        out["tests"][test.name] = {"hyp": str(hyp), "stats": json.loads(json.dumps(stats, default=str))}
    return out


def published_metric_scores(hyp: str | Path, ref: str | Path, lang: str, metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """BLEU of ``hyp`` against ``ref`` by each named published metric: ``{metric: {score, signature}}``."""
    from mtkit.scoring import score_files

    out = {}
    for name in metrics:
        (d,) = score_files(str(hyp), [str(ref)], ["bleu"], lang=lang, width=2, **METRICS[name])
        out[name] = {"score": d["score"], "signature": d["signature"]}
    return out


def stage_score(ctx: RunContext, resume: bool) -> dict[str, Any]:
    from mtkit.report import OUR_METRIC, write_report
    from mtkit.scoring import score_files

    r = ctx.recipe
    opts = r.section("score")
    published = [r.raw["reproduces"], *(r.raw.get("see_also") or [])]
    scores: dict[str, list[dict[str, Any]]] = {}
    metric_scores: dict[str, dict[str, dict[str, Any]]] = {}
    for test in r.tests:
        hyp = ctx.hyp_dir / f"{test.name}.{r.tgt_lang}"
        ref = ctx.raw_dir / f"{test.name}.{r.tgt_lang}"
        result = score_files(
            str(hyp), [str(ref)], metrics=tuple(opts.get("metrics", ["bleu"])),
            tokenize=opts.get("tokenize"), lowercase=bool(opts.get("lowercase", False)),
            split_compounds=bool(opts.get("compound_split", False)), lang=r.tgt_lang,
        )
        scores[test.name] = json.loads(json.dumps(result, default=str))
        # the published numbers' metrics on the same output and raw reference, sacreBLEU always
        names = dict.fromkeys([OUR_METRIC] + [p["metric"] for p in published if p["test_set"] == test.name])
        metric_scores[test.name] = published_metric_scores(hyp, ref, r.tgt_lang, list(names))
    return write_report(ctx, scores, metric_scores)


STAGE_FUNCS: dict[str, Callable[[RunContext, bool], dict[str, Any]]] = {
    "prepare": stage_prepare,
    "preprocess": stage_preprocess,
    "train": stage_train,
    "average": stage_average,
    "translate": stage_translate,
    "score": stage_score,
}


RECIPE_DIR = Path(__file__).with_name("recipes_data")  # the recipes shipped inside the package


def recipe_paths(directory: str | Path | None = None) -> list[Path]:
    """The recipes shipped with mtkit (package data, also in a plain ``pip install``)."""
    return sorted(Path(directory or RECIPE_DIR).glob("*.yaml"))


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: an existing path, or a shipped recipe by name. ``recipes/NAME.yaml`` (the
    place the recipes had in a source checkout) names the shipped recipe when no such file exists."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.stem if path.suffix in (".yaml", ".yml") and path.parent.name in ("", "recipes") else str(name_or_path)
    shipped = RECIPE_DIR / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    if path.parent.name not in ("", "recipes") or path.exists():
        raise MtkitError(f"recipe file not found: {path}")
    raise MtkitError(unknown_name("recipe", name, [p.stem for p in recipe_paths()]))


def list_recipes() -> list[dict[str, Any]]:
    """Name, languages, model family and the cited number of every shipped recipe."""
    rows = []
    for path in recipe_paths():
        raw = read_yaml(path)
        rep = raw.get("reproduces") or {}
        arch = ((_config_raw(raw).get("model") or {}).get("arch")) or ModelConfig.arch
        rows.append({
            "name": path.stem, "src_lang": raw.get("src_lang"), "tgt_lang": raw.get("tgt_lang"), "arch": arch,
            "preset": raw.get("preset"), "value": rep.get("value"), "metric": rep.get("metric"),
            "test_set": rep.get("test_set"), "paper": rep.get("paper"),
        })
    return rows


def format_recipe_list(rows: list[dict[str, Any]]) -> str:
    width = max((len(r["name"]) for r in rows), default=4)
    lines = [f"{'recipe':<{width}}  pair   model          cites"]
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:g}"
        lines.append(f"{r['name']:<{width}}  {r['src_lang']}-{r['tgt_lang']}  {r['arch']:<13}  "
                     f"{value} {r['metric']} on {r['test_set']}")
    return "\n".join(lines)

"""The recipe schema: its YAML keys (the recipe's own ``preprocess``, ``average`` and ``score``
sections are checked by the config's field rules, :mod:`mtkit.config_fields`), the published metrics
it may cite, and validation: :func:`validate` checks a recipe mapping (after ``--set`` overrides) and
resolves it into a :class:`Recipe`; any problem is one :class:`~mtkit.errors.MtkitError` line naming
the file."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtkit.config import Config, apply_overrides, build_section, config_from_dict, load_raw_config
from mtkit.config_fields import Section, any_value, choice, choices_list, number
from mtkit.data.catalog import Catalog, load_catalog
from mtkit.errors import MtkitError, unknown_name

# sacrebleu's BLEU tokenizers (a test holds this list equal to sacrebleu's own)
BLEU_TOKENIZERS = ("none", "zh", "13a", "intl", "char", "ja-mecab", "ko-mecab", "spm", "flores101", "flores200", "spBLEU-1K")
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


@dataclasses.dataclass
class PreprocessSection(Section):
    """The recipe's ``preprocess`` keys: the options of ``mtkit preprocess`` (same defaults)."""

    vocab_size: int = number(8000, low=8)
    model_type: str = choice("bpe", "bpe", "unigram")
    joint: bool = True
    character_coverage: float = number(1.0, low=0, low_open=True, high=1)
    user_defined_symbols: list[str] | None = any_value(None)  # extra sentencepiece pieces, kept whole
    max_len: int = number(250, low=1)
    max_ratio: float = number(3.0, low=1)
    dedup: bool = False
    workers: int = number(2, low=1)


@dataclasses.dataclass
class AverageSection(Section):
    """The recipe's ``average`` keys: average the last N numbered checkpoints, or the best N."""

    last: int | None = number(None, low=0)
    best: int | None = number(None, low=0)

    def check(self, section: str) -> None:
        if self.last and self.best:
            raise MtkitError(f"give one of {section}.last and {section}.best, not both")


@dataclasses.dataclass
class ScoreSection(Section):
    """The recipe's ``score`` keys: which metrics, and the options of ``mtkit score`` for BLEU."""

    metrics: list[str] = choices_list(lambda: ["bleu"], "bleu", "chrf", "ter")
    tokenize: str | None = choice(None, *BLEU_TOKENIZERS, "moses")  # moses: Moses tokens, then BLEU
    lowercase: bool = False
    compound_split: bool = False  # a-b -> a ##AT##-##AT## b before BLEU (tokenize moses or none)

    def check(self, section: str) -> None:
        if "bleu" not in self.metrics:
            raise MtkitError(f"{section}.metrics must include bleu (the number the report compares)")
        if self.compound_split and self.tokenize not in ("moses", "none"):
            raise MtkitError(f"{section}.compound_split needs {section}.tokenize moses or none (tokenized text)")


RECIPE_SECTIONS = {"preprocess": PreprocessSection, "average": AverageSection, "score": ScoreSection}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``over`` merged in, nested mappings key by key."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


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
    return apply_overrides(raw, overrides, depth=None)


def config_raw(raw: dict[str, Any]) -> dict[str, Any]:
    """The recipe's config mapping: its preset with the recipe's config sections merged over it."""
    base = load_raw_config(raw["preset"]) if raw.get("preset") else {}
    over = {k: raw[k] for k in CONFIG_SECTIONS if raw.get(k)}
    if "arch" in (over.get("model") or {}) and over["model"]["arch"] != (base.get("model") or {}).get("arch"):
        base.pop("model", None)  # another family: the preset's model keys do not apply
    return deep_merge(base, over)


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


def _check_top(raw: Any, where: str) -> list[Any]:
    """The top-level keys and the published numbers; returns ``see_also`` as a list."""
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
    return see_also


def _check_tests(value: Any, where: str, catalog: Catalog) -> list[TestSet]:
    items = value if isinstance(value, list) else [value]
    tests: list[TestSet] = []
    for item in items:
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
    return tests


def _check_corpora(raw: dict[str, Any], see_also: list[Any], where: str, catalog: Catalog) -> tuple[list[str], list[str], int, list[TestSet]]:
    """``corpora``: (train refs, valid refs, holdout_every, test sets), each with both languages."""
    corpora = _check_keys("corpora", raw["corpora"], CORPORA_KEYS, where)
    for k in CORPORA_KEYS:
        if k not in corpora:
            raise MtkitError(f"{where}: corpora.{k} is required")
    train_refs = _ref_list(corpora["train"], "corpora.train", where, catalog)
    valid = corpora["valid"]  # catalog splits, or {holdout_every: N}: every Nth training pair
    valid_refs, holdout = [], 0
    if isinstance(valid, dict):
        holdout = _check_keys("corpora.valid", valid, ("holdout_every",), where).get("holdout_every")
        if isinstance(holdout, bool) or not isinstance(holdout, int) or holdout < 2:
            raise MtkitError(f"{where}: corpora.valid.holdout_every must be an integer >= 2")
    else:
        valid_refs = _ref_list(valid, "corpora.valid", where, catalog)
    tests = _check_tests(corpora["test"], where, catalog)
    names = [t.name for t in tests]
    for ref in train_refs + valid_refs + [r for t in tests for r in t.refs]:
        split = catalog.split(ref)
        for lang in (raw["src_lang"], raw["tgt_lang"]):
            if lang not in split.langs:
                raise MtkitError(f"{where}: {ref} has no '{lang}' side (languages: {', '.join(split.langs)})")
    for key, rep in [("reproduces", raw["reproduces"])] + [(f"see_also[{i}]", x) for i, x in enumerate(see_also)]:
        if rep["test_set"] not in names:
            raise MtkitError(f"{where}: {key}.test_set '{rep['test_set']}' is not one of the test sets ({', '.join(names)})")
    return train_refs, valid_refs, holdout, tests


def _check_sections(raw: dict[str, Any], where: str) -> Config:
    """The recipe-only sections, the ``smoke`` block, the config sections; returns the config."""
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
        return config_from_dict(config_raw(raw))
    except MtkitError as exc:
        raise MtkitError(f"{where}: {exc}") from None


def validate(raw: dict[str, Any], path: Path, catalog: Catalog | None = None, smoke: bool = False) -> Recipe:
    """Check a recipe mapping (``smoke``: its smoke variant) read from ``path``; any problem is a
    one-line error naming the file."""
    catalog = catalog or load_catalog()
    where = f"{path} (--smoke)" if smoke else str(path)
    see_also = _check_top(raw, where)
    train_refs, valid_refs, holdout, tests = _check_corpora(raw, see_also, where, catalog)
    return Recipe(name=path.stem, path=path, raw=raw, config=_check_sections(raw, where), smoke=smoke,
                  train_refs=train_refs, valid_refs=valid_refs, holdout_every=holdout, tests=tests)

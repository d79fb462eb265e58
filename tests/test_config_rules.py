"""Every config value is checked on load: a walk over every key of every preset and recipe.

For each key the bad values come from the field's own rule (``metadata["rule"]``) and type, so a
key added without a rule fails ``test_every_field_has_a_rule`` and is walked here once it has one.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

import pytest

from mtkit.config import (
    LENGTH_PENALTIES,
    LR_SCHEDULERS,
    OPTIMIZERS,
    SECTIONS,
    STOPPING,
    TIME_DECAYS,
    load_raw_config,
    model_config_class,
    preset_names,
)
from mtkit.config_fields import field_rule
from mtkit.models import MODELS
from mtkit.recipes.load import recipe_paths
from mtkit.recipes.schema import BLEU_TOKENIZERS, RECIPE_SECTIONS, config_raw
from tests.helpers import cli, error_line

RECIPES = recipe_paths()


def section_classes() -> list[tuple[str, type]]:
    out = [(name, cls) for name, cls in SECTIONS.items()] + list(RECIPE_SECTIONS.items())
    return out + [("model", family.Config) for family in MODELS.values()]


def test_every_field_has_a_rule():
    """A new key needs a rule (or an explicit any_value); only a bool's type says it all."""
    for section, cls in section_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] is not bool:
                assert field_rule(f) is not None, f"{cls.__name__}.{f.name} ({section}) has no rule"


def test_choice_lists_match_the_code_that_uses_them():
    from sacrebleu.metrics import BLEU

    from mtkit import scoring_metrics
    from mtkit.decoding import penalties
    from mtkit.models.lstm import RNN_CLASSES
    from mtkit.training.builders import OPTIMIZER_CLASSES

    assert set(BLEU_TOKENIZERS) == set(BLEU.TOKENIZERS)
    score_tokenize = {f.name: f for f in dataclasses.fields(RECIPE_SECTIONS["score"])}["tokenize"]
    assert set(field_rule(score_tokenize).choices) == set(scoring_metrics.TOKENIZERS) == set(BLEU.TOKENIZERS) | {"moses"}
    assert set(OPTIMIZERS) == set(OPTIMIZER_CLASSES)
    from mtkit.training import schedule

    assert set(LENGTH_PENALTIES) == set(penalties.LENGTH_PENALTIES)
    assert set(STOPPING) == {"full", "first"}
    assert set(TIME_DECAYS) == {"none", "linear", "cosine"} and schedule.time_factor("linear", 0.5) == 0.5
    for name in LR_SCHEDULERS:
        assert hasattr(schedule, name), name
    for family in MODELS.values():
        cell = {f.name: f for f in dataclasses.fields(family.Config)}.get("cell")
        if cell is not None:
            assert set(field_rule(cell).choices) == set(RNN_CLASSES)


def bad_values(cls: type, name: str) -> list[tuple[str, str]]:
    """(what, YAML text) of values the field must refuse: wrong type, out of range, unknown choice."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    tp, rule = typing.get_type_hints(cls)[name], field_rule(f)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp
    is_list = typing.get_origin(base) is list
    item = typing.get_args(base)[0] if is_list else base
    wrap = (lambda v: f"[{v}, {v}]") if is_list else (lambda v: v)
    out = [("type", "3" if is_list else ("7" if item is str else "maybe"))]
    if rule is None or rule.any:
        return out
    if rule.choices:
        out.append(("choice", wrap(rule.choices[0] + "x")))
        return out
    if item is float:
        out.append(("nan", wrap(".nan")))
    if rule.low is not None:
        low = rule.low if rule.low_open else rule.low - (1 if item is int else 0.5)
        out.append(("low", wrap(str(int(low) if item is int else low))))
    if rule.high is not None:
        high = rule.high if rule.high_open else rule.high + (1 if item is int else 0.5)
        out.append(("high", wrap(str(int(high) if item is int else high))))
    if rule.length:
        out.append(("length", "[" + ", ".join(["0.5"] * (rule.length + 1)) + "]"))
    return out


def config_cases(raw: dict) -> list[tuple[str, str, str]]:
    """(section, key, bad YAML) for every key of the four config sections of a merged config."""
    arch = (raw.get("model") or {}).get("arch", "transformer")
    classes = {**SECTIONS, "model": model_config_class(arch)}
    cases = []
    for section, cls in classes.items():
        for f in dataclasses.fields(cls):
            if f.name == "arch":
                cases += [(section, "arch", f"{arch}x"), (section, "arch", "7")]
                continue
            cases += [(section, f.name, text) for _, text in bad_values(cls, f.name)]
    return cases


def check_refused(res, key: str) -> None:
    assert res.exit_code == 1, (key, res.exit_code, res.stdout, res.stderr)
    line = error_line(res.stderr, res.exit_code, key)
    assert "not allowed" in line or "expected" in line or "unknown" in line or "needs" in line, line


@pytest.mark.parametrize("preset", preset_names())
def test_every_key_of_every_preset_refuses_bad_values(preset, tmp_path):
    raw = load_raw_config(preset)
    for section, key, text in config_cases(raw):
        save = tmp_path / "run"
        res = cli(["-q", "train", tmp_path / "no-data", "-c", preset, "--save-dir", save, "--set", f"{section}.{key}={text}"])
        check_refused(res, f"{section}.{key}")
        assert not save.exists(), f"{section}.{key}={text} wrote {save}"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_key_of_every_recipe_refuses_bad_values(recipe):
    from mtkit.config import read_yaml

    raw = read_yaml(recipe)
    cases = config_cases(config_raw(raw))
    for section, cls in RECIPE_SECTIONS.items():
        cases += [(section, f.name, text) for f in dataclasses.fields(cls) for _, text in bad_values(cls, f.name)]
    for section, key, text in cases:
        res = cli(["-q", "recipe", "check", recipe, "--set", f"{section}.{key}={text}"])
        check_refused(res, f"{section}.{key}")


def test_valid_presets_and_recipes_load():
    from mtkit.config import load_config

    for preset in preset_names():
        assert load_config(preset).model.arch in MODELS
    for recipe in RECIPES:
        res = cli(["-q", "recipe", "check", recipe])
        assert res.exit_code == 0, (recipe, res.stderr)


def test_did_you_mean_for_choices(tmp_path):
    res = cli(["-q", "train", tmp_path, "-c", "transformer_tiny", "--save-dir", tmp_path / "s", "--set", "train.optimizer=sgdd"])
    line = error_line(res.stderr, res.exit_code, "train.optimizer", "'sgdd'", "one of adam, adamw")
    assert res.exit_code == 1 and "did you mean" not in line  # nothing close: the choices are listed
    res = cli(["-q", "train", tmp_path, "-c", "transformer_tiny", "--save-dir", tmp_path / "s", "--set", "train.optimizer=adamm"])
    assert "did you mean 'adam'?" in error_line(res.stderr, res.exit_code, "train.optimizer", "'adamm'")
    res = cli(["-q", "recipe", "check", RECIPES[0], "--set", "train.amp=bf17"])
    assert "did you mean 'bf16'" in error_line(res.stderr, res.exit_code, "train.amp", "'bf17'")


def test_lr_minus_one_is_one_line_not_a_traceback(tmp_path):
    res = cli(["-q", "train", tmp_path, "-c", "transformer_tiny", "--save-dir", tmp_path / "s", "--set", "train.lr=-1"])
    assert res.exit_code == 1
    assert error_line(res.stderr, res.exit_code, "train.lr", "-1", ">= 0")
    assert not (tmp_path / "s").exists()


def test_recipe_run_refuses_before_any_stage(tmp_path):
    work = tmp_path / "work"
    res = cli(["-q", "recipe", "run", RECIPES[0], "--workdir", work, "--set", "train.optimizer=sgdd"])
    error_line(res.stderr, res.exit_code, "train.optimizer")
    assert res.exit_code == 1 and not work.exists()


@pytest.mark.parametrize("option,value,key", [
    ("--beam", "0", "decode.beam"), ("--alpha", "nan", "decode.alpha"), ("--max-len-a", "-1", "decode.max_len_a"),
    ("--nbest", "0", "decode.nbest"), ("--max-tokens", "0", "decode.max_tokens"),
])
def test_translate_options_checked_before_loading(tmp_path, option, value, key):
    """The checkpoint does not exist: the option's error comes first, so nothing was loaded."""
    out = tmp_path / "out.txt"
    res = cli(["-q", "translate", "-m", tmp_path / "missing.pt", "-o", out, option, value], input="a b\n")
    error_line(res.stderr, res.exit_code, key)
    assert res.exit_code == 1 and not out.exists()


def test_time_decay_needs_a_budget():
    from mtkit.config import load_config
    from mtkit.errors import MtkitError

    with pytest.raises(MtkitError, match="train.time_decay.*max_time_minutes"):
        load_config("transformer_tiny", ["train.time_decay=linear"])
    assert load_config("transformer_tiny", ["train.time_decay=linear", "train.max_time_minutes=1"])


def test_nan_never_passes_even_without_bounds():
    from mtkit.config import config_from_dict
    from mtkit.errors import MtkitError

    with pytest.raises(MtkitError, match="model.forget_bias"):
        config_from_dict({"model": {"arch": "lstm", "forget_bias": math.nan}})

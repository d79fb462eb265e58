"""The ``--smoke`` variant of a recipe: a small preset's model (:func:`smoke_preset`), a few updates,
a small vocabulary and the first few hundred lines of each corpus (generated text where no local copy
exists), so that every stage runs in seconds without a download. The recipe's ``smoke:`` block
(``smoke.preset`` first of all) may override any part of it."""

from __future__ import annotations

import copy
from typing import Any

from mtkit.config import load_raw_config
from mtkit.errors import MtkitError
from mtkit.recipes.schema import config_raw, deep_merge

# Every built-in preset -> the preset its recipes run as under --smoke (small presets: themselves).
SMOKE_PRESETS: dict[str, str] = {
    "transformer_small": "transformer_tiny", "transformer_base": "transformer_tiny",
    "transformer_big": "transformer_tiny", "transformer_tiny": "transformer_tiny",
    "lstm_small": "lstm_tiny", "sutskever2014": "lstm_tiny", "lstm_tiny": "lstm_tiny",
    "lstm_gru_tiny": "lstm_gru_tiny",
    "bahdanau_small": "bahdanau_tiny", "bahdanau2015": "bahdanau_tiny", "bahdanau_tiny": "bahdanau_tiny",
    "bahdanau_gru_tiny": "bahdanau_gru_tiny",
    "luong_small": "luong_tiny", "luong2015": "luong_tiny", "luong_tiny": "luong_tiny",
    "luong_concat_tiny": "luong_concat_tiny", "luong_dot_tiny": "luong_dot_tiny",
    "luong_local_m_tiny": "luong_local_m_tiny", "luong_local_p_tiny": "luong_local_p_tiny",
    "gnmt_small": "gnmt_tiny", "gnmt_wu2016": "gnmt_tiny", "gnmt_tiny": "gnmt_tiny",
    "gnmt_gru_tiny": "gnmt_gru_tiny",
}
# A model family -> its small preset, for a recipe whose preset is not above (or that has none).
FAMILY_SMOKE_PRESETS: dict[str, str] = {
    "transformer": "transformer_tiny", "lstm": "lstm_tiny",
    "rnn_attention": "bahdanau_tiny", "gnmt": "gnmt_tiny",
}

SMOKE_TRAIN = {
    "max_updates": 12, "max_epochs": 0, "max_time_minutes": 0.0, "update_freq": 1,
    "max_tokens": 512, "warmup_updates": 4, "validate_interval_updates": 6,
    "save_interval_updates": 4, "keep_last": 3, "log_interval": 4,
    "valid_bleu_max_sentences": 10, "patience": 0, "num_threads": 1,
}
SMOKE_PREPROCESS = {"vocab_size": 128, "workers": 1}
SMOKE_TRAIN_LINES = 200
SMOKE_EVAL_LINES = 20


def smoke_preset(preset: str | None, arch: str) -> str:
    """The small preset a recipe with ``preset`` and model family ``arch`` runs as under --smoke."""
    if preset in SMOKE_PRESETS:
        return SMOKE_PRESETS[preset]
    if arch in FAMILY_SMOKE_PRESETS:
        return FAMILY_SMOKE_PRESETS[arch]
    raise MtkitError(f"no smoke preset for model.arch '{arch}'; name one in the recipe's smoke.preset")


def smoke_variant(raw: dict[str, Any]) -> dict[str, Any]:
    """The recipe as ``--smoke`` runs it: tiny model, few updates, small vocabulary."""
    raw = copy.deepcopy(raw)
    smoke = raw.pop("smoke", None) or {}
    full = config_raw(raw)
    arch = (full.get("model") or {}).get("arch", "transformer")
    preset = smoke.get("preset") or smoke_preset(raw.get("preset"), arch)
    tiny = load_raw_config(preset)
    model = dict(tiny.get("model") or {})  # the small preset's model
    if model.get("arch", arch) == arch:  # same family: keep the recipe's choices (strings, flags), not sizes
        model.update({k: v for k, v in (raw.get("model") or {}).items() if isinstance(v, (str, bool))})
    model.update(smoke.get("model") or {})
    train = deep_merge(dict(tiny.get("train") or {}), SMOKE_TRAIN)
    train.update(smoke.get("train") or {})
    decode = dict(full.get("decode") or {})
    decode["beam"] = min(int(decode.get("beam", 2)), 2)
    decode.update(smoke.get("decode") or {})
    raw.update(preset=preset, model=model, train=train, decode=decode)
    raw["preprocess"] = {**(raw.get("preprocess") or {}), **SMOKE_PREPROCESS, **(smoke.get("preprocess") or {})}
    raw["average"] = {k: min(int(v), 2) for k, v in (raw.get("average") or {}).items() if v}
    raw["smoke"] = {
        "train_lines": int(smoke.get("train_lines", SMOKE_TRAIN_LINES)),
        "eval_lines": int(smoke.get("eval_lines", SMOKE_EVAL_LINES)),
    }
    return raw

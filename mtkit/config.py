"""Typed configuration: nested dataclasses loaded from YAML, with dotted ``--set`` overrides.

The YAML sections mirror the dataclasses (``data``, ``model``, ``train``, ``decode``). The
``model`` section is validated against the config class of the family named by ``model.arch``
(each ``models/<family>.py`` defines its own ``Config`` subclass of :class:`ModelConfig`).
An unknown key anywhere is an error that names the closest valid key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtkit.errors import MtkitError

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class DataConfig:
    max_src_len: int = 256  # subword tokens; longer training pairs are skipped, longer inputs truncated
    max_tgt_len: int = 256


@dataclass
class ModelConfig:
    """Base of every family's model config; ``arch`` selects the family in ``MODELS``."""

    arch: str = "transformer"

    @property
    def width(self) -> int:
        """The model's width (d_model of the noam schedule): each family names its own."""
        raise NotImplementedError


@dataclass
class TrainConfig:
    seed: int = 1
    max_tokens: int = 4096  # token budget of one batch (max of source/target tokens incl. padding)
    max_sentences: int = 0  # 0 = no limit on sentences per batch
    update_freq: int = 1  # gradient accumulation steps per update
    # forward/backward each batch in runs of at most this many padded tokens, gradients summed:
    # the same update in less activation memory (and heap fragmentation on a CPU); 0 = whole batches
    pass_tokens: int = 0
    max_updates: int = 0  # 0 = no limit
    max_epochs: int = 0  # 0 = no limit
    max_time_minutes: float = 0.0  # wall-clock budget, 0 = no limit
    optimizer: str = "adam"
    lr: float = 5e-4
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    adam_eps: float = 1e-9
    weight_decay: float = 0.0
    lr_scheduler: str = "inverse_sqrt"  # inverse_sqrt | noam | constant
    time_decay: str = "none"  # none | linear | cosine: lr x a factor reaching 0 at max_time_minutes
    warmup_updates: int = 4000
    warmup_init_lr: float = 1e-7
    noam_factor: float = 2.0  # noam: lr = factor * d_model^-0.5 * min(t^-0.5, t * warmup^-1.5)
    clip_norm: float = 0.0  # 0 = no clipping
    label_smoothing: float = 0.1
    amp: str = "auto"  # auto (bf16 on CUDA, none on CPU) | none | bf16 | fp16 (fp16: CUDA only)
    num_threads: int = 0  # torch intra-op threads on CPU, 0 = torch default
    # CPU: when the process RSS exceeds this many GiB between updates, hand the allocator's free
    # memory back to the OS (glibc malloc_trim; caps heap fragmentation, costs page faults); 0 = never
    trim_memory_gib: float = 0.0
    log_interval: int = 50
    validate_interval_updates: int = 1000  # 0 = validate at the end of each epoch only
    valid_bleu: bool = True
    valid_bleu_max_sentences: int = 0  # 0 = whole valid set
    early_stop_metric: str = "bleu"  # bleu | loss
    patience: int = 0  # validations without improvement before stopping, 0 = never
    save_interval_updates: int = 1000
    keep_last: int = 5
    max_bad_updates: int = 5  # consecutive NaN/inf updates before training stops


@dataclass
class DecodeConfig:
    beam: int = 5
    nbest: int = 1
    max_len_a: float = 1.5  # max output length = a * source length + b
    max_len_b: int = 10
    min_len: int = 1
    length_penalty: str = "gnmt"  # none | average | gnmt
    alpha: float = 0.6  # GNMT length-penalty exponent
    beta: float = 0.0  # GNMT coverage-penalty weight
    no_repeat_ngram: int = 0
    # when a sentence's beam search ends: "full" once beam-size hypotheses are finished;
    # "first" once its best-scoring extension is EOS and nbest are finished (fewer steps)
    stopping: str = "full"
    batch_size: int = 0  # sentences per batch, 0 = use max_tokens
    max_tokens: int = 4000


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "train": TrainConfig, "decode": DecodeConfig}


def model_config_class(arch: str) -> type[ModelConfig]:
    from mtkit.models import MODELS  # local import: models import this module

    if arch not in MODELS:
        raise MtkitError(_unknown("model.arch value", arch, list(MODELS)))
    return MODELS[arch].Config


def _unknown(what: str, name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(sorted(valid))}"
    return f"unknown {what} '{name}'{hint}"


def _type_check(value: Any, tp: Any, key: str) -> Any:
    """Check (and lightly coerce) a YAML value against a dataclass field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _type_check(value, arg, key)
            except MtkitError:
                pass
        raise MtkitError(f"config key '{key}': value {value!r} does not have type {tp}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise MtkitError(f"config key '{key}': expected a list, got {value!r}")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_type_check(v, arg, key) for v in value]
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "5e-4" as a string
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise MtkitError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise MtkitError(f"config key '{key}': expected an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise MtkitError(f"config key '{key}': expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    if not isinstance(values, dict):
        raise MtkitError(f"config section '{section}' must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise MtkitError(_unknown("config key", f"{section}.{key}", [f"{section}.{k}" for k in fields]))
        kwargs[key] = _type_check(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a validated :class:`Config` from a plain nested dict (YAML or checkpoint)."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise MtkitError("a config must be a mapping of sections (data, model, train, decode)")
    for section in raw:
        if section not in ("data", "model", "train", "decode"):
            raise MtkitError(_unknown("config section", section, ["data", "model", "train", "decode"]))
    model_raw = dict(raw.get("model") or {})
    arch = model_raw.get("arch", ModelConfig.arch)
    cfg = Config(
        data=_build(DataConfig, raw.get("data") or {}, "data"),
        model=_build(model_config_class(arch), model_raw, "model"),
        train=_build(TrainConfig, raw.get("train") or {}, "train"),
        decode=_build(DecodeConfig, raw.get("decode") or {}, "decode"),
    )
    return cfg


def parse_override(item: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], yaml-typed value)."""
    if "=" not in item:
        raise MtkitError(f"override '{item}' must look like section.key=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise MtkitError(f"override key '{key}' must look like section.key (e.g. train.lr)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise MtkitError(f"override '{item}': value is not valid YAML ({exc.__class__.__name__})") from None
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    raw = copy.deepcopy(raw or {})
    for item in overrides:
        (section, key), value = parse_override(item)
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        raw[section][key] = value
    return raw


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MtkitError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise MtkitError(f"config path is a directory, not a file: {path}") from None
    except UnicodeDecodeError as exc:
        raise MtkitError(f"config file {path} is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise MtkitError(f"config file {path}{where}: invalid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MtkitError(f"config file {path} must hold a mapping of sections")
    return data


def load_raw_config(name_or_path: str | Path | None) -> dict[str, Any]:
    """Read a YAML file, or a built-in preset by name (e.g. ``transformer_small``)."""
    if name_or_path is None:
        return {}
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return read_yaml(path)
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return read_yaml(preset)
    raise MtkitError(_unknown("config file or preset", str(name_or_path), preset_names()))


def load_config(name_or_path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset or YAML file, apply ``section.key=value`` overrides, validate."""
    return config_from_dict(apply_overrides(load_raw_config(name_or_path), overrides))

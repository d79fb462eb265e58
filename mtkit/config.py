"""Typed configuration: nested dataclasses loaded from YAML, with dotted ``--set`` overrides.

The YAML sections mirror the dataclasses (``data``, ``model``, ``train``, ``decode``); ``model`` is
checked against the family named by ``model.arch`` (each ``models/<family>.py`` defines its own
``Config`` subclass of :class:`ModelConfig`). An unknown key (with the closest valid one) or a value
that breaks its field's rule (:mod:`mtkit.config_fields`) or its section's ``check()`` is one
``error:`` line naming the key, before any work."""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtkit.config_fields import ModelConfig, Section, any_value, check_field, choice, number
from mtkit.errors import MtkitError, unknown_name

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class DataConfig(Section):
    # subword tokens; longer training pairs are skipped, longer inputs truncated
    max_src_len: int = number(256, low=1)
    max_tgt_len: int = number(256, low=1)


OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULERS = ("inverse_sqrt", "noam", "constant")
TIME_DECAYS = ("none", "linear", "cosine")
AMP_MODES = ("auto", "none", "bf16", "fp16")
LENGTH_PENALTIES = ("none", "average", "gnmt")
STOPPING = ("full", "first")


@dataclass
class TrainConfig(Section):
    seed: int = any_value(1)
    max_tokens: int = number(4096, low=1)  # token budget of one batch (max of source/target tokens incl. padding)
    max_sentences: int = number(0, low=0)  # 0 = no limit on sentences per batch
    update_freq: int = number(1, low=1)  # gradient accumulation steps per update
    # forward/backward each batch in runs of at most this many padded tokens, gradients summed:
    # the same update in less activation memory (and heap fragmentation on a CPU); 0 = whole batches
    pass_tokens: int = number(0, low=0)
    max_updates: int = number(0, low=0)  # 0 = no limit
    max_epochs: int = number(0, low=0)  # 0 = no limit
    max_time_minutes: float = number(0.0, low=0)  # wall-clock budget, 0 = no limit
    optimizer: str = choice("adam", *OPTIMIZERS)
    lr: float = number(5e-4, low=0)  # 0 keeps the weights (a frozen run)
    adam_betas: list[float] = number(factory=lambda: [0.9, 0.98], low=0, high=1, high_open=True, length=2)
    adam_eps: float = number(1e-9, low=0, low_open=True)
    weight_decay: float = number(0.0, low=0)
    lr_scheduler: str = choice("inverse_sqrt", *LR_SCHEDULERS)
    time_decay: str = choice("none", *TIME_DECAYS)  # lr x a factor reaching 0 at max_time_minutes
    warmup_updates: int = number(4000, low=0)
    warmup_init_lr: float = number(1e-7, low=0)
    noam_factor: float = number(2.0, low=0, low_open=True)  # noam: lr = factor * d_model^-0.5 * min(t^-0.5, t * warmup^-1.5)
    clip_norm: float = number(0.0, low=0)  # 0 = no clipping
    label_smoothing: float = number(0.1, low=0, high=1, high_open=True)
    amp: str = choice("auto", *AMP_MODES)  # auto (bf16 on CUDA, none on CPU) | none | bf16 (CPU: float32 without bf16 instructions) | fp16 (CUDA only)
    num_threads: int = number(0, low=0)  # torch intra-op threads on CPU, 0 = torch default
    # CPU: when the process RSS exceeds this many GiB between updates, hand the allocator's free
    # memory back to the OS (glibc malloc_trim; caps heap fragmentation, costs page faults); 0 = never
    trim_memory_gib: float = number(0.0, low=0)
    log_interval: int = number(50, low=1)
    validate_interval_updates: int = number(1000, low=0)  # 0 = validate at the end of each epoch only
    valid_bleu: bool = True
    valid_bleu_max_sentences: int = number(0, low=0)  # 0 = whole valid set
    early_stop_metric: str = choice("bleu", "bleu", "loss")
    patience: int = number(0, low=0)  # validations without improvement before stopping, 0 = never
    save_interval_updates: int = number(1000, low=0)  # 0 = at validations and the end only
    keep_last: int = number(5, low=0)
    max_bad_updates: int = number(5, low=1)  # consecutive NaN/inf updates before training stops
    # TensorBoard event files of the metrics.jsonl records (needs the tensorboard package); "" = off
    tensorboard_dir: str = any_value("")

    def check(self, section: str) -> None:
        if self.time_decay != "none" and self.max_time_minutes <= 0:
            raise MtkitError(
                f"config key '{section}.time_decay': '{self.time_decay}' needs a time budget; "
                f"set {section}.max_time_minutes > 0"
            )


@dataclass
class DecodeConfig(Section):
    beam: int = number(5, low=1)
    nbest: int = number(1, low=1)
    max_len_a: float = number(1.5, low=0)  # max output length = a * source length + b
    max_len_b: int = number(10, low=0)
    min_len: int = number(1, low=0)
    length_penalty: str = choice("gnmt", *LENGTH_PENALTIES)
    alpha: float = number(0.6, low=0)  # GNMT length-penalty exponent
    beta: float = number(0.0, low=0)  # GNMT coverage-penalty weight
    no_repeat_ngram: int = number(0, low=0)
    # when a sentence's beam search ends: "full" once beam-size hypotheses are finished;
    # "first" once its best-scoring extension is EOS and nbest are finished (fewer steps)
    stopping: str = choice("full", *STOPPING)
    batch_size: int = number(0, low=0)  # sentences per batch, 0 = use max_tokens
    max_tokens: int = number(4000, low=1)

    def check_for_search(self, sampling: bool = False) -> DecodeConfig:
        """Check a decode config assembled from a checkpoint and overrides, once before decoding:
        every field's rule, then ``nbest`` <= ``beam`` unless ``sampling`` (any number of samples)."""
        check_section(self, "decode")
        if not sampling and self.nbest > self.beam:
            raise MtkitError(f"nbest ({self.nbest}) cannot exceed the beam size ({self.beam})")
        return self


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "train": TrainConfig, "decode": DecodeConfig}
CONFIG_SECTIONS = ("data", "model", "train", "decode")


def model_config_class(arch: str) -> type[ModelConfig]:
    from mtkit.models import MODELS  # imported when a model section is read: it loads torch

    if not isinstance(arch, str):
        raise MtkitError(f"config key 'model.arch': expected a family name, got {arch!r}")
    if arch not in MODELS:
        raise MtkitError(unknown_name("model.arch value", arch, sorted(MODELS)))
    return MODELS[arch].Config


def _type_check(value: Any, tp: Any, key: str) -> Any:
    """Check (and lightly coerce) a YAML value against a dataclass field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        optional = type(None) in args
        if value is None and optional:
            return None
        kinds = [arg for arg in args if arg is not type(None)]
        for arg in kinds:
            try:
                return _type_check(value, arg, key)
            except MtkitError:
                pass
        names = " or ".join(getattr(arg, "__name__", str(arg)) for arg in kinds)
        raise MtkitError(f"config key '{key}': expected {names}{' or null' if optional else ''}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise MtkitError(f"config key '{key}': expected a list, got {value!r}")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_type_check(v, arg, key) for v in value]
    if tp is Any:
        return value
    if tp is float and (isinstance(value, str) or isinstance(value, int) and not isinstance(value, bool)):
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


def _checked_value(cls: type, key: str, value: Any, section: str) -> Any:
    """``value`` type-checked (and lightly coerced) for field ``key`` of ``cls``; an unknown key is an error."""
    names = [f.name for f in dataclasses.fields(cls)]
    if key not in names:
        raise MtkitError(unknown_name("config key", f"{section}.{key}", sorted(f"{section}.{k}" for k in names)))
    return _type_check(value, typing.get_type_hints(cls)[key], f"{section}.{key}")


def build_section(cls: type, values: dict[str, Any] | None, section: str) -> Any:
    """A section dataclass from a YAML mapping: unknown keys, types, each field's rule, ``check()``."""
    values = values or {}
    if not isinstance(values, dict):
        raise MtkitError(f"config section '{section}' must be a mapping, got {values!r}")
    return check_section(cls(**{k: _checked_value(cls, k, v, section) for k, v in values.items()}), section)


def check_values(cls: type, values: dict[str, Any], section: str) -> None:
    """Check some keys of a section on their own (command-line options, before any loading)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        check_field(fields[key], _checked_value(cls, key, value, section), f"{section}.{key}")


def check_section(obj: Any, section: str) -> Any:
    """Apply every field's rule and the section's ``check()`` to a built section; returns it."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key, value = f"{section}.{f.name}", getattr(obj, f.name)
        _type_check(value, hints[f.name], key)
        check_field(f, value, key)
    if isinstance(obj, Section):
        obj.check(section)
    return obj


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a validated :class:`Config` from a plain nested dict (YAML or checkpoint)."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise MtkitError("a config must be a mapping of sections (data, model, train, decode)")
    for section in raw:
        if section not in CONFIG_SECTIONS:
            raise MtkitError(unknown_name("config section", section, sorted(CONFIG_SECTIONS)))
    model_raw = dict(raw.get("model") or {})
    return Config(
        data=build_section(DataConfig, raw.get("data"), "data"),
        model=build_section(model_config_class(model_raw.get("arch", ModelConfig.arch)), model_raw, "model"),
        train=build_section(TrainConfig, raw.get("train"), "train"),
        decode=build_section(DecodeConfig, raw.get("decode"), "decode"),
    )


def parse_override(item: str, depth: int | None = 2) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], yaml-typed value); ``depth``: how many dotted
    parts the key must have (None: any number, e.g. a recipe's ``average.last=3``)."""
    if "=" not in item:
        raise MtkitError(f"override '{item}' must look like section.key=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts) or (depth is not None and len(parts) != depth):
        raise MtkitError(f"override key '{key}' must look like section.key (e.g. train.lr)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise MtkitError(f"override '{item}': value is not valid YAML ({exc.__class__.__name__})") from None
    return parts, value


def set_override(raw: dict[str, Any], parts: list[str], value: Any, item: str) -> None:
    """Set ``raw[parts[0]][parts[1]]... = value``, making missing (or null) sections."""
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise MtkitError(f"override '{item}': '{part}' is not a section")
        node = node[part]
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], depth: int | None = 2) -> dict[str, Any]:
    """A copy of ``raw`` with each ``section.key=value`` item set (``depth``: as in :func:`parse_override`)."""
    raw = copy.deepcopy(raw or {})
    for item in overrides:
        set_override(raw, *parse_override(item, depth), item)
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
    raise MtkitError(unknown_name("config file or preset", str(name_or_path), sorted(preset_names())))


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML, every key: ``load_config`` of it gives ``cfg`` back."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def preset_descriptions() -> dict[str, str]:
    """Each built-in preset's description: the first sentence of its leading comment, whole."""
    out = {}
    for name in preset_names():
        words: list[str] = []
        for line in (PRESET_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines():
            if not line.startswith("#"):
                break
            words += line.lstrip("#").split()
        text = " ".join(words)
        end = text.find(". ")  # the first sentence (an abbreviation such as "et al." may end it early)
        while end != -1 and text[: end + 1].endswith(("al.", "e.g.", "i.e.")):
            end = text.find(". ", end + 1)
        out[name] = text if end == -1 else text[: end + 1]
    return out


def load_config(name_or_path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset or YAML file, apply ``section.key=value`` overrides, validate."""
    return config_from_dict(apply_overrides(load_raw_config(name_or_path), overrides))

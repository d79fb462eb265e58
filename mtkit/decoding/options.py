"""The options of a translation run besides the decode config: what they are, their checks,
and the decode config they resolve to."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from mtkit.config import DecodeConfig, check_values
from mtkit.decoding.search import SamplingOptions
from mtkit.errors import MtkitError

INPUT_FORMATS = ("text", "pieces", "ids")
OUTPUT_UNITS = ("text", "pieces", "ids")
ALIGNMENTS = ("none", "argmax", "full")

@dataclass
class Options:
    """Everything besides the decode config that shapes a translation run."""

    batch_size: int | None = None  # sentences per batch; overrides decode.batch_size
    max_tokens: int | None = None  # source-token budget per batch; overrides decode.max_tokens
    input_format: str = "text"  # text | pieces (space-separated) | ids (space-separated)
    output_units: str = "text"  # text | pieces | ids (hypotheses in text/nbest/jsonl output)
    alignment: str = "argmax"  # jsonl: none | argmax (per target token) | full (attention matrix)
    errors: str = "strict"  # invalid UTF-8 input: strict (error with line number) | replace
    plot_attention: str | None = None  # directory for one heatmap PNG per sentence
    buffer_lines: int = 10000
    sampling: bool = False
    temperature: float = 1.0
    topk: int = 0
    topp: float = 1.0
    seed: int | None = None
    decode_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    engine: str = "torch"
    dtype: str = "float32"  # torch engine: float32 | bfloat16 | float16 (CUDA) weights and activations


def make_options(options: dict[str, Any]) -> Options:
    """:class:`Options` from keyword arguments (an unknown key is an error), checked on what the
    options alone decide, before any model is loaded."""
    fields = {f.name for f in dataclasses.fields(Options)}
    for key in options:
        if key not in fields:
            raise MtkitError(f"unknown translate option '{key}'")
    opts = Options(**options)
    limits = {"max_tokens": opts.max_tokens} if opts.max_tokens is not None else {}
    check_values(DecodeConfig, {**opts.decode_overrides, **limits}, "decode")
    for name, value, valid in (
        ("input format", opts.input_format, INPUT_FORMATS),
        ("output units", opts.output_units, OUTPUT_UNITS),
        ("alignment", opts.alignment, ALIGNMENTS),
        ("errors", opts.errors, ("strict", "replace")),
    ):
        if value not in valid:
            raise MtkitError(f"unknown {name} '{value}'; valid: {', '.join(valid)}")
    if opts.engine not in ("torch", "ctranslate2"):
        raise MtkitError(f"unknown engine '{opts.engine}'; valid: torch, ctranslate2")
    if opts.batch_size is not None and opts.batch_size <= 0:
        raise MtkitError(f"batch size must be at least 1, got {opts.batch_size}")
    if opts.buffer_lines <= 0:
        raise MtkitError(f"buffer lines must be at least 1, got {opts.buffer_lines}")
    sampling_options(opts, torch.device("cpu"))  # SamplingOptions check themselves when made
    return opts


def sampling_options(opts: Options, device: torch.device) -> SamplingOptions | None:
    """The options' sampling settings (None: search), their generator seeded on ``device``."""
    if not opts.sampling:
        return None
    gen = None if opts.seed is None else torch.Generator(device=device).manual_seed(opts.seed)
    return SamplingOptions(opts.temperature, opts.topk, opts.topp, gen)


def resolve_decode_config(base: DecodeConfig, decode_cfg: DecodeConfig | None, opts: Options) -> DecodeConfig:
    """The run's decode config: ``decode_cfg`` (else the checkpoint's) with the options applied,
    checked once, here."""
    overrides = dict(opts.decode_overrides)
    if opts.batch_size is not None or opts.max_tokens is not None:  # a token budget alone: no sentence count
        overrides["batch_size"] = opts.batch_size if opts.batch_size is not None else 0
    if opts.max_tokens is not None:
        overrides["max_tokens"] = opts.max_tokens
    cfg = decode_cfg if decode_cfg is not None else base
    return dataclasses.replace(cfg, **overrides).check_for_search(sampling=opts.sampling)

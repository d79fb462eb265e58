"""What a translation run reads: its options besides the decode config (their checks, the decode
config they resolve to), its lines as source ids, and input that arrives over time (piped or typed
lines are handed on when the producer pauses)."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import queue
import stat
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtkit.config import DecodeConfig, check_values
from mtkit.data.subword import SubwordModel
from mtkit.decoding.search import SamplingOptions
from mtkit.errors import MtkitError

logger = logging.getLogger("mtkit.translate")

PAUSE_S = 0.05  # a gap in piped or typed input this long ends the buffer: what is read gets translated
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
    unknown = [key for key in options if key not in {f.name for f in dataclasses.fields(Options)}]
    if unknown:
        raise MtkitError(f"unknown translate option '{unknown[0]}'")
    opts = Options(**options)
    limits = {"max_tokens": opts.max_tokens} if opts.max_tokens is not None else {}
    check_values(DecodeConfig, {**opts.decode_overrides, **limits}, "decode")
    for name, value, valid in (
        ("input format", opts.input_format, INPUT_FORMATS),
        ("output units", opts.output_units, OUTPUT_UNITS),
        ("alignment", opts.alignment, ALIGNMENTS),
        ("errors", opts.errors, ("strict", "replace")),
        ("engine", opts.engine, ("torch", "ctranslate2")),
    ):
        if value not in valid:
            raise MtkitError(f"unknown {name} '{value}'; valid: {', '.join(valid)}")
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


def is_stream(path: str | Path) -> bool:
    """Whether input arrives over time (a pipe, FIFO or terminal) rather than from a regular file."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode if str(path) == "-" else os.stat(path).st_mode
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False  # e.g. a stdin replaced by an in-memory stream
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)


def paced(lines: Iterator[str], pause: float = PAUSE_S, queued: int = 100_000) -> Iterator[str | None]:
    """``lines`` read by a background thread, with ``None`` yielded whenever no next line has
    arrived for ``pause`` seconds (once per gap); errors of the reader are raised in order."""
    items: queue.Queue = queue.Queue(maxsize=queued)
    end = object()

    def read() -> None:
        try:
            for line in lines:
                items.put(line)
            items.put(end)
        except BaseException as exc:  # handed to the consumer, in order
            items.put(exc)

    threading.Thread(target=read, name="mtkit-input", daemon=True).start()
    while True:
        try:
            item = items.get(timeout=pause)
        except queue.Empty:
            yield None
            item = items.get()
        if item is end:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def encode_source(
    line: str, lineno: int, spm: SubwordModel, max_src_len: int | None, fmt: str, name: str, stats: dict[str, Any]
) -> list[int]:
    """One input line in format ``fmt`` (text, pieces, ids) as source ids (empty for a blank line),
    truncated to the model's limit of ``max_src_len`` tokens with EOS (counted in ``stats["truncated"]``)."""
    if not line.strip():
        ids: list[int] = []
    elif fmt == "text":
        ids = spm.encode([line])[0]
    elif fmt == "pieces":
        ids = [spm.sp.piece_to_id(p) for p in line.split()]
    else:
        try:
            ids = [int(x) for x in line.split()]
        except ValueError:
            raise MtkitError(f"{name} line {lineno}: expected space-separated token ids") from None
        bad = [i for i in ids if not 0 <= i < spm.size]
        if bad:
            raise MtkitError(f"{name} line {lineno}: token id {bad[0]} outside the vocabulary (size {spm.size})")
    if max_src_len is not None and len(ids) + 1 > max_src_len:
        logger.warning("%s line %d: %d tokens, truncated to the model limit of %d", name, lineno,
                       len(ids), max_src_len - 1)
        ids = ids[: max_src_len - 1]
        stats["truncated"] += 1
    return ids

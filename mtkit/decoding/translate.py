"""Streaming, order-preserving translation of a file or stdin with one or more checkpoints.

Input is read in buffers of ``buffer_lines`` lines; each buffer is encoded with the checkpoint's
source sentencepiece model, sorted by length, cut into batches (sentences or a source-token
budget), decoded, and written back in input order as soon as a prefix of lines is complete. A
large file therefore never sits in memory, and every input line gives exactly one output line
(``nbest``: one or more lines ``id ||| hypothesis ||| F0= log-prob ||| score`` per input line,
the Moses/Marian form that rerankers read; empty input lines give empty output).

Input from a pipe or a terminal is read by a background thread: when no new line arrives for
``PAUSE_S`` seconds, the lines already read are translated and written at once, so a person
typing, a script waiting for each answer or a slow producer get every line back in about the time
its decoding takes; input that flows fills whole buffers as before. Regular files (also as
``< file`` on stdin) are read directly.

``resume=True`` continues a partly written output file: its complete lines are kept (a trailing
partial line or, for n-best output, the last sentence's group is dropped), as many input lines
are skipped, and the rest is appended.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import queue
import stat
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtkit.config import DecodeConfig, check_values
from mtkit.data.batching import collate_source
from mtkit.data.subword import SubwordModel
from mtkit.data.text import display_name, iter_lines, open_binary, open_output
from mtkit.decoding import search
from mtkit.decoding.search import Hypothesis, SamplingOptions
from mtkit.devices import torch_device
from mtkit.errors import MtkitError
from mtkit.models.base import Seq2Seq
from mtkit.signals import term_as_interrupt
from mtkit.utils import progress

logger = logging.getLogger("mtkit.translate")

INPUT_FORMATS = ("text", "pieces", "ids")
OUTPUT_FORMATS = ("text", "nbest", "jsonl")
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


PAUSE_S = 0.05  # a gap in piped or typed input this long ends the buffer: what is read gets translated


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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
@dataclass
class Translator:
    """Loaded models (an ensemble shares its vocabularies) and how to feed them."""

    models: list[Seq2Seq]
    src_spm: SubwordModel
    tgt_spm: SubwordModel
    cfg: DecodeConfig
    max_src_len: int | None
    device: torch.device

    @classmethod
    def load(
        cls, model_paths: str | Path | Sequence[str | Path], device: str | torch.device = "auto", dtype: str = "float32"
    ) -> Translator:
        """Load checkpoints (several: an ensemble) onto ``device`` (auto, cpu, cuda), weights
        cast to ``dtype`` (float32, bfloat16, float16 on CUDA)."""
        from mtkit.checkpoint import load_model

        if isinstance(model_paths, (str, Path)):
            model_paths = [model_paths]
        if not model_paths:
            raise MtkitError("no checkpoint given (-m CKPT)")
        device = torch_device(device)
        if dtype not in DTYPES:  # before loading the checkpoints
            raise MtkitError(f"unknown dtype '{dtype}'; valid: {', '.join(DTYPES)}")
        if dtype == "float16" and device.type == "cpu":
            raise MtkitError("--dtype float16 needs a CUDA device; on a CPU use bfloat16")
        models, first = [], None
        limits: list[int] = []
        for path in model_paths:
            model, cfg, src_spm, tgt_spm = load_model(path, device)
            model.to(DTYPES[dtype])  # log-probs and search scores stay float32
            if first is None:
                first = (path, cfg, src_spm, tgt_spm)
            elif (src_spm.sha256, tgt_spm.sha256) != (first[2].sha256, first[3].sha256):
                raise MtkitError(f"ensemble checkpoints {first[0]} and {path} have different vocabularies")
            models.append(model)
            if cfg.data.max_src_len:
                limits.append(cfg.data.max_src_len)
            if model.max_positions() is not None:
                limits.append(int(model.max_positions()))
        assert first is not None
        _, cfg, src_spm, tgt_spm = first
        return cls(models, src_spm, tgt_spm, cfg.decode, min(limits) if limits else None, device)

    def translate(
        self, sentences: Sequence[str], nbest: int = 1, **options: Any
    ) -> list[str] | list[list[tuple[str, float]]]:
        """Translate sentences as ``mtkit translate`` does (same batches, same search): one string
        per sentence, or with ``nbest`` > 1 a list of (hypothesis, score) per sentence, best first.

        ``options``: decode keys (``beam``, ``length_penalty``, ``alpha``, ``max_len_a``, ...) and
        the fields of :class:`Options` (``batch_size``, ``max_tokens``, ``sampling``, ``seed``, ...).
        """
        decode_keys = {f.name for f in dataclasses.fields(DecodeConfig)} - {"batch_size", "max_tokens"}
        overrides = {k: options.pop(k) for k in list(options) if k in decode_keys and options[k] is not None}
        opts = make_options({**options, "decode_overrides": {**overrides, "nbest": nbest}})
        cfg = resolve_decode_config(self.cfg, None, opts)
        search.check_config(cfg, sampling_options(opts, torch.device("cpu")))
        decoder = Decoder(self, cfg, sampling_options(opts, self.device), attention=False)
        fmt = Formatter(self, "text", opts.output_units, "none")
        stats = new_stats()
        out: list[Any] = []
        for start in range(0, len(sentences), opts.buffer_lines):
            buffer = [(i, encode_source(line, i + 1, self, opts, "input", stats))
                      for i, line in enumerate(sentences[start : start + opts.buffer_lines], start)]
            for rec in _translate_buffer(buffer, cfg, decoder, stats):
                if nbest > 1:
                    out.append([(fmt.hyp_text(h), h.score) for h in rec.hyps])
                else:
                    out.append(fmt.hyp_text(rec.hyps[0]) if rec.hyps else "")
        return out


def make_options(options: dict[str, Any]) -> Options:
    """:class:`Options` from keyword arguments, checked (an unknown key is an error)."""
    valid = {f.name for f in dataclasses.fields(Options)}
    for key in options:
        if key not in valid:
            raise MtkitError(f"unknown translate option '{key}'")
    opts = Options(**options)
    check_options(opts)
    return opts


def check_options(opts: Options) -> None:
    """What the options alone decide, before any model is loaded."""
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
    sampling = sampling_options(opts, torch.device("cpu"))
    if sampling is not None:
        search.check_sampling(sampling)


def sampling_options(opts: Options, device: torch.device) -> SamplingOptions | None:
    if not opts.sampling:
        return None
    gen = None
    if opts.seed is not None:
        gen = torch.Generator(device=device).manual_seed(opts.seed)
    return SamplingOptions(opts.temperature, opts.topk, opts.topp, gen)


def resolve_decode_config(base: DecodeConfig, decode_cfg: DecodeConfig | None, opts: Options) -> DecodeConfig:
    cfg = decode_cfg if decode_cfg is not None else base
    cfg = dataclasses.replace(cfg, **opts.decode_overrides)
    if opts.batch_size is not None:
        cfg = dataclasses.replace(cfg, batch_size=opts.batch_size)
    elif opts.max_tokens is not None:
        cfg = dataclasses.replace(cfg, batch_size=0)
    if opts.max_tokens is not None:
        cfg = dataclasses.replace(cfg, max_tokens=opts.max_tokens)
    return cfg


# ---------------------------------------------------------------------------------------------
def encode_line(line: str, lineno: int, tr: Translator, fmt: str, name: str) -> list[int]:
    if fmt == "text":
        return tr.src_spm.encode([line])[0]
    if fmt == "pieces":
        return [tr.src_spm.sp.piece_to_id(p) for p in line.split()]
    try:
        ids = [int(x) for x in line.split()]
    except ValueError:
        raise MtkitError(f"{name} line {lineno}: expected space-separated token ids") from None
    bad = [i for i in ids if not 0 <= i < tr.src_spm.size]
    if bad:
        raise MtkitError(f"{name} line {lineno}: token id {bad[0]} outside the vocabulary (size {tr.src_spm.size})")
    return ids


def make_batches(lengths: Sequence[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Indices sorted by length, cut into batches of ``batch_size`` sentences, or (0) of at most
    ``max_tokens`` padded source tokens (a longer single sentence gets its own batch)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[i] + 1  # + EOS; sorted, so the newest is the longest
        if cur and ((batch_size and len(cur) >= batch_size) or (not batch_size and (len(cur) + 1) * width > max_tokens)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


class Decoder:
    """Decodes lists of id sequences; an out-of-memory batch is retried in halves."""

    def __init__(self, tr: Translator, cfg: DecodeConfig, sampling: SamplingOptions | None, attention: bool):
        self.tr, self.cfg, self.sampling, self.attention = tr, cfg, sampling, attention
        self.oom_splits = 0
        self.batches = 0

    def __call__(self, seqs: list[list[int]]) -> list[list[Hypothesis]]:
        tr = self.tr
        src, src_len = collate_source(seqs, tr.src_spm.pad, tr.src_spm.eos, tr.max_src_len)
        try:
            self.batches += 1
            return search.generate(
                tr.models, src.to(tr.device), src_len.to(tr.device), self.cfg, tr.tgt_spm.bos, tr.tgt_spm.eos,
                attention=self.attention, sampling=self.sampling,
            )
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            if not is_oom(exc):
                raise
            if len(seqs) == 1:
                raise MtkitError(f"out of memory decoding a single sentence of {len(seqs[0])} tokens on {tr.device}") from None
        # retried outside the except block: its traceback would keep the failed attempt's tensors alive
        if tr.device.type == "cuda":
            torch.cuda.empty_cache()
        self.oom_splits += 1
        half = len(seqs) // 2
        logger.warning("out of memory on a batch of %d sentences; retrying in halves", len(seqs))
        return self(seqs[:half]) + self(seqs[half:])


# ---------------------------------------------------------------------------------------------
@dataclass
class Record:
    index: int  # 0-based input line number
    src_ids: list[int]
    hyps: list[Hypothesis]  # empty for an empty input line


class Formatter:
    def __init__(self, tr: Translator, fmt: str, units: str, alignment: str):
        self.tr, self.fmt, self.units, self.alignment = tr, fmt, units, alignment

    def hyp_text(self, h: Hypothesis) -> str:
        if self.units == "ids":
            return " ".join(map(str, h.tokens))
        if self.units == "pieces":
            return " ".join(self.tr.tgt_spm.id_to_piece(h.tokens))
        return self.tr.tgt_spm.decode([h.tokens])[0]

    def __call__(self, rec: Record) -> str:
        if self.fmt == "text":
            return (self.hyp_text(rec.hyps[0]) if rec.hyps else "") + "\n"
        if self.fmt == "nbest":
            return "".join(self.nbest_line(rec.index, h) for h in rec.hyps or [None])
        return json.dumps(self.jsonl(rec), ensure_ascii=False) + "\n"

    def nbest_line(self, index: int, h: Hypothesis | None) -> str:
        """Moses/Marian n-best: ``id ||| hypothesis ||| F0= log-prob ||| total score`` (the
        total is the search's final score, length and coverage penalties included)."""
        if h is None:  # an empty input line
            return f"{index} |||  ||| F0= 0.0000 ||| 0.0000\n"
        return f"{index} ||| {self.hyp_text(h)} ||| F0= {h.log_prob:.4f} ||| {h.score:.4f}\n"

    def jsonl(self, rec: Record) -> dict[str, Any]:
        if not rec.hyps:
            return {"line": rec.index, "hypothesis": "", "score": 0.0, "log_prob": 0.0, "tokens": []}
        out = [self.one(h) for h in rec.hyps]
        obj = {"line": rec.index, **out[0]}
        if len(out) > 1:
            obj["nbest"] = out
        return obj

    def one(self, h: Hypothesis) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "hypothesis": self.hyp_text(h),
            "score": round(h.score, 6),
            "log_prob": round(h.log_prob, 6),
            "tokens": self.tr.tgt_spm.id_to_piece(h.tokens),
        }
        if h.attn is not None and self.alignment != "none":
            # row j: attention while producing target piece j; the last row is the EOS step;
            # the last source column is the source EOS
            obj["alignment"] = h.attn[: len(h.tokens)].argmax(1).tolist() if len(h.tokens) else []
            if self.alignment == "full":
                obj["attention"] = [[round(x, 4) for x in row] for row in h.attn.tolist()]
        return obj


# ---------------------------------------------------------------------------------------------
def prepare_resume(path: Path, output_format: str) -> int:
    """Truncate ``path`` to its complete output and return how many input lines it covers."""
    if not path.exists():
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1  # drop a trailing partial line
        lines = data[:keep].split(b"\n")[:-1]
        done = len(lines)
        if output_format == "nbest" and lines:
            try:
                last = int(lines[-1].split(b" ||| ", 1)[0])
            except ValueError:
                raise MtkitError(f"{path}: not n-best output (line {len(lines)}), cannot resume") from None
            group = sum(1 for ln in lines if ln.split(b" ||| ", 1)[0] == str(last).encode())
            keep -= sum(len(ln) + 1 for ln in lines[len(lines) - group :])  # redo the last sentence
            done = last
        f.truncate(keep)
    return done


def translate_file(
    model_paths: Sequence[str | Path],
    input_path: str | Path,
    output_path: str | Path,
    decode_cfg: DecodeConfig | None = None,
    device: str = "auto",
    output_format: str = "text",
    resume: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Translate ``input_path`` into ``output_path`` (``-``: stdin / stdout); returns stats.

    ``options`` are the fields of :class:`Options` (batch_size, max_tokens, input_format,
    output_units, alignment, errors, plot_attention, sampling, temperature, topk, topp, seed,
    decode_overrides, buffer_lines, engine).
    """
    opts = make_options(options)  # checked before loading any model
    if output_format not in OUTPUT_FORMATS:
        raise MtkitError(f"unknown output format '{output_format}'; valid: {', '.join(OUTPUT_FORMATS)}")
    to_stdout = str(output_path) == "-"
    if resume and to_stdout:
        raise MtkitError("--resume needs an output file (-o FILE)")
    if opts.plot_attention:
        from mtkit.decoding.plot import check_available

        check_available()
    engine = None
    if opts.engine == "ctranslate2":
        from mtkit.decoding.ct2_engine import CT2Engine

        if len(model_paths) != 1 or opts.sampling:
            raise MtkitError("--engine ctranslate2 takes one exported model directory (-m DIR) and no sampling")
        if opts.dtype != "float32":
            raise MtkitError("--dtype is for the torch engine; a CTranslate2 model's type is chosen at export (--quantization)")
        engine = CT2Engine.load(model_paths[0], device=device)
        dev = torch.device("cpu")
        tr = Translator([], engine.src_spm, engine.tgt_spm, engine.cfg, engine.max_src_len, dev)
    else:
        tr = Translator.load(model_paths, device, opts.dtype)
        dev = tr.device
    cfg = resolve_decode_config(tr.cfg, decode_cfg, opts)
    search.check_config(cfg, sampling_options(opts, torch.device("cpu")))
    attention = bool(opts.plot_attention) or (output_format == "jsonl" and opts.alignment != "none")
    if engine is not None:
        decoder = engine.decoder(cfg, attention)
    else:
        decoder = Decoder(tr, cfg, sampling_options(opts, dev), attention)
    fmt = Formatter(tr, output_format, opts.output_units, opts.alignment)

    if str(input_path) != "-":
        open_binary(input_path).close()  # a missing or unreadable input fails before any output exists
    skip = prepare_resume(Path(output_path), output_format) if resume else 0
    stats = {**new_stats(), "skipped": skip}
    start = time.monotonic()
    created = not to_stdout and not Path(output_path).exists()
    out = open_output(output_path, append=resume)
    written = skip
    stop_on_term = term_as_interrupt()  # SIGTERM, as Ctrl-C: keep what is written, say how to resume
    stop_on_term.__enter__()
    try:
        records = _records(input_path, skip, tr, cfg, opts, decoder, stats)
        for rec in progress(records, desc="translate", unit="lines"):
            out.write(fmt(rec))
            written += 1
            if opts.plot_attention and rec.hyps and rec.hyps[0].attn is not None:
                from mtkit.decoding.plot import plot_attention

                h = rec.hyps[0]
                plot_attention(
                    h.attn, tr.src_spm.id_to_piece(rec.src_ids) + ["</s>"],
                    tr.tgt_spm.id_to_piece(h.tokens) + ["</s>"],
                    Path(opts.plot_attention) / f"{rec.index:06d}.png", title=attention_title(tr, rec.index),
                )
            if to_stdout or written % 64 == 0:
                out.flush()
        if not to_stdout:
            out.close()  # inside the try: a full disk often shows only when the buffer is flushed
    except BaseException as exc:
        if not to_stdout:
            _close_quietly(out)
            if created and written == 0:
                Path(output_path).unlink(missing_ok=True)
            elif written > skip:
                logger.error("stopped after %d complete lines of %s; rerun with --resume to continue", written, output_path)
        if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError):
            raise MtkitError(f"could not write {display_name(output_path)}: {exc.strerror or exc}") from None
        raise
    finally:
        stop_on_term.__exit__(None, None, None)
        if to_stdout:
            try:
                out.flush()
            finally:
                out.detach()  # leave sys.stdout usable
        elif not out.closed:
            out.close()
    seconds = time.monotonic() - start
    stats.update(
        seconds=round(seconds, 3),
        batches=decoder.batches,
        oom_splits=decoder.oom_splits,
        sentences_per_s=round(stats["translated"] / seconds, 2) if seconds > 0 else 0.0,
        tgt_tokens_per_s=round(stats["tgt_tokens"] / seconds, 1) if seconds > 0 else 0.0,
    )
    return stats


def attention_title(tr: Translator, index: int) -> str:
    """An attention plot's title: the line, which attention is drawn, and the ensemble mean."""
    label = tr.models[0].attention_label() if tr.models else "attention weights"
    if len(tr.models) > 1:
        label += f", mean over {len(tr.models)} models"
    return f"line {index + 1}: {label}"


def _close_quietly(out: Any) -> None:
    """Flush and close after a failure; a second error (e.g. the disk is still full) is dropped."""
    try:
        out.close()
    except OSError:
        pass


def new_stats() -> dict[str, Any]:
    return {"lines": 0, "translated": 0, "skipped": 0, "truncated": 0, "src_tokens": 0, "tgt_tokens": 0}


def encode_source(line: str, lineno: int, tr: Translator, opts: Options, name: str, stats: dict[str, Any]) -> list[int]:
    """One input line as source ids (empty for a blank line), truncated to the model's limit."""
    ids = encode_line(line, lineno, tr, opts.input_format, name) if line.strip() else []
    if tr.max_src_len is not None and len(ids) + 1 > tr.max_src_len:
        logger.warning("%s line %d: %d tokens, truncated to the model limit of %d", name, lineno,
                       len(ids), tr.max_src_len - 1)
        ids = ids[: tr.max_src_len - 1]
        stats["truncated"] += 1
    return ids


def _records(
    input_path: str | Path, skip: int, tr: Translator, cfg: DecodeConfig, opts: Options, decoder: Decoder,
    stats: dict[str, Any],
) -> Iterator[Record]:
    """Yield one :class:`Record` per input line (after ``skip``), in input order.

    Lines are translated in buffers of ``opts.buffer_lines`` counted from the first input line,
    also when resuming: the buffer holding line ``skip`` is translated whole and only its lines
    from ``skip`` on are yielded, so every sentence is decoded in the very batch an uninterrupted
    run decodes it in, and a resumed output is byte-identical to an uninterrupted one.
    """
    name = display_name(input_path)
    lines: Iterator[str | None] = iter_lines(input_path, errors=opts.errors)
    if is_stream(input_path):
        lines = paced(lines)  # type: ignore[arg-type]
    lineno = 0

    def too_short() -> MtkitError:
        return MtkitError(f"cannot resume: the output already has {skip} lines but {name} has only {lineno}")

    exhausted = object()
    while lineno < skip - skip % opts.buffer_lines:
        line = next(lines, exhausted)
        if line is exhausted:
            raise too_short()
        if line is not None:  # None: a pause in piped input
            lineno += 1
    while True:
        buffer: list[tuple[int, list[int]]] = []
        for line in lines:
            if line is None:  # piped input paused: translate what has arrived
                if buffer:
                    break
                continue
            lineno += 1
            buffer.append((lineno - 1, encode_source(line, lineno, tr, opts, name, stats)))
            if len(buffer) >= opts.buffer_lines:
                break
        if not buffer:
            if lineno < skip:
                raise too_short()
            return
        if buffer[-1][0] >= skip:  # else every line of this buffer is already in the output
            yield from _translate_buffer(buffer, cfg, decoder, stats, skip)


def _translate_buffer(
    buffer: list[tuple[int, list[int]]], cfg: DecodeConfig, decoder: Decoder, stats: dict[str, Any], skip: int = 0
) -> Iterator[Record]:
    """Translate a buffer in length-sorted batches; yield its records in order from input line ``skip``."""
    todo = [i for i, (_, ids) in enumerate(buffer) if ids]
    results: dict[int, list[Hypothesis]] = {}
    nxt = 0

    def ready() -> Iterator[Record]:
        nonlocal nxt
        while nxt < len(buffer) and (not buffer[nxt][1] or nxt in results):
            index, ids = buffer[nxt]
            hyps = results.pop(nxt, [])
            nxt += 1
            if index < skip:  # already in the output (re-decoded only to keep the batches)
                continue
            stats["lines"] += 1
            if ids:
                stats["translated"] += 1
                stats["src_tokens"] += len(ids)
                stats["tgt_tokens"] += len(hyps[0].tokens) if hyps else 0
            yield Record(index, ids, hyps)

    yield from ready()
    for batch in make_batches([len(buffer[i][1]) for i in todo], cfg.batch_size, cfg.max_tokens):
        rows = [todo[j] for j in batch]
        hyps = decoder([buffer[r][1] for r in rows])
        for r, h in zip(rows, hyps):
            results[r] = h
        yield from ready()
    yield from ready()

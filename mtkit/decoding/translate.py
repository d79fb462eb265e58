"""Streaming, order-preserving translation of a file or stdin with one or more checkpoints.

Input is read in buffers of ``buffer_lines`` lines, each encoded with the source sentencepiece model,
sorted by length, cut into batches (sentences or a source-token budget), decoded, and written back in
input order as soon as a prefix of lines is complete: a large file never sits in memory, and every
input line gives exactly one output line (``nbest``: one or more lines in the Moses/Marian form that
rerankers read, ``id ||| hypothesis ||| F0= log-prob ||| score``; empty input lines give empty output).

Piped or typed input is read by a background thread: once no new line has come for ``inputs.PAUSE_S``
seconds, the lines read so far are translated and written, so a person typing, a script waiting for
each answer or a slow producer gets every line back as soon as it is decoded; flowing input fills
whole buffers. Regular files (also ``< file`` on stdin) are read directly.

``resume=True`` keeps a partly written output's complete lines (dropping a trailing partial line or,
for n-best output, the last sentence's group), skips as many input lines and appends the rest."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtkit.config import DecodeConfig
from mtkit.data.batching import collate_source, length_sorted_batches
from mtkit.data.subword import SubwordModel
from mtkit.data.text import display_name, iter_lines, open_binary, open_output
from mtkit.decoding import inputs, output, search
from mtkit.decoding.ct2_engine import CT2Decoder, CT2Engine
from mtkit.decoding.inputs import Options, encode_source, sampling_options
from mtkit.decoding.output import OUTPUT_FORMATS, Formatter, Record, prepare_resume
from mtkit.decoding.search import SamplingOptions
from mtkit.decoding.search_base import Hypothesis
from mtkit.devices import torch_device
from mtkit.errors import MtkitError
from mtkit.models.base import Seq2Seq
from mtkit.signals import term_as_interrupt
from mtkit.utils import progress

logger = logging.getLogger("mtkit.translate")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the counters a run returns, at zero (each run counts in its own copy)
ZERO_STATS = {"lines": 0, "translated": 0, "skipped": 0, "truncated": 0, "src_tokens": 0, "tgt_tokens": 0}


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
        models, limits = [], []
        for path in model_paths:
            model, cfg, src_spm, tgt_spm = load_model(path, device)
            model.to(DTYPES[dtype])  # log-probs and search scores stay float32
            if not models:
                first = (path, cfg, src_spm, tgt_spm)
            elif (src_spm.sha256, tgt_spm.sha256) != (first[2].sha256, first[3].sha256):
                raise MtkitError(f"ensemble checkpoints {first[0]} and {path} have different vocabularies")
            models.append(model)
            if cfg.data.max_src_len:
                limits.append(cfg.data.max_src_len)
            if model.max_positions() is not None:
                limits.append(int(model.max_positions()))
        _, cfg, src_spm, tgt_spm = first
        return cls(models, src_spm, tgt_spm, cfg.decode, min(limits) if limits else None, device)

    def translate(
        self, sentences: Sequence[str], nbest: int = 1, **options: Any
    ) -> list[str] | list[list[tuple[str, float]]]:
        """Translate sentences as ``mtkit translate`` does (same batches, same search): one string per
        sentence, or with ``nbest`` > 1 a list of (hypothesis, score) per sentence, best first. ``options``:
        decode keys (``beam``, ``length_penalty``, ``alpha``, ``max_len_a``, ...) and the fields of
        :class:`Options` (``batch_size``, ``max_tokens``, ``sampling``, ``seed``, ...)."""
        decode_keys = {f.name for f in dataclasses.fields(DecodeConfig)} - {"batch_size", "max_tokens"}
        overrides = {k: options.pop(k) for k in list(options) if k in decode_keys and options[k] is not None}
        opts = inputs.make_options({**options, "decode_overrides": {**overrides, "nbest": nbest}})
        cfg = inputs.resolve_decode_config(self.cfg, None, opts)
        decoder = OomSplittingBatchDecoder(self, cfg, sampling_options(opts, self.device), attention=False)
        fmt = Formatter(self.tgt_spm, "text", opts.output_units, "none")
        stats = dict(ZERO_STATS)
        out: list[Any] = []
        for rec in _records(iter(sentences), "input", 0, self, cfg, opts, decoder, stats):
            if nbest > 1:
                out.append([(fmt.hyp_text(h), h.score) for h in rec.hyps])
            else:
                out.append(fmt.hyp_text(rec.hyps[0]) if rec.hyps else "")
        return out


class OomSplittingBatchDecoder:
    """Decodes batches (lists of source id sequences) with the translator's models; a batch that
    runs out of memory is retried in halves, down to single sentences."""

    def __init__(self, tr: Translator, cfg: DecodeConfig, sampling: SamplingOptions | None, attention: bool):
        self.tr, self.cfg, self.sampling, self.attention = tr, cfg, sampling, attention
        self.oom_splits = self.batches = 0

    def __call__(self, seqs: list[list[int]]) -> list[list[Hypothesis]]:
        tr = self.tr
        src, src_len = collate_source(seqs, tr.src_spm.pad, tr.src_spm.eos, tr.max_src_len)
        try:
            self.batches += 1
            return search.generate(
                tr.models, src.to(tr.device), src_len.to(tr.device), self.cfg, tr.tgt_spm.bos, tr.tgt_spm.eos,
                attention=self.attention, sampling=self.sampling,
            )
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            if not (isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)):
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


def translate_file(
    model_paths: Sequence[str | Path], input_path: str | Path, output_path: str | Path,
    decode_cfg: DecodeConfig | None = None, device: str = "auto", output_format: str = "text",
    resume: bool = False, **options: Any,
) -> dict[str, Any]:
    """Translate ``input_path`` into ``output_path`` (``-``: stdin / stdout); returns stats.
    ``options`` are the fields of :class:`Options`."""
    opts = inputs.make_options(options)  # checked before loading any model
    if output_format not in OUTPUT_FORMATS:
        raise MtkitError(f"unknown output format '{output_format}'; valid: {', '.join(OUTPUT_FORMATS)}")
    if resume and str(output_path) == "-":
        raise MtkitError("--resume needs an output file (-o FILE)")
    if opts.plot_attention:
        output.check_available()
    tr, engine = _load_translator(model_paths, device, opts)
    cfg = inputs.resolve_decode_config(tr.cfg, decode_cfg, opts)
    attention = bool(opts.plot_attention) or (output_format == "jsonl" and opts.alignment != "none")
    decoder = (CT2Decoder(engine, cfg, attention) if engine is not None
               else OomSplittingBatchDecoder(tr, cfg, sampling_options(opts, tr.device), attention))
    fmt = Formatter(tr.tgt_spm, output_format, opts.output_units, opts.alignment)

    if str(input_path) != "-":
        open_binary(input_path).close()  # a missing or unreadable input fails before any output exists
    skip = prepare_resume(Path(output_path), output_format) if resume else 0
    stats = {**ZERO_STATS, "skipped": skip}
    lines: Iterator[str | None] = iter_lines(input_path, errors=opts.errors)
    if inputs.is_stream(input_path):
        lines = inputs.paced(lines)  # type: ignore[arg-type]
    start = time.monotonic()
    records = _records(lines, display_name(input_path), skip, tr, cfg, opts, decoder, stats)
    plot = (lambda rec: _plot_attention(tr, opts.plot_attention, rec)) if opts.plot_attention else None
    _write_records(records, output_path, fmt, skip, resume, plot)
    seconds = time.monotonic() - start
    stats.update(
        seconds=round(seconds, 3),
        batches=decoder.batches,
        oom_splits=decoder.oom_splits,
        sentences_per_s=round(stats["translated"] / seconds, 2) if seconds > 0 else 0.0,
        tgt_tokens_per_s=round(stats["tgt_tokens"] / seconds, 1) if seconds > 0 else 0.0,
    )
    return stats


def _load_translator(model_paths: Sequence[str | Path], device: str, opts: Options) -> tuple[Translator, Any]:
    """The torch checkpoints, or (``--engine ctranslate2``) an export directory: -> (translator,
    CTranslate2 engine or None)."""
    if opts.engine != "ctranslate2":
        return Translator.load(model_paths, device, opts.dtype), None
    if len(model_paths) != 1 or opts.sampling:
        raise MtkitError("--engine ctranslate2 takes one exported model directory (-m DIR) and no sampling")
    if opts.dtype != "float32":
        raise MtkitError("--dtype is for the torch engine; a CTranslate2 model's type is chosen at export (--quantization)")
    engine = CT2Engine.load(model_paths[0], device=device)
    tr = Translator([], engine.src_spm, engine.tgt_spm, engine.cfg, engine.max_src_len, torch.device("cpu"))
    return tr, engine


def _write_records(
    records: Iterator[Record], output_path: str | Path, fmt: Formatter, skip: int, resume: bool,
    plot: Callable[[Record], None] | None,
) -> None:
    """Write each record as it comes (appending after ``skip`` lines when resuming). On a failure
    or an interrupt the complete lines stay; an output that got none is removed."""
    to_stdout = str(output_path) == "-"
    created = not to_stdout and not Path(output_path).exists()
    out = open_output(output_path, append=resume)
    written = skip
    stop_on_term = term_as_interrupt()  # SIGTERM, as Ctrl-C: keep what is written, say how to resume
    stop_on_term.__enter__()
    try:
        for rec in progress(records, desc="translate", unit="lines"):
            out.write(fmt(rec))
            written += 1
            if plot is not None:
                plot(rec)
            if to_stdout or written % 64 == 0:
                out.flush()
        if not to_stdout:
            out.close()  # inside the try: a full disk often shows only when the buffer is flushed
    except BaseException as exc:
        if not to_stdout:
            with contextlib.suppress(OSError):  # a second error (e.g. the disk is still full) is dropped
                out.close()
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


def _plot_attention(tr: Translator, folder: str, rec: Record) -> None:
    """One heatmap PNG of the best hypothesis' attention, when it has one."""
    if not rec.hyps or rec.hyps[0].attn is None:
        return
    h = rec.hyps[0]
    label = tr.models[0].attention_label() if tr.models else "attention weights"  # which attention is drawn
    if len(tr.models) > 1:
        label += f", mean over {len(tr.models)} models"
    output.plot_attention(
        h.attn, tr.src_spm.id_to_piece(rec.src_ids) + ["</s>"], tr.tgt_spm.id_to_piece(h.tokens) + ["</s>"],
        Path(folder) / f"{rec.index:06d}.png", title=f"line {rec.index + 1}: {label}",
    )


def _records(
    lines: Iterator[str | None], name: str, skip: int, tr: Translator, cfg: DecodeConfig, opts: Options,
    decoder: OomSplittingBatchDecoder, stats: dict[str, Any],
) -> Iterator[Record]:
    """Yield one :class:`Record` per line of input ``name`` (after ``skip``), in input order. Buffers of
    ``opts.buffer_lines`` count from the first input line, also when resuming: the buffer holding line
    ``skip`` is translated whole and only its lines from ``skip`` on are yielded, so every sentence is
    decoded in the very batch an uninterrupted run decodes it in, and a resumed output is byte-identical."""
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
            buffer.append((lineno - 1, encode_source(line, lineno, tr.src_spm, tr.max_src_len, opts.input_format, name, stats)))
            if len(buffer) >= opts.buffer_lines:
                break
        if not buffer:
            if lineno < skip:
                raise too_short()
            return
        if buffer[-1][0] >= skip:  # else every line of this buffer is already in the output
            yield from _translate_buffer(buffer, cfg, decoder, stats, skip)


def _translate_buffer(
    buffer: list[tuple[int, list[int]]], cfg: DecodeConfig, decoder: OomSplittingBatchDecoder, stats: dict[str, Any], skip: int
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
    for batch in length_sorted_batches([len(buffer[i][1]) for i in todo], cfg.batch_size, cfg.max_tokens):
        rows = [todo[j] for j in batch]
        results.update(zip(rows, decoder([buffer[r][1] for r in rows])))
        yield from ready()
    yield from ready()

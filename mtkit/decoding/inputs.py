"""Input of a translation run: lines as source ids, and input that arrives over time (piped or
typed lines are handed on when the producer pauses)."""

from __future__ import annotations

import io
import logging
import os
import queue
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mtkit.data.subword import SubwordModel
from mtkit.errors import MtkitError

logger = logging.getLogger("mtkit.translate")

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


def encode_line(line: str, lineno: int, spm: SubwordModel, fmt: str, name: str) -> list[int]:
    """A non-blank input line in format ``fmt`` (text, pieces, ids) as source ids."""
    if fmt == "text":
        return spm.encode([line])[0]
    if fmt == "pieces":
        return [spm.sp.piece_to_id(p) for p in line.split()]
    try:
        ids = [int(x) for x in line.split()]
    except ValueError:
        raise MtkitError(f"{name} line {lineno}: expected space-separated token ids") from None
    bad = [i for i in ids if not 0 <= i < spm.size]
    if bad:
        raise MtkitError(f"{name} line {lineno}: token id {bad[0]} outside the vocabulary (size {spm.size})")
    return ids


def encode_source(
    line: str, lineno: int, spm: SubwordModel, max_src_len: int | None, fmt: str, name: str, stats: dict[str, Any]
) -> list[int]:
    """One input line as source ids (empty for a blank line), truncated to the model's limit of
    ``max_src_len`` tokens with EOS (counted in ``stats["truncated"]``)."""
    ids = encode_line(line, lineno, spm, fmt, name) if line.strip() else []
    if max_src_len is not None and len(ids) + 1 > max_src_len:
        logger.warning("%s line %d: %d tokens, truncated to the model limit of %d", name, lineno,
                       len(ids), max_src_len - 1)
        ids = ids[: max_src_len - 1]
        stats["truncated"] += 1
    return ids

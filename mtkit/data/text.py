"""Reading and writing text: plain or gzip files or stdin, strict UTF-8 with line numbers."""

from __future__ import annotations

import gzip
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from mtkit.errors import MtkitError


def display_name(path: str | Path) -> str:
    return "<stdin>" if str(path) == "-" else str(path)


def open_binary(path: str | Path) -> BinaryIO:
    """Open a file (``.gz`` transparently) or ``-`` for stdin, for reading bytes."""
    if str(path) == "-":
        return sys.stdin.buffer
    p = Path(path)
    if p.is_dir():
        raise MtkitError(f"expected a file but {p} is a directory")
    try:
        f = open(p, "rb")
    except FileNotFoundError:
        raise MtkitError(f"file not found: {p}") from None
    except PermissionError:
        raise MtkitError(f"permission denied: {p}") from None
    if f.peek(2)[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        return gzip.open(f, "rb")  # type: ignore[return-value]
    return f


def iter_lines(path: str | Path, errors: str = "strict") -> Iterator[str]:
    """Yield lines without their line ending (``\\n`` or ``\\r\\n``); a leading BOM is dropped.

    ``errors="strict"`` turns invalid UTF-8 into an error naming the file and line number;
    ``errors="replace"`` substitutes U+FFFD instead.
    """
    name = display_name(path)
    f = open_binary(path)
    try:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8", errors=errors)
            except UnicodeDecodeError as exc:
                raise MtkitError(f"{name} line {lineno}: invalid UTF-8 (byte {exc.start})") from None
            yield line.rstrip("\n").rstrip("\r")
    except (OSError, EOFError) as exc:
        if isinstance(exc, gzip.BadGzipFile) or isinstance(exc, EOFError):
            raise MtkitError(f"{name}: corrupt or truncated gzip file") from None
        raise
    finally:
        if f is not sys.stdin.buffer:
            f.close()


def open_output(path: str | Path | None, append: bool = False) -> io.TextIOBase:
    """A UTF-8 text stream for ``path`` (stdout for ``None`` or ``-``), line-buffered."""
    if path is None or str(path) == "-":
        return io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="\n", line_buffering=True, write_through=True)
    try:
        return open(path, "a" if append else "w", encoding="utf-8", newline="\n")
    except IsADirectoryError:
        raise MtkitError(f"output path is a directory: {path}") from None
    except FileNotFoundError:
        raise MtkitError(f"output directory does not exist: {Path(path).parent}") from None

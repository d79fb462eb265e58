"""Reading and writing text: plain or gzip files or stdin, strict UTF-8 with line numbers."""

from __future__ import annotations

import gzip
import io
import itertools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mtkit.errors import MtkitError


@dataclass
class SplitFiles:
    """One split of the corpus being preprocessed: its name and its source and target files."""

    name: str
    src: Path
    tgt: Path
    pairs: int | None = None  # line count, when a previous pass has counted it


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
    head = f.peek(2)[:2]
    if head == b"\x1f\x8b":  # gzip magic, whatever the file is called
        return gzip.open(f, "rb")  # type: ignore[return-value]
    if p.suffix == ".gz" and head:  # named .gz but not gzip: say so rather than read it as text
        f.close()
        raise MtkitError(f"{p}: not a gzip file (it is named .gz but does not start with gzip's magic bytes)")
    return f


def iter_lines(path: str | Path, errors: str = "strict") -> Iterator[str]:
    """Yield lines without their line ending (``\\n`` or ``\\r\\n``); a leading BOM is dropped.
    Invalid UTF-8 is an error naming the file and line number (``errors="strict"``) or becomes
    U+FFFD (``errors="replace"``)."""
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
        if isinstance(exc, (gzip.BadGzipFile, EOFError)):
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


def resolve_corpus_file(prefix: str | Path, lang: str) -> Path:
    """The file holding ``lang`` for ``prefix``: ``PREFIX.LANG`` or else ``PREFIX.LANG.gz``."""
    plain, gz = Path(f"{prefix}.{lang}"), Path(f"{prefix}.{lang}.gz")
    for candidate in (plain, gz):
        if candidate.is_file():
            return candidate
    if plain.is_dir():
        raise MtkitError(f"expected a file but {plain} is a directory")
    raise MtkitError(f"file not found: {plain} (nor {gz.name})")


def iter_parallel(src_path: str | Path, tgt_path: str | Path) -> Iterator[tuple[str, str]]:
    """Yield aligned (source, target) lines; unequal line counts are an error naming both."""
    src_it, tgt_it = iter_lines(src_path), iter_lines(tgt_path)
    n = 0
    for src, tgt in itertools.zip_longest(src_it, tgt_it):
        if src is None or tgt is None:  # one file ended: count what is left of the other
            src_n = n + (src is not None) + sum(1 for _ in src_it)
            tgt_n = n + (tgt is not None) + sum(1 for _ in tgt_it)
            raise MtkitError(
                f"line counts differ: {display_name(src_path)} has {src_n} lines, "
                f"{display_name(tgt_path)} has {tgt_n}"
            )
        n += 1
        yield src, tgt

"""Fetching and reading the catalog's source files: downloads through a temp file with retries on a
dropped connection and a sha256 check, archive members, sacrebleu's test sets, and the conversion
of tagged IWSLT files into plain sentences. Nothing here knows the catalog's schema."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import logging
import re
import tarfile
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

from mtkit.errors import MtkitError
from mtkit.utils import atomic_path, progress

logger = logging.getLogger("mtkit.data.catalog")

CHUNK = 1 << 20
DOWNLOAD_ATTEMPTS = 3  # a connection that drops mid-file is tried again this many times in all


class IncompleteDownload(OSError):
    """The server closed the connection before the announced number of bytes arrived."""


def _download_once(url: str, tmp: Path, desc: str, timeout: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
        size = int(resp.headers.get("Content-Length") or 0)
        chunks = iter(lambda: resp.read(CHUNK), b"")
        total = (size + CHUNK - 1) // CHUNK if size else None
        for chunk in progress(chunks, total=total, desc=desc, unit="MiB"):
            out.write(chunk)
        got = out.tell()
    if size and got < size:  # urllib returns what came before the connection closed, without an error
        raise IncompleteDownload(f"the connection closed after {got} of {size} bytes")


def download(url: str, dest: Path, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` through a temp file, trying again when the connection drops
    mid-file; verify ``sha256`` when given. Nothing is left at ``dest`` (or beside it) unless
    the whole file arrived and matched."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s", url)
    with atomic_path(dest) as tmp:
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            try:
                _download_once(url, tmp, dest.name, timeout)
                break
            except (IncompleteDownload, http.client.IncompleteRead, ConnectionError) as exc:
                if attempt == DOWNLOAD_ATTEMPTS:
                    raise MtkitError(f"download of {url} failed {attempt} times: {exc}") from None
                logger.warning("download of %s interrupted (%s); trying again", url, exc)
        verify(tmp, sha256, url)
    return dest


def verify(path: Path, sha256: str | None, what: str) -> None:
    """Check a file's sha256; on mismatch delete it and raise."""
    if not sha256:
        logger.warning("no checksum known for %s; using it unverified", what)
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    got = h.hexdigest()
    if got != sha256:
        path.unlink(missing_ok=True)
        raise MtkitError(f"checksum mismatch for {what}: expected sha256 {sha256}, got {got} (nothing was kept)")


def write_gz(lines: Iterator[str], dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp, gzip.open(tmp, "wt", encoding="utf-8", newline="\n") as out:
        for line in lines:
            out.write(line + "\n")


def sacrebleu_file(test_set: str, langpair: str, side: str) -> str:
    """Download (through sacrebleu) and return the path of a test set's source or reference."""
    from sacrebleu.dataset import DATASETS

    if test_set not in DATASETS:
        raise MtkitError(f"sacrebleu does not know the test set '{test_set}'")
    ds = DATASETS[test_set]
    if langpair not in ds.langpairs:
        raise MtkitError(f"sacrebleu test set '{test_set}' has no language pair {langpair}")
    try:
        return ds.get_source_file(langpair) if side == "src" else ds.get_reference_files(langpair)[0]
    except SystemExit:  # sacrebleu exits on a failed download
        raise MtkitError(f"sacrebleu could not fetch {test_set} {langpair}; offline?") from None


def read_member(archive: Path, member: str) -> bytes:
    """The bytes of one file inside a tar or zip archive (gunzipped if it is gzip)."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                data = z.read(member)
        else:
            with tarfile.open(archive) as t:
                f = t.extractfile(member)
                if f is None:
                    raise KeyError(member)
                data = f.read()
    except KeyError:
        raise MtkitError(f"archive {archive} has no member {member}") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError):
        raise MtkitError(f"archive {archive} is corrupt or truncated; delete it and retry") from None
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data


def decode_lines(data: bytes, name: str) -> Iterator[str]:
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    for lineno, raw in enumerate(io.BytesIO(data), start=1):
        try:
            yield raw.decode("utf-8").rstrip("\n").rstrip("\r")
        except UnicodeDecodeError:
            raise MtkitError(f"{name} line {lineno}: invalid UTF-8") from None


_IWSLT_DROP = ("<url>", "<talkid>", "<keywords>")  # as fairseq's prepare-iwslt14.sh
_IWSLT_TAGS = re.compile(r"</?(title|description)>")
_SEG = re.compile(r"<seg id=\"?\d+\"?>\s*(.*?)\s*</seg>")


def convert(lines: Iterator[str], fmt: str) -> Iterator[str]:
    """Turn a source file's lines into plain sentences according to the catalog ``format``."""
    if fmt == "text":
        yield from lines
    elif fmt == "iwslt_tags":
        for line in lines:
            if not line.lstrip().startswith(_IWSLT_DROP):
                yield _IWSLT_TAGS.sub("", line).strip()
    elif fmt == "iwslt_xml":
        for line in lines:
            if m := _SEG.search(line):
                yield m.group(1).replace("\u2019", "'")
    else:
        raise MtkitError(f"unknown catalog format '{fmt}'")

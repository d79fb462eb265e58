"""The dataset catalog: named corpora and where each of their files comes from.

A recipe names data as ``"<dataset>/<split>"`` (e.g. ``multi30k/train``); a split has one
line-aligned file per language, locally ``<split>.<lang>.gz`` (or plain ``<split>.<lang>``).
:func:`resolve_file` finds each file in (1) the data directories, ``--data-dir`` or ``MTKIT_DATA``
(``:``-separated), as ``DIR/<file>`` or ``DIR/<dataset>/<file>``; (2) the cache, ``MTKIT_CACHE`` or
``~/.cache/mtkit``, as ``<cache>/<dataset>/<file>``; (3) a download into the cache (progress bar,
sha256 check where the catalog lists one). With no local copy and downloads impossible (offline,
``MTKIT_OFFLINE=1``, or ``allow_download=False``) the error names the files to place and where."""

from __future__ import annotations

import logging
import os
import re
import shutil
import urllib.error
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtkit.data.download import (
    convert,
    decode_lines,
    download,
    read_member,
    sacrebleu_file,
    write_gz,
)
from mtkit.errors import MtkitError, did_you_mean

logger = logging.getLogger("mtkit.data.catalog")

CATALOG_PATH = Path(__file__).with_name("catalog.yaml")
FORMATS = ("text", "iwslt_tags", "iwslt_xml")
SIDES = ("src", "ref")


@dataclass(frozen=True)
class SplitSource:
    """One split of a catalog dataset: its languages and how to fetch its files."""

    dataset: str
    name: str
    langs: tuple[str, ...]
    url: str | None = None
    archive: str | None = None
    member: str | None = None
    format: str = "text"
    sacrebleu: dict[str, str] | None = None
    sha256: Any = None  # str, {lang: str}, or None

    @property
    def ref(self) -> str:
        return f"{self.dataset}/{self.name}"

    def filename(self, lang: str) -> str:
        return f"{self.name}.{lang}.gz"

    def checksum(self, lang: str) -> str | None:
        return self.sha256.get(lang) if isinstance(self.sha256, dict) else self.sha256

    def source(self, lang: str) -> str:
        """A one-line description of where ``lang``'s file is downloaded from."""
        if self.url:
            return self.url.format(lang=lang)
        if self.archive:
            return f"{self.archive} ({self.member.format(lang=lang)})"
        return f"sacrebleu test set {self.sacrebleu['test_set']} {self.sacrebleu['langpair']}"


@dataclass
class Catalog:
    datasets: dict[str, dict[str, SplitSource]] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)

    def split(self, ref: str) -> SplitSource:
        """Look up ``"<dataset>/<split>"``; an unknown name is an error with a suggestion."""
        if not isinstance(ref, str) or ref.count("/") != 1:
            raise MtkitError(f"data reference {ref!r} must look like <dataset>/<split>, e.g. multi30k/train")
        dataset, name = ref.split("/")
        if dataset not in self.datasets:
            hint = did_you_mean(dataset, sorted(self.datasets), listing="known")
            raise MtkitError(f"unknown dataset '{dataset}' in '{ref}'{hint}")
        splits = self.datasets[dataset]
        if name not in splits:
            hint = did_you_mean(name, sorted(splits), listing="known")
            raise MtkitError(f"unknown split '{name}' of dataset '{dataset}'{hint}")
        return splits[name]


def _check_split(dataset: str, name: str, raw: Any, where: str) -> SplitSource:
    ctx = f"{where}: datasets.{dataset}.splits.{name}"
    if not isinstance(raw, dict):
        raise MtkitError(f"{ctx} must be a mapping")
    known = {"langs", "url", "archive", "member", "format", "sacrebleu", "sha256"}
    if unknown := set(raw) - known:
        raise MtkitError(f"{ctx}: unknown key '{sorted(unknown)[0]}' (known: {', '.join(sorted(known))})")
    langs = raw.get("langs")
    if not isinstance(langs, list) or not langs or not all(isinstance(x, str) for x in langs):
        raise MtkitError(f"{ctx}.langs must be a non-empty list of language codes")
    if len([k for k in ("url", "archive", "sacrebleu") if raw.get(k)]) != 1:
        raise MtkitError(f"{ctx} needs exactly one source: url, archive or sacrebleu")
    if raw.get("archive") and not raw.get("member"):
        raise MtkitError(f"{ctx}: an archive source needs 'member'")
    fmt = raw.get("format", "text")
    if fmt not in FORMATS:
        raise MtkitError(f"{ctx}.format '{fmt}' is not one of {', '.join(FORMATS)}")
    sb = raw.get("sacrebleu")
    if sb is not None and (not isinstance(sb, dict) or set(sb) != {"test_set", "langpair"}):
        raise MtkitError(f"{ctx}.sacrebleu needs exactly test_set and langpair")
    sha = raw.get("sha256")
    for s in sha.values() if isinstance(sha, dict) else [sha]:
        if s is not None and not (isinstance(s, str) and re.fullmatch(r"[0-9a-f]{64}", s)):
            raise MtkitError(f"{ctx}.sha256 {s!r} is not a sha256 hex digest")
    return SplitSource(
        dataset=dataset, name=name, langs=tuple(langs), url=raw.get("url"), archive=raw.get("archive"),
        member=raw.get("member"), format=fmt, sacrebleu=dict(sb) if sb else None, sha256=sha,
    )


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Read and validate a catalog file (the one shipped with mtkit by default)."""
    path = Path(path) if path is not None else CATALOG_PATH
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MtkitError(f"dataset catalog not found: {path}") from None
    except yaml.YAMLError:
        raise MtkitError(f"dataset catalog {path}: invalid YAML") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("datasets"), dict):
        raise MtkitError(f"dataset catalog {path} must hold a 'datasets' mapping")
    cat = Catalog()
    for dataset, entry in raw["datasets"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("splits"), dict):
            raise MtkitError(f"{path}: datasets.{dataset} needs a 'splits' mapping")
        cat.descriptions[dataset] = str(entry.get("description", "")).strip()
        cat.datasets[dataset] = {
            name: _check_split(dataset, name, s, str(path)) for name, s in entry["splits"].items()
        }
    return cat


# --- resolution ------------------------------------------------------------------------------

DataDirs = str | Path | Sequence[str | Path] | None  # one directory, os.pathsep-separated ones, or a list
_WARNED_MISSING: set[Path] = set()  # data directories already warned about in this process


def data_dirs(data_dir: DataDirs = None) -> list[Path]:
    """The data directories to search: ``data_dir`` if given, else ``MTKIT_DATA``."""
    if data_dir:
        items = [data_dir] if isinstance(data_dir, (str, Path)) else list(data_dir)
    else:
        items = [p for p in os.environ.get("MTKIT_DATA", "").split(os.pathsep) if p]
    dirs = [Path(part).expanduser() for item in items for part in str(item).split(os.pathsep) if part]
    for d in dirs:
        if not d.is_dir() and d not in _WARNED_MISSING:
            _WARNED_MISSING.add(d)
            source = "--data-dir" if data_dir else "MTKIT_DATA"
            logger.warning("%s names %s, which is not a directory; looking in the cache and downloading instead",
                           source, d)
    return dirs


def cache_dir() -> Path:
    env = os.environ.get("MTKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mtkit"


def find_local(split: SplitSource, lang: str, dirs: Sequence[Path]) -> tuple[Path, str] | None:
    """The first local copy of ``split``'s ``lang`` file: (path, "data-dir" | "cache")."""
    places = [(sub, "data-dir") for d in dirs for sub in (d, d / split.dataset)]
    for place, kind in [*places, (cache_dir() / split.dataset, "cache")]:
        for name in (split.filename(lang), f"{split.name}.{lang}"):
            if (place / name).is_file():
                return place / name, kind
    return None


def where_to_place(splits_langs: Sequence[tuple[SplitSource, str]], dirs: Sequence[Path]) -> str:
    files = ", ".join(s.filename(lang) for s, lang in splits_langs)
    datasets = sorted({s.dataset for s, _ in splits_langs})
    target = str(dirs[0]) if dirs else "a directory passed as --data-dir or MTKIT_DATA"
    caches = " or ".join(str(cache_dir() / d) for d in datasets)
    return f"place {files} in {target} (or in {caches})"


def resolve_file(
    split: SplitSource, lang: str, data_dir: DataDirs = None, allow_download: bool = True
) -> Path:
    """Find or fetch one file of a split; returns a local path (plain text or gzip)."""
    if lang not in split.langs:
        raise MtkitError(f"{split.ref} has no '{lang}' side (languages: {', '.join(split.langs)})")
    dirs = data_dirs(data_dir)
    found = find_local(split, lang, dirs)
    if found is not None:
        logger.debug("%s.%s: %s (%s)", split.ref, lang, found[0], found[1])
        return found[0]
    dest = cache_dir() / split.dataset / split.filename(lang)
    archive = _cached_archive(split)  # a hand-placed archive counts as local
    offline = os.environ.get("MTKIT_OFFLINE", "").strip().lower() in ("1", "true", "yes")
    if archive is None and (offline or not allow_download):
        why = "downloads are off" if allow_download else "this run does not download"
        raise MtkitError(f"no local copy of {split.ref} ({lang}) and {why}: {where_to_place([(split, lang)], dirs)}")
    try:
        _fetch(split, lang, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise MtkitError(
            f"could not download {split.source(lang)} ({reason}); offline? {where_to_place([(split, lang)], dirs)}"
        ) from None
    return dest


def test_set_file(
    ref: str, langpair: str, side: str = "ref", data_dir: DataDirs = None, catalog: Catalog | None = None
) -> Path:
    """One side of a catalog split for a language pair, found or fetched as a recipe's prepare
    stage does: ``src`` is the pair's first language, ``ref`` its second."""
    src, sep, tgt = langpair.partition("-")
    if not (sep and src and tgt) or "-" in tgt:
        raise MtkitError(f"language pair '{langpair}' must look like en-de (source-target)")
    if side not in SIDES:
        raise MtkitError(f"unknown side '{side}'; valid: {', '.join(SIDES)}")
    split = (catalog or load_catalog()).split(ref)
    for lang in (src, tgt):
        if lang not in split.langs:
            raise MtkitError(f"{split.ref} has no '{lang}' side (languages: {', '.join(split.langs)})")
    return resolve_file(split, src if side == "src" else tgt, data_dir)


def resolution_plan(
    refs_langs: Sequence[tuple[str, str]], data_dir: DataDirs = None, catalog: Catalog | None = None
) -> list[dict[str, str]]:
    """Where each (ref, lang) file would come from, without fetching anything."""
    cat = catalog or load_catalog()
    dirs = data_dirs(data_dir)
    plan = []
    for ref, lang in refs_langs:
        split = cat.split(ref)
        found = find_local(split, lang, dirs)
        if found is None:
            archive = _cached_archive(split)
            found = (archive, "cached archive") if archive is not None else (split.source(lang), "download")
        plan.append({"ref": ref, "lang": lang, "from": found[1], "path": str(found[0])})
    return plan


# --- fetching --------------------------------------------------------------------------------

def _archive_path(split: SplitSource) -> Path:
    return cache_dir() / "downloads" / Path(split.archive.split("?")[0]).name


def _cached_archive(split: SplitSource) -> Path | None:
    return _archive_path(split) if split.archive and _archive_path(split).is_file() else None


def _fetch(split: SplitSource, lang: str, dest: Path) -> None:
    if split.url:
        url = split.url.format(lang=lang)
        raw = cache_dir() / "downloads" / f"{split.dataset}.{Path(url).name}"
        download(url, raw, split.checksum(lang))
        if raw.name.endswith(".gz"):
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(raw, dest)
        else:
            write_gz(decode_lines(raw.read_bytes(), url), dest)
    elif split.archive:
        path = _cached_archive(split) or download(split.archive, _archive_path(split), split.checksum(lang))
        member = split.member.format(lang=lang)
        data = read_member(path, member)
        write_gz(convert(decode_lines(data, f"{path}:{member}"), split.format), dest)
    else:
        test_set, langpair = split.sacrebleu["test_set"], split.sacrebleu["langpair"]
        src_lang, tgt_lang = langpair.split("-")
        if lang not in (src_lang, tgt_lang):
            raise MtkitError(f"{split.ref}: sacrebleu pair {langpair} has no '{lang}' side")
        path = sacrebleu_file(test_set, langpair, "src" if lang == src_lang else "ref")
        with open(path, encoding="utf-8") as f:
            write_gz((line.rstrip("\n") for line in f), dest)

"""``mtkit preprocess``: raw parallel text -> sentencepiece model(s) + binarized shards + manifest.

Validate the input files; train sentencepiece on a bounded sample of the training text (or reuse
given models; :mod:`mtkit.data.subword`); encode every split in chunks with a pool of worker
processes, cleaning the training pairs (empty side, too many tokens, length ratio, duplicates;
:mod:`mtkit.data.binarize`); write ``<split>.<lang>.bin`` (concatenated ids), ``<split>.<lang>.idx``
(int64 offsets, n + 1 of them) and ``manifest.json`` into a temp dir beside the output dir, renamed
into place at the end, so a failed run leaves nothing that looks complete. Memory stays bounded:
the corpus is streamed in chunks and duplicate detection keeps 8 bytes per pair."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mtkit import __version__
from mtkit.data.binarize import EncoderPool, binarize_split, shard_dtype
from mtkit.data.dataset import DATA_FORMAT
from mtkit.data.subword import load_models, train_models, write_models
from mtkit.data.text import SplitFiles, display_name, iter_parallel, resolve_corpus_file
from mtkit.errors import MtkitError

logger = logging.getLogger("mtkit.preprocess")


def preprocess(
    src_lang: str, tgt_lang: str, train_prefix: str | Path, out_dir: str | Path,
    valid_prefix: str | Path | None = None, test_prefixes: Sequence[str | Path] = (),
    vocab_size: int = 8000, model_type: str = "bpe", joint: bool = True, spm_models: Sequence[str | Path] = (),
    character_coverage: float = 1.0, user_defined_symbols: Sequence[str] = (),
    max_len: int = 250, max_ratio: float = 3.0, dedup: bool = False, workers: int = 2, force: bool = False,
) -> dict[str, Any]:
    """Preprocess a parallel corpus into ``out_dir``; returns the manifest (also in manifest.json)."""
    options = dict(  # recorded in the manifest, in this order
        vocab_size=vocab_size, model_type=model_type, joint=joint, spm_models=[str(p) for p in spm_models],
        character_coverage=character_coverage, user_defined_symbols=list(user_defined_symbols),
        max_len=max_len, max_ratio=max_ratio, dedup=dedup, workers=workers,
    )
    t0 = time.monotonic()
    _check_options(src_lang, tgt_lang, vocab_size, model_type, spm_models, character_coverage, workers)
    splits = _resolve_splits(src_lang, tgt_lang, train_prefix, valid_prefix, test_prefixes)
    out = Path(os.path.abspath(out_dir))  # normalized, so that "." and ".." have a name to rename
    _check_out_dir(out, force, [p for s in splits for p in (s.src, s.tgt)] + [Path(m) for m in spm_models])
    for split in splits[1:]:  # cheap checks (line counts, UTF-8) before the expensive part
        split.pairs = sum(1 for _ in iter_parallel(split.src, split.tgt))

    tmp = _temp_dir(out)
    try:
        manifest, t_end = _write_data(tmp, splits, src_lang, tgt_lang, options, t0)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    train, filters = manifest["splits"]["train"], manifest["filters"]
    dropped = filters["input_pairs"] - train["pairs"]
    logger.info("wrote %s: %d training pairs (%d read, %d dropped), %.1fs",
                out, train["pairs"], filters["input_pairs"], dropped, t_end - t0)
    return manifest


def _write_data(
    tmp: Path, splits: list[SplitFiles], src_lang: str, tgt_lang: str, options: dict[str, Any], t0: float
) -> tuple[dict[str, Any], float]:
    """Write the sentencepiece models, the shards and ``manifest.json`` into ``tmp``; returns
    the manifest and the time the encoding ended."""
    t_spm = time.monotonic()
    if options["spm_models"]:
        src_spm, tgt_spm = load_models(options["spm_models"])
    else:
        src_spm, tgt_spm = train_models(
            splits[0], options["vocab_size"], options["model_type"], options["joint"],
            options["character_coverage"], options["user_defined_symbols"], options["workers"],
        )
    joint = src_spm.model_bytes == tgt_spm.model_bytes
    spm_info = write_models(tmp, src_spm, tgt_spm, joint, src_lang, tgt_lang)
    t_encode = time.monotonic()
    dtypes = {side: shard_dtype(m.size) for side, m in (("src", src_spm), ("tgt", tgt_spm))}
    split_stats: dict[str, Any] = {}
    filters: dict[str, Any] = {}
    limits = (options["max_len"], options["max_ratio"], options["dedup"])
    with EncoderPool(src_spm, tgt_spm, options["workers"]) as encode:
        for split in splits:
            cleaning = limits if split.name == "train" else None
            stats, report = binarize_split(split, tmp, src_lang, tgt_lang, dtypes, encode, cleaning)
            split_stats[split.name] = stats
            filters = report or filters
    if split_stats["train"]["pairs"] == 0:
        dropped = ", ".join(f"{k} {v}" for k, v in filters["dropped"].items())
        raise MtkitError(
            f"no training pairs left after filtering {display_name(splits[0].src)} / "
            f"{display_name(splits[0].tgt)} ({filters['input_pairs']} read; dropped: {dropped})"
        )
    t_end = time.monotonic()
    seconds = {"spm": t_encode - t_spm, "encode": t_end - t_encode, "total": t_end - t0}
    # what the trainer and the dataset loader read back
    manifest = {
        "mtkit_version": __version__, "format": DATA_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "src_lang": src_lang, "tgt_lang": tgt_lang, "joint": joint, "spm": spm_info,
        "vocab": {
            "src_size": src_spm.size, "tgt_size": tgt_spm.size,
            "pad": src_spm.pad, "bos": src_spm.bos, "eos": src_spm.eos, "unk": src_spm.unk,
        },
        "dtype": dtypes, "splits": split_stats, "filters": filters, "options": options,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest, t_end


# --- inputs and output dir -----------------------------------------------------------------------

def _check_options(
    src_lang: str, tgt_lang: str, vocab_size: int, model_type: str, spm_models: Sequence[str | Path],
    character_coverage: float, workers: int,
) -> None:
    for lang in (src_lang, tgt_lang):
        if not lang or "/" in lang or os.sep in lang or lang.startswith("."):
            raise MtkitError(f"language code {lang!r} must be a plain suffix such as 'en'")
    if src_lang == tgt_lang:
        raise MtkitError(f"source and target languages must differ (both are '{src_lang}')")
    if not spm_models:
        if vocab_size < 8:
            raise MtkitError(f"vocab size {vocab_size} is too small (at least 8)")
        if model_type not in ("bpe", "unigram"):
            raise MtkitError(f"model type '{model_type}' is not one of: bpe, unigram")
        if not 0.0 < character_coverage <= 1.0:
            raise MtkitError(f"character coverage {character_coverage} must be in (0, 1]")
    if len(spm_models) > 2:
        raise MtkitError(f"--spm takes one model (joint) or two (source, target), got {len(spm_models)}")
    if workers < 1:
        raise MtkitError(f"workers must be at least 1, got {workers}")


def _resolve_splits(
    src_lang: str, tgt_lang: str, train_prefix: str | Path, valid_prefix: str | Path | None,
    test_prefixes: Sequence[str | Path],
) -> list[SplitFiles]:
    named: list[tuple[str, str | Path]] = [("train", train_prefix)]
    if valid_prefix:
        named.append(("valid", valid_prefix))
    named += [(Path(p).name, p) for p in test_prefixes]
    splits: list[SplitFiles] = []
    for name, prefix in named:
        if not name or name.startswith(".") or name in {s.name for s in splits}:
            raise MtkitError(
                f"test prefix {prefix} gives the split name '{name}', which is empty or already used "
                "(split names: train, valid, and each test prefix's basename)"
            )
        src, tgt = resolve_corpus_file(prefix, src_lang), resolve_corpus_file(prefix, tgt_lang)
        splits.append(SplitFiles(name, src, tgt))
    return splits


def _check_out_dir(out: Path, force: bool, inputs: Iterable[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise MtkitError(f"output path {out} exists and is not a directory")
    for parent in out.parents:  # the nearest existing ancestor must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise MtkitError(f"cannot create output directory {out}: {parent} is not a directory")
            break
    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise MtkitError(f"output directory {out} is not empty (use --force to overwrite it)")
    root = out.resolve()
    for path in inputs:
        if root in path.resolve().parents:
            raise MtkitError(
                f"--force would delete the input {path}: it lies inside the output directory {out}"
            )


def _temp_dir(out: Path) -> Path:
    """A fresh temp dir beside ``out``, renamed to ``out`` once the data is complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished temp dir to ``out``; an existing ``out`` is removed only afterwards."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

"""``mtkit preprocess``: raw parallel text -> sentencepiece model(s) + binarized shards + manifest.

Steps: resolve and validate the input files; train sentencepiece on a bounded sample of the
training text (or reuse given models); encode every split in chunks with a pool of worker
processes; clean the training pairs (empty side, too many tokens, length ratio, duplicates);
write ``<split>.<lang>.bin`` (concatenated ids) and ``<split>.<lang>.idx`` (int64 offsets,
n + 1 of them) plus ``manifest.json``. Everything is written into a temp dir beside the output
dir and renamed into place at the end, so a failed run leaves nothing that looks complete.
Memory stays bounded: the corpus is streamed in chunks and duplicate detection keeps 8 bytes
per pair.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing as mp
import os
import random
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from mtkit import __version__
from mtkit.data.dataset import DATA_FORMAT
from mtkit.data.subword import SubwordModel, train_sentencepiece
from mtkit.data.text import (
    FILTER_NAMES,
    KEEP,
    DuplicateFilter,
    display_name,
    filter_codes,
    iter_parallel,
    pair_hashes,
    resolve_corpus_file,
)
from mtkit.errors import MtkitError
from mtkit.utils import progress

logger = logging.getLogger("mtkit.preprocess")

SPM_TRAIN_SENTENCES = 1_000_000  # at most this many sentences (per model) train sentencepiece
CHUNK_PAIRS = 5_000  # pairs per unit of work sent to an encoding process
UINT16_LIMIT = 1 << 16


@dataclass
class SplitFiles:
    """The source and target files of one split (train, valid, test...) to binarize."""

    name: str
    src: Path
    tgt: Path
    pairs: int | None = None  # line count, when a previous pass has counted it


def preprocess(
    src_lang: str,
    tgt_lang: str,
    train_prefix: str | Path,
    out_dir: str | Path,
    valid_prefix: str | Path | None = None,
    test_prefixes: Sequence[str | Path] = (),
    vocab_size: int = 8000,
    model_type: str = "bpe",
    joint: bool = True,
    spm_models: Sequence[str | Path] = (),
    character_coverage: float = 1.0,
    user_defined_symbols: Sequence[str] = (),
    max_len: int = 250,
    max_ratio: float = 3.0,
    dedup: bool = False,
    workers: int = 2,
    force: bool = False,
) -> dict[str, Any]:
    """Preprocess a parallel corpus into ``out_dir``; returns the manifest (also in manifest.json)."""
    options = {
        "vocab_size": vocab_size,
        "model_type": model_type,
        "joint": joint,
        "spm_models": [str(p) for p in spm_models],
        "character_coverage": character_coverage,
        "user_defined_symbols": list(user_defined_symbols),
        "max_len": max_len,
        "max_ratio": max_ratio,
        "dedup": dedup,
        "workers": workers,
    }
    t0 = time.monotonic()
    _check_options(
        src_lang, tgt_lang, vocab_size, model_type, spm_models, character_coverage, workers
    )
    splits = _resolve_splits(src_lang, tgt_lang, train_prefix, valid_prefix, test_prefixes)
    out = Path(os.path.abspath(out_dir))  # normalized, so that "." and ".." have a name to rename
    _check_out_dir(
        out, force, [p for s in splits for p in (s.src, s.tgt)] + [Path(m) for m in spm_models]
    )
    for split in splits[1:]:  # cheap checks (line counts, UTF-8) before the expensive part
        split.pairs = sum(1 for _ in iter_parallel(split.src, split.tgt))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        t_spm = time.monotonic()
        if spm_models:
            src_spm, tgt_spm = _load_models(spm_models)
        else:
            src_spm, tgt_spm = _train_models(
                splits[0],
                vocab_size,
                model_type,
                joint,
                character_coverage,
                user_defined_symbols,
                workers,
            )
        joint = src_spm.model_bytes == tgt_spm.model_bytes
        spm_info = _write_models(tmp, src_spm, tgt_spm, joint, src_lang, tgt_lang)
        t_encode = time.monotonic()
        dtypes = {side: _dtype(m.size) for side, m in (("src", src_spm), ("tgt", tgt_spm))}
        split_stats: dict[str, Any] = {}
        filters: dict[str, Any] = {}
        with _encoder_pool(src_spm, tgt_spm, workers) as encode:
            for split in splits:
                cleaning = (max_len, max_ratio, dedup) if split.name == "train" else None
                split_stats[split.name], report = _binarize(
                    split, tmp, src_lang, tgt_lang, dtypes, encode, cleaning
                )
                if report is not None:
                    filters = report
        if split_stats["train"]["pairs"] == 0:
            dropped = ", ".join(f"{k} {v}" for k, v in filters["dropped"].items())
            raise MtkitError(
                f"no training pairs left after filtering {display_name(splits[0].src)} / "
                f"{display_name(splits[0].tgt)} ({filters['input_pairs']} read; dropped: {dropped})"
            )
        t_end = time.monotonic()
        manifest = {
            "mtkit_version": __version__,
            "format": DATA_FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "src_lang": src_lang,
            "tgt_lang": tgt_lang,
            "joint": joint,
            "spm": spm_info,
            "vocab": {
                "src_size": src_spm.size,
                "tgt_size": tgt_spm.size,
                "pad": src_spm.pad,
                "bos": src_spm.bos,
                "eos": src_spm.eos,
                "unk": src_spm.unk,
            },
            "dtype": dtypes,
            "splits": split_stats,
            "filters": filters,
            "options": options,
            "seconds": {
                "spm": round(t_encode - t_spm, 3),
                "encode": round(t_end - t_encode, 3),
                "total": round(t_end - t0, 3),
            },
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    train = split_stats["train"]
    logger.info(
        "wrote %s: %d training pairs (%d read, %d dropped), %.1fs",
        out,
        train["pairs"],
        filters["input_pairs"],
        filters["input_pairs"] - train["pairs"],
        t_end - t0,
    )
    return manifest


# --- inputs and output dir -----------------------------------------------------------------------


def _check_options(
    src_lang: str,
    tgt_lang: str,
    vocab_size: int,
    model_type: str,
    spm_models: Sequence[str | Path],
    character_coverage: float,
    workers: int,
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
        raise MtkitError(
            f"--spm takes one model (joint) or two (source, target), got {len(spm_models)}"
        )
    if workers < 1:
        raise MtkitError(f"workers must be at least 1, got {workers}")


def _resolve_splits(
    src_lang: str,
    tgt_lang: str,
    train_prefix: str | Path,
    valid_prefix: str | Path | None,
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
        splits.append(
            SplitFiles(
                name, resolve_corpus_file(prefix, src_lang), resolve_corpus_file(prefix, tgt_lang)
            )
        )
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


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished temp dir to ``out``; an existing ``out`` is removed only afterwards."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- sentencepiece -------------------------------------------------------------------------------


def _load_models(paths: Sequence[str | Path]) -> tuple[SubwordModel, SubwordModel]:
    models = [SubwordModel.from_file(p) for p in paths]
    src, tgt = models[0], models[-1]
    for attr in ("pad", "bos", "eos", "unk"):
        if getattr(src, attr) != getattr(tgt, attr):
            raise MtkitError(
                f"sentencepiece models {paths[0]} and {paths[1]} disagree on the {attr} id "
                f"({getattr(src, attr)} vs {getattr(tgt, attr)})"
            )
    return src, tgt


class Reservoir:
    """A uniform sample of at most ``size`` items from a stream (algorithm R), seeded."""

    def __init__(self, size: int, seed: int = 1):
        self.size, self.seen, self.items = size, 0, []
        self.rng = random.Random(seed)

    def add(self, item: str) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(item)
        else:
            j = self.rng.randrange(self.seen)
            if j < self.size:
                self.items[j] = item


def _train_models(
    train: SplitFiles,
    vocab_size: int,
    model_type: str,
    joint: bool,
    character_coverage: float,
    user_defined_symbols: Sequence[str],
    workers: int,
) -> tuple[SubwordModel, SubwordModel]:
    """Train sentencepiece on a sample of the non-empty training lines (both sides if joint)."""
    src_sample = Reservoir(SPM_TRAIN_SENTENCES, seed=1)
    tgt_sample = src_sample if joint else Reservoir(SPM_TRAIN_SENTENCES, seed=2)
    pairs = src_lines = tgt_lines = 0  # pairs read, non-empty lines per side
    for src, tgt in progress(iter_parallel(train.src, train.tgt), desc="read train", unit="pairs"):
        pairs += 1
        if src.strip():
            src_lines += 1
            src_sample.add(src)
        if tgt.strip():
            tgt_lines += 1
            tgt_sample.add(tgt)
    train.pairs = pairs
    where = f"{display_name(train.src)} / {display_name(train.tgt)}"
    if pairs == 0:
        raise MtkitError(f"training corpus {where} is empty")
    if not src_lines or not tgt_lines:
        empty = display_name(train.src if not src_lines else train.tgt)
        raise MtkitError(f"training file {empty} has only empty lines")

    def fit(sample: Reservoir, side: str) -> SubwordModel:
        logger.info(
            "training %s %s sentencepiece model (vocab %d) on %d of %d sentences",
            side,
            model_type,
            vocab_size,
            len(sample.items),
            sample.seen,
        )
        try:
            return train_sentencepiece(
                sample.items,
                vocab_size,
                model_type,
                character_coverage,
                user_defined_symbols,
                input_sentence_size=0,  # 0: all (already sampled)
                num_threads=workers,
            )
        except MtkitError as exc:
            raise MtkitError(f"{exc} ({side} model, trained on {where})") from None

    if joint:
        model = fit(src_sample, "joint")
        return model, model
    return fit(src_sample, "source"), fit(tgt_sample, "target")


def _write_models(
    tmp: Path, src: SubwordModel, tgt: SubwordModel, joint: bool, src_lang: str, tgt_lang: str
) -> dict[str, dict[str, str]]:
    names = (
        {"src": "spm.model", "tgt": "spm.model"}
        if joint
        else {"src": f"spm.{src_lang}.model", "tgt": f"spm.{tgt_lang}.model"}
    )
    info = {}
    for side, model in (("src", src), ("tgt", tgt)):
        (tmp / names[side]).write_bytes(model.model_bytes)
        info[side] = {"file": names[side], "sha256": model.sha256}
    return info


def _dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size < UINT16_LIMIT else "int32"


# --- encoding ------------------------------------------------------------------------------------

Chunk = tuple[list[str], list[str], bool]  # source lines, target lines, whether to hash pairs
Encoded = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]

_worker: dict[str, Any] = {}


def _init_worker(src_bytes: bytes, tgt_bytes: bytes) -> None:
    _worker["src"] = SubwordModel(src_bytes, "source model")
    _worker["tgt"] = (
        _worker["src"] if tgt_bytes == src_bytes else SubwordModel(tgt_bytes, "target model")
    )


def _flatten(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32, count=int(lens.sum()))
    return flat, lens


def _encode_chunk(chunk: Chunk) -> Encoded:
    """(src ids, src lens, tgt ids, tgt lens, pair hashes or None) for one chunk of lines."""
    src_lines, tgt_lines, hashed = chunk
    src_ids, src_lens = _flatten(_worker["src"].sp.encode(src_lines, out_type=int, num_threads=1))
    tgt_ids, tgt_lens = _flatten(_worker["tgt"].sp.encode(tgt_lines, out_type=int, num_threads=1))
    hashes = pair_hashes(src_lines, tgt_lines) if hashed else None
    return src_ids, src_lens, tgt_ids, tgt_lens, hashes


class _encoder_pool:
    """Context manager giving ``encode(chunks) -> iterator of results`` in input order.

    With one worker it encodes in this process; otherwise a process pool, with at most two
    chunks per worker in flight so that reading never runs ahead of encoding.
    """

    def __init__(self, src: SubwordModel, tgt: SubwordModel, workers: int):
        self.args = (src.model_bytes, tgt.model_bytes)
        self.workers = workers
        self.pool: Any = None

    def __enter__(self) -> Callable[[Iterable[Chunk]], Iterator[Encoded]]:
        if self.workers > 1:
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods and sys.platform == "linux" else None)
            self.pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=self.args)
        else:
            _init_worker(*self.args)
        return self.encode

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
        _worker.clear()

    def encode(self, chunks: Iterable[Chunk]) -> Iterator[Encoded]:
        if self.pool is None:
            yield from map(_encode_chunk, chunks)
            return
        pending: deque[Any] = deque()
        for chunk in chunks:
            pending.append(self.pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _chunks(split: SplitFiles, hashed: bool) -> Iterator[Chunk]:
    it = iter_parallel(split.src, split.tgt)
    while True:
        block = list(itertools.islice(it, CHUNK_PAIRS))
        if not block:
            return
        yield [s for s, _ in block], [t for _, t in block], hashed


class _ShardWriter:
    """Appends id sequences to ``<split>.<lang>.bin`` and their offsets to ``.idx``."""

    def __init__(self, directory: Path, split: str, lang: str, dtype: str):
        self.bin = open(directory / f"{split}.{lang}.bin", "wb")
        self.idx = open(directory / f"{split}.{lang}.idx", "wb")
        self.dtype = np.dtype(dtype)
        self.offset = 0
        self.n = 0
        self.max_len = 0
        self.idx.write(np.zeros(1, dtype=np.int64).tobytes())

    def add(self, flat: np.ndarray, lens: np.ndarray) -> None:
        self.bin.write(flat.astype(self.dtype, copy=False).tobytes())
        self.idx.write((self.offset + np.cumsum(lens, dtype=np.int64)).tobytes())
        self.offset += int(lens.sum())
        self.n += len(lens)
        self.max_len = max(self.max_len, int(lens.max(initial=0)))

    def close(self) -> None:
        self.bin.close()
        self.idx.close()


def _binarize(
    split: SplitFiles,
    tmp: Path,
    src_lang: str,
    tgt_lang: str,
    dtypes: dict[str, str],
    encode: Callable[[Iterable[Chunk]], Iterator[Encoded]],
    cleaning: tuple[int, float, bool] | None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Encode one split into its shards; ``cleaning`` = (max_len, max_ratio, dedup) for train."""
    dedup = cleaning is not None and cleaning[2]
    seen = DuplicateFilter() if dedup else None
    dropped = {name: 0 for name in (*FILTER_NAMES.values(), "duplicate")}
    read = 0
    writers = (
        _ShardWriter(tmp, split.name, src_lang, dtypes["src"]),
        _ShardWriter(tmp, split.name, tgt_lang, dtypes["tgt"]),
    )
    total = None if split.pairs is None else -(-split.pairs // CHUNK_PAIRS)
    try:
        results = encode(_chunks(split, dedup))
        for src_ids, src_lens, tgt_ids, tgt_lens, hashes in progress(
            results, total=total, desc=f"encode {split.name}", unit="chunks"
        ):
            read += len(src_lens)
            if cleaning is not None:
                codes = filter_codes(src_lens, tgt_lens, cleaning[0], cleaning[1])
                for code, name in FILTER_NAMES.items():
                    dropped[name] += int(np.count_nonzero(codes == code))
                keep = codes == KEEP
                if seen is not None and hashes is not None:
                    fresh = np.zeros_like(keep)
                    fresh[keep] = seen.first_seen(hashes[keep])
                    dropped["duplicate"] += int(np.count_nonzero(keep & ~fresh))
                    keep = fresh
                if not keep.all():
                    src_ids, src_lens = src_ids[np.repeat(keep, src_lens)], src_lens[keep]
                    tgt_ids, tgt_lens = tgt_ids[np.repeat(keep, tgt_lens)], tgt_lens[keep]
            writers[0].add(src_ids, src_lens)
            writers[1].add(tgt_ids, tgt_lens)
    finally:
        for w in writers:
            w.close()
    src_w, tgt_w = writers
    stats = {
        "pairs": src_w.n,
        "src_tokens": src_w.offset,
        "tgt_tokens": tgt_w.offset,
        "src_max_len": src_w.max_len,
        "tgt_max_len": tgt_w.max_len,
        "src_files": [str(split.src)],
        "tgt_files": [str(split.tgt)],
    }
    logger.info("%s: %d pairs, %d / %d tokens", split.name, src_w.n, src_w.offset, tgt_w.offset)
    if cleaning is None:
        return stats, None
    if not dedup:
        del dropped["duplicate"]
    report = {"input_pairs": read, "dropped": dropped, "kept": src_w.n}
    if any(dropped.values()):
        logger.info(
            "train filters dropped %s", ", ".join(f"{k}: {v}" for k, v in dropped.items() if v)
        )
    return stats, report

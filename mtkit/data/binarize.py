"""Binarizing one split: encode its lines in chunks (in a pool of worker processes), drop the
training pairs the filters reject, and append the ids to ``<split>.<lang>.bin`` with their int64
offsets (n + 1 of them) in ``<split>.<lang>.idx``."""

from __future__ import annotations

import hashlib
import itertools
import logging
import multiprocessing as mp
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mtkit.data.subword import SubwordModel
from mtkit.data.text import SplitFiles, iter_parallel
from mtkit.utils import progress

logger = logging.getLogger("mtkit.preprocess")

CHUNK_PAIRS = 5_000  # pairs per unit of work sent to an encoding process
UINT16_LIMIT = 1 << 16


def shard_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size < UINT16_LIMIT else "int32"


# --- cleaning filters over token lengths (training data only) -------------------------------------
# A pair is counted under the first filter that drops it, in this order; duplicates are found
# afterwards among the kept pairs.
KEEP, EMPTY, TOO_LONG, RATIO = 0, 1, 2, 3
FILTER_NAMES = {EMPTY: "empty", TOO_LONG: "max_len", RATIO: "ratio"}


def filter_codes(src_lens: np.ndarray, tgt_lens: np.ndarray, max_len: int, max_ratio: float) -> np.ndarray:
    """Per pair: KEEP, or the code of the first filter that drops it. EMPTY: a side has no
    tokens. TOO_LONG: a side has more than ``max_len`` subword tokens (``max_len <= 0``: off).
    RATIO: longer / shorter side > ``max_ratio`` (``<= 0``: off)."""
    src_lens = np.asarray(src_lens, dtype=np.int64)
    tgt_lens = np.asarray(tgt_lens, dtype=np.int64)
    codes = np.full(len(src_lens), KEEP, dtype=np.int8)
    if max_ratio > 0:
        longer, shorter = np.maximum(src_lens, tgt_lens), np.minimum(src_lens, tgt_lens)
        codes[longer > max_ratio * np.maximum(shorter, 1)] = RATIO
    if max_len > 0:
        codes[(src_lens > max_len) | (tgt_lens > max_len)] = TOO_LONG
    codes[(src_lens == 0) | (tgt_lens == 0)] = EMPTY
    return codes


def pair_hashes(src_lines: list[str], tgt_lines: list[str]) -> np.ndarray:
    """An 8-byte hash (uint64) of each exact (source, target) pair of lines: its blake2b digest,
    read little-endian."""
    pairs = zip(src_lines, tgt_lines)
    digests = b"".join(hashlib.blake2b(f"{s}\n{t}".encode(), digest_size=8).digest() for s, t in pairs)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


class DuplicateFilter:
    """Remembers pair hashes at 8 bytes each: sorted uint64 runs merged like a binary counter.
    ``first_seen(hashes)`` marks each hash not seen in earlier calls nor earlier in this batch,
    and remembers the batch; lookups cost O(batch * log n) per run, with O(log n) runs."""

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs)

    def first_seen(self, hashes: np.ndarray) -> np.ndarray:
        hashes = np.asarray(hashes, dtype=np.uint64)
        new = np.zeros(len(hashes), dtype=bool)
        _, first = np.unique(hashes, return_index=True)
        new[first] = True
        for run in self.runs:
            pos = np.minimum(np.searchsorted(run, hashes), len(run) - 1)
            new &= run[pos] != hashes
        added = np.sort(hashes[new])
        if len(added):
            self.runs.append(added)
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            last = self.runs.pop()
            self.runs[-1] = np.sort(np.concatenate((self.runs[-1], last)), kind="stable")
        return new


# --- encoding ------------------------------------------------------------------------------------

Chunk = tuple[list[str], list[str], bool]  # source lines, target lines, whether to hash pairs
Encoded = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]

_worker: dict[str, Any] = {}


def _init_worker(src_bytes: bytes, tgt_bytes: bytes) -> None:
    _worker["src"] = SubwordModel(src_bytes, "source model")
    _worker["tgt"] = _worker["src"] if tgt_bytes == src_bytes else SubwordModel(tgt_bytes, "target model")


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


class EncoderPool:
    """Context manager giving ``encode(chunks) -> iterator of results`` in input order: encoded in
    this process with one worker, else in a process pool with at most two chunks per worker in
    flight, so that reading never runs ahead of encoding."""

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
    while block := list(itertools.islice(it, CHUNK_PAIRS)):
        yield [s for s, _ in block], [t for _, t in block], hashed


class _ShardWriter:
    """Appends id sequences to ``<split>.<lang>.bin`` and their offsets to ``.idx``."""

    def __init__(self, directory: Path, split: str, lang: str, dtype: str):
        self.bin = open(directory / f"{split}.{lang}.bin", "wb")
        self.idx = open(directory / f"{split}.{lang}.idx", "wb")
        self.dtype = np.dtype(dtype)
        self.offset = self.n = self.max_len = 0  # ids written, sequences written, longest sequence
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


def binarize_split(
    split: SplitFiles, tmp: Path, src_lang: str, tgt_lang: str, dtypes: dict[str, str],
    encode: Callable[[Iterable[Chunk]], Iterator[Encoded]], cleaning: tuple[int, float, bool] | None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Encode one split into its shards; ``cleaning`` = (max_len, max_ratio, dedup) for train."""
    dedup = cleaning is not None and cleaning[2]
    seen = DuplicateFilter() if dedup else None
    dropped = {name: 0 for name in (*FILTER_NAMES.values(), "duplicate")}
    read = 0
    src_w = _ShardWriter(tmp, split.name, src_lang, dtypes["src"])
    tgt_w = _ShardWriter(tmp, split.name, tgt_lang, dtypes["tgt"])
    total = None if split.pairs is None else -(-split.pairs // CHUNK_PAIRS)
    try:
        chunks = encode(_chunks(split, dedup))
        for encoded in progress(chunks, total=total, desc=f"encode {split.name}", unit="chunks"):
            read += len(encoded[1])
            if cleaning is not None:
                encoded = _clean(encoded, cleaning, seen, dropped)
            src_w.add(*encoded[:2])
            tgt_w.add(*encoded[2:4])
    finally:
        src_w.close()
        tgt_w.close()
    stats = {
        "pairs": src_w.n, "src_tokens": src_w.offset, "tgt_tokens": tgt_w.offset,
        "src_max_len": src_w.max_len, "tgt_max_len": tgt_w.max_len,
        "src_files": [str(split.src)], "tgt_files": [str(split.tgt)],
    }
    logger.info("%s: %d pairs, %d / %d tokens", split.name, src_w.n, src_w.offset, tgt_w.offset)
    if cleaning is None:
        return stats, None
    if not dedup:
        del dropped["duplicate"]
    if any(dropped.values()):
        logger.info("train filters dropped %s", ", ".join(f"{k}: {v}" for k, v in dropped.items() if v))
    return stats, {"input_pairs": read, "dropped": dropped, "kept": src_w.n}


def _clean(
    encoded: Encoded, cleaning: tuple[int, float, bool], seen: DuplicateFilter | None, dropped: dict[str, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Drop the pairs the training filters reject, counting them by filter in ``dropped``."""
    src_ids, src_lens, tgt_ids, tgt_lens, hashes = encoded
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
    return src_ids, src_lens, tgt_ids, tgt_lens

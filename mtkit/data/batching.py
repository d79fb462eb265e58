"""Turning token-id sequences into padded batches (and, in training, token-budget batches).
Conventions shared by every family: the source is ``ids + [EOS]``; the decoder input is
``[BOS] + ids``; the decoder output (training target) is ``ids + [EOS]``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

Seqs = Sequence[Sequence[int] | np.ndarray]  # 1-D token-id sequences


def pad_batch(seqs: Seqs, pad: int) -> torch.Tensor:
    """Right-pad 1-D id sequences into a (B, max_len) int64 tensor."""
    width = max((len(s) for s in seqs), default=0)
    out = np.full((len(seqs), width), pad, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return torch.from_numpy(out)


def collate_source(
    seqs: Seqs, pad: int, eos: int, max_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source ids -> (src (B, S) ending in EOS, src_len (B,)); truncates to ``max_len`` tokens."""
    cut = None if max_len is None else max_len - 1
    rows = [np.append(np.asarray(s[:cut], dtype=np.int64), eos) for s in seqs]
    return pad_batch(rows, pad), torch.tensor([len(r) for r in rows], dtype=torch.long)


def collate_target(seqs: Seqs, pad: int, bos: int, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target ids -> (tgt_in (B, T) = BOS + ids, tgt_out (B, T) = ids + EOS)."""
    arrs = [np.asarray(s, dtype=np.int64) for s in seqs]
    tgt_in = pad_batch([np.concatenate(([bos], a)) for a in arrs], pad)
    tgt_out = pad_batch([np.concatenate((a, [eos])) for a in arrs], pad)
    return tgt_in, tgt_out


# --- token-budget batches for training -------------------------------------------------------
def pack_batches(
    order: np.ndarray, cost: np.ndarray, max_tokens: int, max_sentences: int = 0
) -> list[np.ndarray]:
    """Greedily cut ``order`` (indices, already length-sorted) into batches whose padded size
    ``len(batch) * max(cost[batch])`` stays within ``max_tokens`` (and ``max_sentences`` if > 0).
    A single example larger than the budget gets a batch of its own."""
    batches: list[np.ndarray] = []
    start, longest = 0, 0
    for i, c in enumerate(cost[order].tolist()):
        n = i - start + 1
        width = max(longest, c)
        if n > 1 and (n * width > max_tokens or (max_sentences and n > max_sentences)):
            batches.append(order[start:i])
            start, width = i, c
        longest = width
    if start < len(order):
        batches.append(order[start:])
    return batches


class BatchIterator:
    """Endless, resumable token-budget batches over a parallel corpus.

    Each epoch: examples are shuffled with a ``torch.Generator`` seeded by (seed, epoch), stably
    sorted by length (longer side, then target, then source: bucketing, little padding), packed to
    ``max_tokens``, and the batch order shuffled again. The state is just (epoch, position): the
    batches are recomputed from the seed, so a checkpoint restores the exact next batch. Of
    ``world_size`` data-parallel processes, rank ``rank`` takes every ``world_size``-th batch of
    the same list (all compute it from the seed; the tail is trimmed to give all the same count):
    one step's batches are the ones a single process takes in turn with update_freq=world_size."""

    def __init__(
        self, src_lens: np.ndarray, tgt_lens: np.ndarray, max_tokens: int, max_sentences: int = 0,
        seed: int = 1, shuffle: bool = True, max_src_len: int | None = None, max_tgt_len: int | None = None,
        rank: int = 0, world_size: int = 1,
    ):
        src_cost = np.asarray(src_lens, dtype=np.int64) + 1  # + EOS
        tgt_cost = np.asarray(tgt_lens, dtype=np.int64) + 1  # + BOS/EOS
        keep = np.ones(len(src_cost), dtype=bool)
        if max_src_len:
            keep &= src_cost <= max_src_len
        if max_tgt_len:
            keep &= tgt_cost <= max_tgt_len
        self.indices = np.nonzero(keep)[0]
        self.skipped = int(len(keep) - keep.sum())
        if len(self.indices) == 0:
            raise ValueError("no training examples within the length limits")
        self.src_cost, self.tgt_cost = src_cost, tgt_cost
        self.cost = np.maximum(src_cost, tgt_cost)
        self.max_tokens, self.max_sentences = max_tokens, max_sentences
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 1, 0
        self._cached: tuple[int, list[np.ndarray]] | None = None

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of ``epoch`` (deterministic in seed and epoch)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        idx = self.indices
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.shuffle:
            idx = idx[torch.randperm(len(idx), generator=g).numpy()]
        # stable sort by padded size, then target, then source length: ties stay shuffled
        idx = idx[np.lexsort((self.src_cost[idx], self.tgt_cost[idx], self.cost[idx]))]
        batches = pack_batches(idx, self.cost, self.max_tokens, self.max_sentences)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        if self.world_size > 1:
            usable = len(batches) - len(batches) % self.world_size
            batches = batches[self.rank : usable : self.world_size]
        self._cached = (epoch, batches)
        return batches

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return len(self.epoch_batches(self.epoch))

    def next_batch(self) -> np.ndarray | None:
        """The next batch of the current epoch, or ``None`` once it is exhausted (call
        :meth:`next_epoch` to go on)."""
        batches = self.epoch_batches(self.epoch)
        if self.position >= len(batches):
            return None
        self.position += 1
        return batches[self.position - 1]

    def next_epoch(self) -> None:
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        """(epoch, position) plus the sharding: ``position`` counts this rank's batches, so
        ``position * world_size`` batches of the epoch's shuffled list have been consumed."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a position; a state saved by another number of ranks resumes at the first
        batch not yet consumed (rounded up to a whole step of every rank: none is repeated)."""
        saved_world = int(state.get("world_size", 1))
        self.epoch = int(state["epoch"])
        self.position = -(-int(state["position"]) * saved_world // self.world_size)  # ceil


def length_sorted_batches(lengths: Sequence[int] | np.ndarray, batch_size: int = 0, max_tokens: int = 0) -> list[np.ndarray]:
    """Source batches for decoding, as indices into ``lengths`` (source tokens without EOS): stably
    sorted by length, cut into batches of ``batch_size`` sentences, or (``batch_size`` 0) of at most
    ``max_tokens`` padded source tokens, each sentence counting its length + EOS (a longer single
    sentence gets its own batch)."""
    cost = np.asarray(lengths, dtype=np.int64) + 1  # + EOS
    order = np.argsort(cost, kind="stable")
    if batch_size:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return pack_batches(order, cost, max_tokens)


def fixed_batches(src_lens: np.ndarray, tgt_lens: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Length-sorted token-budget batches in a fixed order (validation)."""
    return length_sorted_batches(np.maximum(src_lens, tgt_lens), max_tokens=max_tokens)

"""Turning token-id sequences into padded batches (and, in training, token-budget batches).

Conventions shared by every family: the source is ``ids + [EOS]``; the decoder input is
``[BOS] + ids``; the decoder output (training target) is ``ids + [EOS]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def pad_batch(seqs: Sequence[Sequence[int] | np.ndarray], pad: int) -> torch.Tensor:
    """Right-pad 1-D id sequences into a (B, max_len) int64 tensor."""
    width = max((len(s) for s in seqs), default=0)
    out = np.full((len(seqs), width), pad, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return torch.from_numpy(out)


def collate_source(
    seqs: Sequence[Sequence[int] | np.ndarray], pad: int, eos: int, max_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source ids -> (src (B, S) ending in EOS, src_len (B,)); truncates to ``max_len`` tokens."""
    cut = None if max_len is None else max_len - 1
    rows = [np.append(np.asarray(s[:cut], dtype=np.int64), eos) for s in seqs]
    return pad_batch(rows, pad), torch.tensor([len(r) for r in rows], dtype=torch.long)


def collate_target(
    seqs: Sequence[Sequence[int] | np.ndarray], pad: int, bos: int, eos: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target ids -> (tgt_in (B, T) = BOS + ids, tgt_out (B, T) = ids + EOS)."""
    arrs = [np.asarray(s, dtype=np.int64) for s in seqs]
    tgt_in = pad_batch([np.concatenate(([bos], a)) for a in arrs], pad)
    tgt_out = pad_batch([np.concatenate((a, [eos])) for a in arrs], pad)
    return tgt_in, tgt_out

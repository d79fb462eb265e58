"""The Seq2Seq contract every model family implements.

Tensors are batch-first: ``src`` (B, S) token ids padded with ``pad_id`` and ending in EOS, ``src_len`` (B,)
the non-pad token counts, ``tgt_in`` (B, T) BOS followed by the target. ``enc`` and ``state`` are flat dicts
of batch-first tensors, so :func:`expand_state` and :func:`reorder_state` work for every family.

- ``features -> hidden (B, T, H)``: teacher-forced decoder outputs before ``output_projection()`` (a Linear
  H -> V), which ``forward`` applies unless ``features_only`` (the trainer fuses it into the loss).
- ``encode -> enc``: per-sentence constants (encoder memory, its mask, precomputed cross-attention
  keys/values). Beam search expands it to k rows per sentence after the first step and only ever drops
  the rows of finished sentences, never follows beam backpointers. With ``beam_shares_enc = True`` it
  stays at one row per sentence: ``step`` gets ``prev_tokens`` and ``state`` with k consecutive rows per
  sentence (k = rows / enc rows) sharing its encoder rows, instead of the caller repeating them k times.
- ``init_state -> state``: what changes per step.
- ``step -> (log_probs (B, V), state, attn (B, S) or None)``; with ``need_attn=False`` a model may skip the
  attention (None). The caller owns the returned log-probs: search modifies them in place.
  Log-probabilities everywhere: higher is better.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from mtkit.config_fields import ModelConfig

State = dict[str, torch.Tensor]


class Seq2Seq(nn.Module):
    """Base class of all translators. Subclasses set ``Config`` and implement the five methods."""

    Config: ClassVar[type[ModelConfig]] = ModelConfig
    beam_shares_enc: ClassVar[bool] = False

    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, pad_id: int):
        super().__init__()
        self.cfg = cfg
        self.src_vocab_size = src_vocab_size
        self.tgt_vocab_size = tgt_vocab_size
        self.pad_id = pad_id

    def attention_label(self) -> str:
        """What the attention weights ``step`` returns are, in words (titles of attention plots)."""
        return "attention weights"

    def forward(
        self, src: torch.Tensor, src_len: torch.Tensor, tgt_in: torch.Tensor, features_only: bool = False
    ) -> torch.Tensor:
        """Teacher forcing: logits (B, T, V), or the features (B, T, H) with ``features_only``."""
        hidden = self.features(src, src_len, tgt_in)
        return hidden if features_only else self.output_projection()(hidden)

    def features(self, src: torch.Tensor, src_len: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def output_projection(self) -> nn.Linear:
        raise NotImplementedError

    def encode(self, src: torch.Tensor, src_len: torch.Tensor) -> State:
        raise NotImplementedError

    def init_state(self, enc: State) -> State:
        raise NotImplementedError

    def step(
        self, prev_tokens: torch.Tensor, enc: State, state: State, need_attn: bool = True
    ) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        raise NotImplementedError

    def max_positions(self) -> int | None:
        """Longest source/target the model accepts (``None``: unbounded)."""
        return None


def expand_state(state: State, k: int) -> State:
    """Repeat every entry k times along the batch axis: (B, ...) -> (B*k, ...)."""
    return {name: t.repeat_interleave(k, dim=0) for name, t in state.items()}


def reorder_state(state: State, order: torch.Tensor) -> State:
    """Select batch rows: ``order`` (N,) of row indices (beam backpointers)."""
    return {name: t.index_select(0, order) for name, t in state.items()}


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

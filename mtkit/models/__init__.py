"""The model registry: a plain dict from ``model.arch`` to the family's class."""

from __future__ import annotations

from mtkit.models.base import Seq2Seq

MODELS: dict[str, type[Seq2Seq]] = {}


def build_model(cfg, src_vocab_size: int, tgt_vocab_size: int, pad_id: int) -> Seq2Seq:
    """Instantiate the family named by ``cfg.arch`` (a validated family config)."""
    return MODELS[cfg.arch](cfg, src_vocab_size, tgt_vocab_size, pad_id)

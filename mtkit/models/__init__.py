"""The model registry: a plain dict from ``model.arch`` to the family's class."""

from __future__ import annotations

from mtkit.models.base import Seq2Seq
from mtkit.models.gnmt import GNMT
from mtkit.models.lstm import LSTMSeq2Seq
from mtkit.models.rnn_attention import RNNAttention
from mtkit.models.transformer import Transformer

MODELS: dict[str, type[Seq2Seq]] = {
    "transformer": Transformer,
    "lstm": LSTMSeq2Seq,
    "rnn_attention": RNNAttention,
    "gnmt": GNMT,
}


def build_model(cfg, src_vocab_size: int, tgt_vocab_size: int, pad_id: int) -> Seq2Seq:
    """Instantiate the family named by ``cfg.arch`` (a validated family config)."""
    return MODELS[cfg.arch](cfg, src_vocab_size, tgt_vocab_size, pad_id)

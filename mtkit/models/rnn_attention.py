"""Attention-based recurrent translators: Bahdanau et al. 2015 and Luong et al. 2015.

One ``rnn_attention`` arch; ``model.attention`` picks the decoder:

- ``bahdanau`` -> :class:`BahdanauDecoder` (RNNsearch): the additive score is computed from
  the *previous* decoder state; the context is fed to the decoder cell and, with the new state
  and the previous word, to a maxout readout layer.
- ``dot`` | ``general`` | ``concat`` -> :class:`LuongDecoder`: the stacked RNN runs first, its top
  output attends (globally or with a ``local-m`` / ``local-p`` window), ``h~ = tanh(W_c [c; h])``
  predicts the word and, with input feeding, is fed to the next step's bottom layer.

The encoder is a stacked RNN (bidirectional for RNNsearch) over packed sequences; its final
states pass through a small bridge to initialise the decoder. Cells are LSTM or GRU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtkit.config import ModelConfig
from mtkit.errors import MtkitError
from mtkit.models.attention import SCORES, Attention, AttentionalRNN, build_attention
from mtkit.models.base import State
from mtkit.models.dropout import Dropout
from mtkit.models.linear import Linear
from mtkit.models.lstm import (
    RNN_CLASSES,
    RNNEncoder,
    check_choice,
    check_positive,
    from_state,
    init_uniform,
    padding_mask,
    to_state,
)


@dataclass
class Config(ModelConfig):
    arch: str = "rnn_attention"
    cell: str = "lstm"  # lstm | gru
    embed_dim: int = 256
    hidden_dim: int = 256  # decoder size, and the encoder's size per direction
    encoder_layers: int = 1
    decoder_layers: int = 1
    bidirectional: bool = True  # encoder reads both ways (RNNsearch); Luong used False
    attention: str = "bahdanau"  # bahdanau | dot | general | concat (the last three: Luong decoder)
    window: str = "global"  # global | local-m | local-p (Luong decoder only)
    window_size: int = 10  # D: local attention covers [p_t - D, p_t + D]
    input_feed: bool = True  # Luong decoder: feed h~_{t-1} to the bottom layer
    attn_dim: int = 0  # hidden units of the bahdanau/concat score; 0 = hidden_dim
    readout_dim: int = 0  # Bahdanau maxout readout size; 0 = embed_dim
    dropout: float = 0.2
    init_scale: float = 0.0  # uniform(-s, s) init of every weight (papers: 0.1); 0 = torch defaults


class Bridge(nn.Module):
    """Encoder final states -> initial decoder states: ``h = tanh(W_h s)``, ``c = W_c s``.

    With as many encoder as decoder layers, layer i seeds layer i; otherwise the top encoder
    layer seeds every decoder layer.
    """

    def __init__(self, enc_dim: int, hidden: int, dec_layers: int, has_cell: bool):
        super().__init__()
        self.dec_layers = dec_layers
        self.h = Linear(enc_dim, hidden)
        self.c = Linear(enc_dim, hidden) if has_cell else None

    def forward(self, final: State) -> State:
        out = {}
        for name, t in final.items():  # (B, enc_layers, enc_dim)
            if t.size(1) != self.dec_layers:
                t = t[:, -1:].expand(-1, self.dec_layers, -1)
            out[f"init_{name}"] = torch.tanh(self.h(t)) if name == "h" else self.c(t)  # (B, L, H)
        return out


class BahdanauDecoder(nn.Module):
    """RNNsearch decoder: attend with s_{i-1}, then s_i = RNN([E y_{i-1}; c_i], s_{i-1})."""

    def __init__(self, cfg: Config, memory_dim: int):
        super().__init__()
        if cfg.window != "global":
            raise MtkitError("model.window must be 'global' with model.attention=bahdanau (local windows are Luong's)")
        hidden, attn_dim = cfg.hidden_dim, cfg.attn_dim or cfg.hidden_dim
        self.readout_dim = cfg.readout_dim or cfg.embed_dim
        self.attention: Attention = build_attention("bahdanau", hidden, memory_dim, attn_dim)
        self.rnn = RNN_CLASSES[cfg.cell](cfg.embed_dim + memory_dim, hidden, cfg.decoder_layers, batch_first=True,
                                         dropout=cfg.dropout if cfg.decoder_layers > 1 else 0.0)
        self.readout = Linear(hidden + memory_dim + cfg.embed_dim, 2 * self.readout_dim)  # maxout, pool 2
        self.dropout = Dropout(cfg.dropout)
        self.out_dim = self.readout_dim

    def init_state(self, enc: State) -> State:
        state = {k[len("init_"):]: v for k, v in enc.items() if k.startswith("init_")}
        state["t"] = torch.zeros_like(enc["src_len"])
        return state

    def forward(self, emb: torch.Tensor, enc: State, state: State) -> tuple[torch.Tensor, State, torch.Tensor]:
        prev_top = state["h"][:, -1]  # s_{i-1}: (B, H)
        ctx, weights = self.attention(prev_top, enc["memory"], enc["keys"], enc["mask"], enc["src_len"], state["t"])
        x = torch.cat([emb, ctx], dim=-1).unsqueeze(1)  # (B, 1, E + Hm)
        out, hidden = self.rnn(x, from_state(state))
        s = out.squeeze(1)  # (B, H)
        r = self.readout(torch.cat([s, ctx, emb], dim=-1))  # (B, 2R)
        r = r.view(r.size(0), self.readout_dim, 2).amax(-1)  # maxout -> (B, R)
        new_state = to_state(hidden)
        new_state["t"] = state["t"] + 1
        return self.dropout(r), new_state, weights


class LuongDecoder(nn.Module):
    """Luong decoder: h_t = RNN([E y_{t-1}; h~_{t-1}]), c_t = attn(h_t), h~_t = tanh(W_c [c_t; h_t])."""

    def __init__(self, cfg: Config, memory_dim: int):
        super().__init__()
        hidden = cfg.hidden_dim
        self.input_feed = cfg.input_feed
        self.hidden = hidden
        self.attention: Attention = build_attention(
            cfg.attention, hidden, memory_dim, cfg.attn_dim or hidden, cfg.window, cfg.window_size
        )
        feed = hidden if cfg.input_feed else 0
        self.rnn = RNN_CLASSES[cfg.cell](cfg.embed_dim + feed, hidden, cfg.decoder_layers, batch_first=True,
                                         dropout=cfg.dropout if cfg.decoder_layers > 1 else 0.0)
        self.combine = Linear(memory_dim + hidden, hidden, bias=False)  # W_c
        self.dropout = Dropout(cfg.dropout)
        self.out_dim = hidden

    def init_state(self, enc: State) -> State:
        state = {k[len("init_"):]: v for k, v in enc.items() if k.startswith("init_")}
        state["t"] = torch.zeros_like(enc["src_len"])
        if self.input_feed:
            state["feed"] = enc["memory"].new_zeros(enc["memory"].size(0), self.hidden)
        return state

    def forward(self, emb: torch.Tensor, enc: State, state: State) -> tuple[torch.Tensor, State, torch.Tensor]:
        x = torch.cat([emb, state["feed"]], dim=-1) if self.input_feed else emb
        out, hidden = self.rnn(x.unsqueeze(1), from_state(state))
        h = out.squeeze(1)  # (B, H)
        ctx, weights = self.attention(h, enc["memory"], enc["keys"], enc["mask"], enc["src_len"], state["t"])
        h_tilde = self.dropout(torch.tanh(self.combine(torch.cat([ctx, h], dim=-1))))  # (B, H)
        new_state = to_state(hidden)
        new_state["t"] = state["t"] + 1
        if self.input_feed:
            new_state["feed"] = h_tilde
        return h_tilde, new_state, weights


class RNNAttention(AttentionalRNN):
    """Encoder + bridge + attentional decoder; ``step`` returns the attention weights (B, S)."""

    Config = Config

    def __init__(self, cfg: Config, src_vocab_size: int, tgt_vocab_size: int, pad_id: int):
        super().__init__(cfg, src_vocab_size, tgt_vocab_size, pad_id)
        check_choice(cfg.cell, RNN_CLASSES, "model.cell")
        check_choice(cfg.attention, SCORES, "model.attention")
        check_positive(cfg, "embed_dim", "hidden_dim", "encoder_layers", "decoder_layers")
        self.encoder = RNNEncoder(cfg.cell, src_vocab_size, cfg.embed_dim, cfg.hidden_dim, cfg.encoder_layers,
                                  cfg.dropout, pad_id, bidirectional=cfg.bidirectional)
        memory_dim = self.encoder.out_dim
        self.bridge = Bridge(memory_dim, cfg.hidden_dim, cfg.decoder_layers, has_cell=cfg.cell == "lstm")
        decoder_class = BahdanauDecoder if cfg.attention == "bahdanau" else LuongDecoder
        self.decoder = decoder_class(cfg, memory_dim)
        self.tgt_embed = nn.Embedding(tgt_vocab_size, cfg.embed_dim, padding_idx=pad_id)
        self.dropout = Dropout(cfg.dropout)
        self.out = Linear(self.decoder.out_dim, tgt_vocab_size)
        init_uniform(self, cfg.init_scale)

    def encode(self, src: torch.Tensor, src_len: torch.Tensor) -> State:
        memory, final = self.encoder(src, src_len)  # (B, S, Hm)
        enc = {
            "memory": memory,
            "keys": self.decoder.attention.precompute(memory),  # (B, S, K)
            "mask": padding_mask(src_len.to(src.device), src.size(1)),  # (B, S)
            "src_len": src_len.to(src.device),
        }
        enc.update(self.bridge(final))  # init_h / init_c: (B, L, H)
        return enc

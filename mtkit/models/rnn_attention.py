"""Attention-based recurrent translators (Bahdanau et al. 2015; Luong et al. 2015): one ``rnn_attention``
arch; ``model.attention`` ``bahdanau`` picks :class:`BahdanauDecoder` (RNNsearch: the additive score comes
from the *previous* decoder state; a maxout readout layer), ``dot`` | ``general`` | ``concat`` a
:class:`LuongDecoder` (the stacked RNN runs first, its top output attends, globally or with a ``local-m`` /
``local-p`` window, and ``h~`` predicts the word and, with input feeding, feeds the next step's bottom layer).

The encoder is a stacked LSTM or GRU (bidirectional for RNNsearch) over packed sequences; a small bridge
turns its final states into the decoder's initial ones. With ``tie_embeddings`` the output layer shares the
target embedding (and the source one with a joint vocabulary). Teacher forcing loops over target positions
only for what depends on the recurrence: Luong without input feeding is one RNN call, one batched score and
one combine layer; RNNsearch's maxout readout runs over all positions after its loop, and the embedding's
share of the bottom layer's gates is one matrix product over all positions before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtkit.config_fields import any_value, choice, number
from mtkit.errors import MtkitError
from mtkit.kernels.dropout import Dropout
from mtkit.kernels.linear import Linear
from mtkit.models.attention import Attention, AttentionLoop, build_attention
from mtkit.models.base import Seq2Seq, State
from mtkit.models.lstm import (
    Embedding,
    RecurrentConfig,
    RNNEncoder,
    decoding_input_gates,
    embedding_gates,
    from_state,
    init_weights,
    initial_state,
    layers_state,
    output_of,
    padding_mask,
    rnn_step,
    stacked_rnn,
    state_layers,
    step_input_gates,
    tie_embeddings,
)


@dataclass
class Config(RecurrentConfig):
    arch: str = any_value("rnn_attention")
    cell: str = choice("lstm", "lstm", "gru")
    embed_dim: int = number(256, low=1)
    # decoder size, and the encoder's size per direction unless encoder_hidden_dim is set
    hidden_dim: int = number(256, low=1)
    # encoder size per direction; 0 = hidden_dim (hidden_dim/2 matches a split brnn)
    encoder_hidden_dim: int = number(0, low=0)
    encoder_layers: int = number(1, low=1)
    decoder_layers: int = number(1, low=1)
    bidirectional: bool = True  # encoder reads both ways (RNNsearch); Luong used False
    # bahdanau, or a Luong decoder with the dot, general or concat score
    attention: str = choice("bahdanau", "bahdanau", "dot", "general", "concat")
    window: str = choice("global", "global", "local-m", "local-p")  # Luong decoder only
    window_size: int = number(10, low=0)  # D: local attention covers [p_t - D, p_t + D]
    input_feed: bool = True  # Luong decoder: feed h~_{t-1} to the bottom layer
    attn_dim: int = number(0, low=0)  # hidden units of the bahdanau/concat score; 0 = hidden_dim
    readout_dim: int = number(0, low=0)  # Bahdanau maxout readout size; 0 = embed_dim
    dropout: float = number(0.2, low=0, high=1)
    init_scale: float = number(0.0, low=0)  # uniform(-s, s) init of every weight (papers: 0.1); 0 = torch defaults
    forget_bias: float = number(1.0)  # initial LSTM forget-gate bias
    tie_embeddings: bool = False  # output layer = target embedding (= source too, joint vocabulary)

    def check(self, section: str) -> None:
        if self.attention == "bahdanau" and self.window != "global":
            raise MtkitError(
                f"config key '{section}.window': '{self.window}' needs a Luong score "
                f"({section}.attention dot, general or concat), not bahdanau"
            )
        if self.attention == "bahdanau":  # the output layer reads the readout (Bahdanau) or h~ (Luong)
            self.check_tied_sizes(section, "readout_dim", self.readout_dim or self.embed_dim, "embed_dim")
        else:
            self.check_tied_sizes(section, "hidden_dim", self.hidden_dim, "embed_dim")


class Bridge(nn.Module):
    """Encoder final states -> initial decoder states: ``h = tanh(W_h s)``, ``c = W_c s``. With as many
    encoder as decoder layers, layer i seeds layer i; otherwise the top encoder layer seeds every one."""

    def __init__(self, enc_dim: int, cfg: RecurrentConfig):
        super().__init__()
        self.dec_layers = cfg.decoder_layers
        self.h = Linear(enc_dim, cfg.hidden_dim)
        self.c = Linear(enc_dim, cfg.hidden_dim) if cfg.cell == "lstm" else None

    def forward(self, final: State) -> State:
        out = {}
        for name, t in final.items():  # (B, enc_layers, enc_dim)
            if t.size(1) != self.dec_layers:
                t = t[:, -1:].expand(-1, self.dec_layers, -1)
            out[f"init_{name}"] = torch.tanh(self.h(t)) if name == "h" else self.c(t)  # (B, L, H)
        return out


class AttentionalRNN(Seq2Seq):
    """Shared set-up, encoding, teacher forcing and stepping of the attentional RNN families. Subclasses
    build ``self.encoder`` (src, src_len -> memory (B, S, Hm), final states), an optional ``self.bridge``
    and ``self.decoder``, then call :meth:`add_output_layers`. The decoder's ``forward`` maps (embedded
    token (B, E), enc, state) to (output (B, H), state, attention (B, S)) (one step, for search), its
    ``sequence`` (embedded target (B, T, E), enc, state) to outputs (B, T, H) (teacher forcing, whatever
    does not depend on the recurrence over whole sequences); the contract test holds the two equal."""

    def add_output_layers(self, tgt_vocab_size: int, pad_id: int) -> None:
        """The target embedding, dropout and output layer, then the initialisation of every weight
        (in parameter order) and the optional tying."""
        cfg = self.cfg
        self.tgt_embed = Embedding(tgt_vocab_size, cfg.embed_dim, padding_idx=pad_id)
        self.dropout = Dropout(cfg.dropout)
        self.out = Linear(self.decoder.out_dim, tgt_vocab_size)
        init_weights(self, cfg.init_scale, cfg.forget_bias)
        if cfg.tie_embeddings:
            self.tgt_embed = tie_embeddings(self.encoder.embed, self.tgt_embed, self.out)

    def encode(self, src: torch.Tensor, src_len: torch.Tensor) -> State:
        src_len = src_len.to(src.device)
        memory, final = self.encoder(src, src_len)
        enc = {
            "memory": memory,  # (B, S, Hm)
            "keys": self.decoder.attention.precompute(memory),  # (B, S, K)
            "mask": padding_mask(src_len, src.size(1)),  # (B, S)
            "src_len": src_len,
        }
        if hasattr(self, "bridge"):
            enc.update(self.bridge(final))  # init_h / init_c: (B, L, H)
        return enc

    def init_state(self, enc: State) -> State:
        return self.decoder.init_state(enc)

    def output_projection(self) -> nn.Linear:
        return self.out

    def features(self, src: torch.Tensor, src_len: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        enc = self.encode(src, src_len)
        emb = self.dropout(self.tgt_embed(tgt_in))  # (B, T, E)
        return self.decoder.sequence(emb, enc, self.init_state(enc))  # (B, T, H)

    def step(
        self, prev_tokens: torch.Tensor, enc: State, state: State, need_attn: bool = True
    ) -> tuple[torch.Tensor, State, torch.Tensor]:
        emb = self.dropout(self.tgt_embed(prev_tokens))  # (B, E)
        table_gates = decoding_input_gates(prev_tokens, self.tgt_embed, *self.decoder.bottom_input())
        o, state, weights = self.decoder(emb, enc, state, table_gates)
        return torch.log_softmax(self.out(o).float(), dim=-1), state, weights


class BahdanauDecoder(nn.Module):
    """RNNsearch decoder: attend with s_{i-1}, then s_i = RNN([E y_{i-1}; c_i], s_{i-1})."""

    def __init__(self, cfg: Config, memory_dim: int):
        super().__init__()
        hidden, attn_dim = cfg.hidden_dim, cfg.attn_dim or cfg.hidden_dim
        self.readout_dim = cfg.readout_dim or cfg.embed_dim
        self.attention: Attention = build_attention("bahdanau", hidden, memory_dim, attn_dim)
        self.rnn = stacked_rnn(cfg.cell, cfg.embed_dim + memory_dim, hidden, cfg.decoder_layers, cfg.dropout)
        self.readout = Linear(hidden + memory_dim + cfg.embed_dim, 2 * self.readout_dim)  # maxout, pool 2
        self.dropout = Dropout(cfg.dropout)
        self.out_dim = self.readout_dim

    def init_state(self, enc: State) -> State:
        return {**initial_state(enc), "t": torch.zeros_like(enc["src_len"])}

    def attend(self, hidden: list, enc: State, loop: AttentionLoop | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The context c_i (B, Hm) and weights from s_{i-1}, the top layer of ``hidden``."""
        return self.attention(output_of(hidden[-1]), enc["memory"], enc["keys"], enc["mask"], enc["src_len"],
                              loop=loop)

    def maxout(self, s: torch.Tensor, ctx: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Maxout over [s_i; c_i; E y_{i-1}], for one step (B, ...) or all positions (B, T, ...)."""
        r = self.readout(torch.cat([s, ctx, emb], dim=-1))  # (..., 2R)
        return self.dropout(r.view(*r.shape[:-1], self.readout_dim, 2).amax(-1))  # (..., R)

    def bottom_input(self) -> tuple[nn.Module, str, str]:
        """The bottom layer's module and input weight and bias names (see :func:`decoding_input_gates`)."""
        return self.rnn, "weight_ih_l0", "bias_ih_l0"

    def forward(
        self, emb: torch.Tensor, enc: State, state: State, table_gates: tuple | None = None
    ) -> tuple[torch.Tensor, State, torch.Tensor]:
        hidden = state_layers(state)
        ctx, weights = self.attend(hidden, enc)
        if table_gates is None:
            s, hidden = rnn_step(self.rnn, torch.cat([emb, ctx], dim=-1), hidden)  # (B, H)
        else:
            s, hidden = rnn_step(self.rnn, None, hidden, step_input_gates(table_gates, ctx))
        return self.maxout(s, ctx, emb), {**layers_state(hidden), "t": state["t"] + 1}, weights

    def sequence(self, emb: torch.Tensor, enc: State, state: State) -> torch.Tensor:
        hidden = state_layers(state)  # per-layer (B, H) states for the whole loop
        gx_emb, w_ctx = embedding_gates(emb, self.rnn.weight_ih_l0, self.rnn.bias_ih_l0)
        states, contexts, loop = [], [], AttentionLoop()
        enc = loop.wrap(enc)
        for gx in gx_emb.unbind(1):
            ctx, _ = self.attend(hidden, enc, loop)
            s, hidden = rnn_step(self.rnn, None, hidden, gx + F.linear(ctx, w_ctx))
            states.append(s)
            contexts.append(ctx)
        return self.maxout(torch.stack(states, dim=1), torch.stack(contexts, dim=1), emb)  # (B, T, R)


class LuongDecoder(nn.Module):
    """Luong decoder: h_t = RNN([E y_{t-1}; h~_{t-1}]), c_t = attn(h_t), h~_t = tanh(W_c [c_t; h_t])."""

    def __init__(self, cfg: Config, memory_dim: int):
        super().__init__()
        hidden, self.input_feed = cfg.hidden_dim, cfg.input_feed
        self.attention: Attention = build_attention(
            cfg.attention, hidden, memory_dim, cfg.attn_dim or hidden, cfg.window, cfg.window_size
        )
        feed = hidden if cfg.input_feed else 0
        self.rnn = stacked_rnn(cfg.cell, cfg.embed_dim + feed, hidden, cfg.decoder_layers, cfg.dropout)
        self.combine = Linear(memory_dim + hidden, hidden, bias=False)  # W_c
        self.dropout = Dropout(cfg.dropout)
        self.out_dim = hidden

    def init_state(self, enc: State) -> State:
        state = {**initial_state(enc), "t": torch.zeros_like(enc["src_len"])}
        if self.input_feed:
            state["feed"] = enc["memory"].new_zeros(enc["memory"].size(0), self.out_dim)
        return state

    def attend(
        self, h: torch.Tensor, enc: State, t: torch.Tensor, loop: AttentionLoop | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h~ = tanh(W_c [c; h]) for one step (B, H) or all positions (B, T, H); (h~, weights)."""
        ctx, weights = self.attention(h, enc["memory"], enc["keys"], enc["mask"], enc["src_len"], t, loop)
        return self.dropout(torch.tanh(self.combine(torch.cat([ctx, h], dim=-1)))), weights

    bottom_input = BahdanauDecoder.bottom_input

    def forward(
        self, emb: torch.Tensor, enc: State, state: State, table_gates: tuple | None = None
    ) -> tuple[torch.Tensor, State, torch.Tensor]:
        if table_gates is not None:
            gx = step_input_gates(table_gates, state["feed"] if self.input_feed else None)
            out, hidden = rnn_step(self.rnn, None, state_layers(state), gx)
        else:
            x = torch.cat([emb, state["feed"]], dim=-1) if self.input_feed else emb
            out, hidden = rnn_step(self.rnn, x, state_layers(state))
        h_tilde, weights = self.attend(out, enc, state["t"])  # (B, H)
        new_state = {**layers_state(hidden), "t": state["t"] + 1}
        if self.input_feed:
            new_state["feed"] = h_tilde
        return h_tilde, new_state, weights

    def sequence(self, emb: torch.Tensor, enc: State, state: State) -> torch.Tensor:
        steps = torch.arange(emb.size(1), device=emb.device)
        if not self.input_feed:  # one RNN call, one batched score, one combine layer
            out, _ = self.rnn(emb, from_state(state))  # (B, T, H)
            return self.attend(out, enc, state["t"].unsqueeze(1) + steps)[0]  # (B, T, H)
        hidden, feed, outs, loop = state_layers(state), state["feed"], [], AttentionLoop()
        gx_emb, w_feed = embedding_gates(emb, self.rnn.weight_ih_l0, self.rnn.bias_ih_l0)
        enc = loop.wrap(enc)
        for i, gx in enumerate(gx_emb.unbind(1)):  # h~_{t-1} feeds step t: sequential by nature
            out, hidden = rnn_step(self.rnn, None, hidden, gx + F.linear(feed, w_feed))
            feed, _ = self.attend(out, enc, state["t"] + i, loop)
            outs.append(feed)
        return torch.stack(outs, dim=1)  # (B, T, H)


class RNNAttention(AttentionalRNN):
    """Encoder + bridge + attentional decoder; ``step`` returns the attention weights (B, S)."""

    Config = Config

    def __init__(self, cfg: Config, src_vocab_size: int, tgt_vocab_size: int, pad_id: int):
        super().__init__(cfg, src_vocab_size, tgt_vocab_size, pad_id)
        self.encoder = RNNEncoder(cfg.cell, src_vocab_size, cfg.embed_dim, cfg.encoder_hidden_dim or cfg.hidden_dim,
                                  cfg.encoder_layers, cfg.dropout, pad_id, bidirectional=cfg.bidirectional)
        memory_dim = self.encoder.out_dim
        self.bridge = Bridge(memory_dim, cfg)
        self.decoder = (BahdanauDecoder if cfg.attention == "bahdanau" else LuongDecoder)(cfg, memory_dim)
        self.add_output_layers(tgt_vocab_size, pad_id)

    def attention_label(self) -> str:
        if self.cfg.attention == "bahdanau":
            return "Bahdanau additive attention"
        return f"Luong {self.cfg.attention} attention, {self.cfg.window} window"

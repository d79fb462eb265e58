"""Google's Neural Machine Translation system (Wu et al., 2016).

Encoder: a bidirectional bottom layer (directions concatenated), then unidirectional layers, all over
length-sorted rows (:class:`~mtkit.models.lstm.SortedBatch`, as over a packed sequence), so padding never
enters; from layer ``residual_start`` (the third, 1-based) up every layer computes ``x + f(dropout(x))``,
so the identity path is never dropped. Decoder: stacked LSTM (or GRU) cells; the bottom layer reads the
previous word and the previous context, its output queries an additive attention over the encoder output,
and the new context ``a_i`` joins the input of every layer above; residuals as in the encoder; the top
layer's output predicts the word. (The paper queries with the bottom layer's output of the previous step;
querying with the current one, as the reference GNMT implementation's "new attention" does, learns faster
and gives the same structure: the bottom layer attends, every layer receives the context.) States start at
zero, or with ``bridge`` from the top encoder layer's final state through a
:class:`Bridge` (every decoder layer), as the reference implementation passes the encoder state on. With
``tie_embeddings`` the output layer shares the target embedding (and the source one with a joint
vocabulary). Beam search applies GNMT's length normalisation and coverage penalty (``decode.alpha``,
``decode.beta``) using the attention weights ``step`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtkit.config_fields import any_value, choice, number
from mtkit.kernels.dropout import Dropout
from mtkit.models.attention import Attention, AttentionLoop, build_attention
from mtkit.models.base import State
from mtkit.models.lstm import (
    CELL_CLASSES,
    RNN_CLASSES,
    Embedding,
    Hidden,
    RecurrentConfig,
    SortedBatch,
    cell_step,
    embedding_gates,
    gates_of,
    initial_state,
    layers_state,
    output_of,
    run_cell,
    state_layers,
    step_input_gates,
    to_state,
)
from mtkit.models.rnn_attention import AttentionalRNN, Bridge


@dataclass
class Config(RecurrentConfig):
    arch: str = any_value("gnmt")
    cell: str = choice("lstm", "lstm", "gru")
    embed_dim: int = number(512, low=1)
    hidden_dim: int = number(512, low=1)  # every layer (the bidirectional bottom layer: per direction)
    encoder_layers: int = number(4, low=1)  # the first one bidirectional
    decoder_layers: int = number(4, low=1)
    # 1-based layer from which residual connections start (layer 2 changes the encoder's width)
    residual_start: int = number(3, low=3)
    attn_dim: int = number(0, low=0)  # hidden units of the additive attention; 0 = hidden_dim
    dropout: float = number(0.2, low=0, high=1)  # embeddings, each layer's input, output layer
    init_scale: float = number(0.0, low=0)  # uniform(-s, s) init of every weight (papers: 0.1); 0 = torch defaults
    forget_bias: float = number(1.0)  # initial LSTM forget-gate bias
    tie_embeddings: bool = False  # output layer = target embedding (= source too, joint vocabulary)
    bridge: bool = False  # decoder states start from the top encoder layer's final state (else zero)

    def check(self, section: str) -> None:
        self.check_tied_sizes(section, "hidden_dim", self.hidden_dim, "embed_dim")


class GNMTEncoder(nn.Module):
    def __init__(self, cfg: Config, vocab: int, pad_id: int):
        super().__init__()
        rnn, h = RNN_CLASSES[cfg.cell], cfg.hidden_dim
        self.embed = Embedding(vocab, cfg.embed_dim, padding_idx=pad_id)
        self.dropout = Dropout(cfg.dropout)
        layers = [rnn(cfg.embed_dim, h, batch_first=True, bidirectional=True)]  # -> 2H
        layers += [rnn(2 * h if i == 1 else h, h, batch_first=True) for i in range(1, cfg.encoder_layers)]
        self.layers = nn.ModuleList(layers)
        self.residual = [i + 1 >= cfg.residual_start for i in range(cfg.encoder_layers)]
        self.out_dim = h if cfg.encoder_layers > 1 else 2 * h

    def forward(self, src: torch.Tensor, src_len: torch.Tensor) -> tuple[torch.Tensor, State]:
        """-> memory (B, S, Hm), zero on padding, and the top layer's final state
        {"h": (B, 1, H)[, "c": ...]} (both directions concatenated with a single layer)."""
        rows = SortedBatch(src_len, src.size(1), src.device)
        x = rows.enter(self.embed(src))  # (T, B, E), rows sorted by length
        for layer, residual in zip(self.layers, self.residual):
            out, final = rows.run(layer, self.dropout(x))
            x = out + x if residual else out
        return rows.leave(x), to_state(rows.final(final), 1)  # the top layer's final state


class GNMTDecoder(nn.Module):
    def __init__(self, cfg: Config, memory_dim: int):
        super().__init__()
        cell, h = CELL_CLASSES[cfg.cell], cfg.hidden_dim
        self.out_dim = h
        self.has_cell_state = cfg.cell == "lstm"
        self.attention: Attention = build_attention("bahdanau", h, memory_dim, cfg.attn_dim or h)
        self.cells = nn.ModuleList(
            [cell((cfg.embed_dim if i == 0 else h) + memory_dim, h) for i in range(cfg.decoder_layers)]
        )
        self.residual = [i + 1 >= cfg.residual_start for i in range(cfg.decoder_layers)]
        self.dropout = Dropout(cfg.dropout)

    def init_state(self, enc: State) -> State:
        memory = enc["memory"]
        if "init_h" in enc:  # from the bridge: (B, L, H)
            state = initial_state(enc)
        else:
            zeros = memory.new_zeros(memory.size(0), len(self.cells), self.out_dim)  # (B, L, H)
            state = {"h": zeros, "c": zeros.clone()} if self.has_cell_state else {"h": zeros}
        state["ctx"] = memory.new_zeros(memory.size(0), memory.size(2))  # previous context (B, Hm)
        return state

    def _cell(self, i: int, inp: torch.Tensor, state: Hidden) -> Hidden:
        return cell_step(gates_of(inp, self.cells[i]), state, self.cells[i])

    def bottom_input(self) -> tuple[nn.Module, str, str]:
        """The bottom cell and its input weight and bias names (see :func:`decoding_input_gates`)."""
        return self.cells[0], "weight_ih", "bias_ih"

    def forward(
        self, emb: torch.Tensor, enc: State, state: State, table_gates: tuple | None = None
    ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """One step: emb (B, E) -> output (B, H)."""
        layers = state_layers(state)
        if table_gates is None:
            new = [self._cell(0, torch.cat([emb, state["ctx"]], dim=-1), layers[0])]
        else:
            new = [cell_step(step_input_gates(table_gates, state["ctx"]), layers[0], self.cells[0])]
        x = output_of(new[0])  # the bottom layer's output (B, H)
        ctx, weights = self.attention(x, enc["memory"], enc["keys"], enc["mask"], enc["src_len"])
        for i in range(1, len(self.cells)):  # the context enters every layer
            new.append(self._cell(i, torch.cat([self.dropout(x), ctx], dim=-1), layers[i]))
            h = output_of(new[i])
            x = h + x if self.residual[i] else h
        return self.dropout(x), {**layers_state(new), "ctx": ctx}, weights

    def sequence(self, emb: torch.Tensor, enc: State, state: State) -> torch.Tensor:
        """Teacher forcing: emb (B, T, E) -> outputs (B, T, H). Only the bottom layer and the attention loop
        over positions; each upper layer is one fused call on its cell's weights over the whole target."""
        h = state["h"].transpose(0, 1)  # (L, B, H): torch's layout (which the gradients keep) inside the loop
        layers = list(zip(h, state["c"].transpose(0, 1))) if self.has_cell_state else list(h)
        bottom, ctx, bottom_cell = layers[0], state["ctx"], self.cells[0]
        gx_emb, w_ctx = embedding_gates(emb, bottom_cell.weight_ih, bottom_cell.bias_ih)
        bottoms, ctxs, loop = [], [], AttentionLoop()
        enc = loop.wrap(enc)
        for gx in gx_emb.unbind(1):  # (B, 4H) per position
            bottom = cell_step(gx + F.linear(ctx, w_ctx), bottom, bottom_cell)
            hb = output_of(bottom)
            ctx, _ = self.attention(hb, enc["memory"], enc["keys"], enc["mask"], enc["src_len"], loop=loop)
            bottoms.append(hb)
            ctxs.append(ctx)
        x, context = torch.stack(bottoms, dim=1), torch.stack(ctxs, dim=1)  # (B, T, H), (B, T, Hm)
        for i in range(1, len(self.cells)):
            out = run_cell(self.cells[i], torch.cat([self.dropout(x), context], dim=-1), layers[i])
            x = out + x if self.residual[i] else out
        return self.dropout(x)


class GNMT(AttentionalRNN):
    """Residual bidirectional-bottom encoder + attention-fed residual decoder."""

    Config = Config

    def __init__(self, cfg: Config, src_vocab_size: int, tgt_vocab_size: int, pad_id: int):
        super().__init__(cfg, src_vocab_size, tgt_vocab_size, pad_id)
        self.encoder = GNMTEncoder(cfg, src_vocab_size, pad_id)
        self.decoder = GNMTDecoder(cfg, self.encoder.out_dim)
        if cfg.bridge:
            self.bridge = Bridge(self.encoder.out_dim, cfg)
        self.add_output_layers(tgt_vocab_size, pad_id)

    def attention_label(self) -> str:
        return "additive attention, queried by the bottom decoder layer"

"""Sequence to sequence with deep LSTMs (Sutskever, Vinyals and Le, 2014): a stacked LSTM (or GRU) reads
the source, optionally reversed, and its final per-layer states initialise a stacked decoder of the same
shape; no attention. Also the building blocks shared by the other recurrent families: the cell choice,
conversion between torch's (layers, batch, hidden) states and mtkit's batch-first state dicts, source
reversal, and an encoder over length-sorted rows (as over a packed sequence).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from mtkit.config_fields import ModelConfig, any_value, choice, number
from mtkit.errors import MtkitError
from mtkit.kernels.dropout import Dropout, dropout
from mtkit.kernels.linear import Linear, cached_layout, linear, matmul_nt, prepacked, step_linear
from mtkit.kernels.lstm_cell import lstm_pointwise
from mtkit.kernels.lstm_layer import lstm_layer
from mtkit.models.base import Seq2Seq, State

RNN_CLASSES: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU}
CELL_CLASSES: dict[str, type[nn.RNNCellBase]] = {"lstm": nn.LSTMCell, "gru": nn.GRUCell}

Hidden = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


# --- shared helpers --------------------------------------------------------------------------
def init_weights(module: nn.Module, scale: float, forget_bias: float) -> None:
    """Uniform(-scale, scale) for every parameter (the papers' init; 0 keeps torch's defaults), then
    every LSTM forget gate at ``forget_bias`` (bias_ih; bias_hh's part at 0): the cell keeps its memory
    from the first update instead of halving it at every step."""
    with torch.no_grad():
        if scale > 0:
            for p in module.parameters():
                nn.init.uniform_(p, -scale, scale)
        for m in module.modules():
            if scale > 0 and isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
            if isinstance(m, (nn.LSTM, nn.LSTMCell)):
                for name, p in m.named_parameters():
                    if name.startswith("bias_"):
                        h = p.numel() // 4  # gates i, f, g, o
                        p[h : 2 * h].fill_(forget_bias if name.startswith("bias_ih") else 0.0)


class Embedding(nn.Embedding):
    """``nn.Embedding`` whose output is multiplied by ``scale`` (1 unless tied: see
    :func:`tie_embeddings`); the same parameters and state-dict keys as ``nn.Embedding``."""

    scale: float = 1.0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = super().forward(tokens)
        return x if self.scale == 1.0 else x * self.scale


def tie_embeddings(src_embed: nn.Embedding, tgt_embed: nn.Embedding, out: nn.Linear) -> nn.Embedding:
    """``out.weight = tgt_embed.weight``; the source embedding too when both vocabularies have the
    same size (a joint vocabulary). Returns the target embedding to use (``src_embed`` if shared).
    The families' config checks guarantee that ``out`` reads vectors of the embedding's size."""
    if src_embed.num_embeddings == tgt_embed.num_embeddings and src_embed.embedding_dim == tgt_embed.embedding_dim:
        tgt_embed = src_embed
    # N(0, 1/d) rather than N(0, 1): the output layer's logits start at the scale of its input
    # (about 1) instead of sqrt(d) times it, which saturates the softmax before the first update;
    # the inputs are scaled back by sqrt(d), so the RNNs still read unit-scale embeddings
    if isinstance(tgt_embed, Embedding):
        tgt_embed.scale = tgt_embed.embedding_dim**0.5
    with torch.no_grad():
        nn.init.normal_(tgt_embed.weight, 0.0, tgt_embed.embedding_dim**-0.5)
        if tgt_embed.padding_idx is not None:
            tgt_embed.weight[tgt_embed.padding_idx].zero_()
    out.weight = tgt_embed.weight
    return tgt_embed


def run_cell(cell: nn.RNNCellBase, x: torch.Tensor, state: Hidden) -> torch.Tensor:
    """Run an ``nn.LSTMCell``/``nn.GRUCell`` over a sequence in one call (torch's fused single-layer RNN
    on the cell's own weights): x (B, T, I), ``state`` (h, c) or h, each (B, H) -> outputs (B, T, H)."""
    params = [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
    if isinstance(state, tuple):
        h0, c0 = state
        return torch.lstm(x, (h0.unsqueeze(0), c0.unsqueeze(0)), params, True, 1, 0.0, False, False, True)[0]
    return torch.gru(x, state.unsqueeze(0), params, True, 1, 0.0, False, False, True)[0]


def output_of(state: Hidden) -> torch.Tensor:
    """h of one layer's state: ``(h, c)`` (LSTM) or ``h`` (GRU)."""
    return state[0] if isinstance(state, tuple) else state


def gates_of(x: torch.Tensor, rnn: nn.Module, kind: str = "ih", layer: int | None = None) -> torch.Tensor:
    """``x W^T + b`` with ``rnn``'s weights ``kind`` ("ih" input, "hh" recurrent; see :func:`cell_step`)."""
    sfx = "" if layer is None else f"_l{layer}"
    return step_linear(x, rnn, f"weight_{kind}{sfx}", getattr(rnn, f"bias_{kind}{sfx}"))


def cell_step(gx: torch.Tensor, state: Hidden, rnn: nn.Module, layer: int | None = None) -> Hidden:
    """One LSTM (``state`` = (h, c)) or GRU (``state`` = h) step, torch's cells' maths, from the input's
    share of the gates ``gx = x W_ih^T + b_ih`` (B, 4H or 3H; torch's gate order), computed by the caller
    (for a whole sequence at once where the input does not depend on the recurrence). The recurrent
    weights are those of an ``nn.LSTMCell``/``nn.GRUCell`` ``rnn`` (``layer`` None) or of layer ``layer``
    of an ``nn.LSTM``/``nn.GRU``."""
    h = output_of(state)
    gh = gates_of(h, rnn, "hh", layer)
    n_hidden = h.size(1)
    if isinstance(state, tuple):
        if gh.device.type == "cpu":
            return lstm_pointwise(gx, gh, state[1])
        gates = gx + gh
        i, f, _, o = torch.sigmoid(gates).chunk(4, 1)  # the g quarter is wasted: one call instead of three
        c = torch.addcmul(f * state[1], i, torch.tanh(gates[:, 2 * n_hidden : 3 * n_hidden]))
        return o * torch.tanh(c), c
    r, z = torch.sigmoid(gx[:, : 2 * n_hidden] + gh[:, : 2 * n_hidden]).chunk(2, 1)
    n = torch.tanh(torch.addcmul(gx[:, 2 * n_hidden :], r, gh[:, 2 * n_hidden :]))
    return torch.lerp(n, h, z)  # (1 - z) n + z h


def rnn_step(rnn: nn.RNNBase, x: torch.Tensor | None, hidden: list, gx0: torch.Tensor | None = None) -> tuple[torch.Tensor, list]:
    """One time step of a stacked unidirectional ``nn.LSTM``/``nn.GRU`` on its own weights (checkpoints
    unchanged): x (B, I), ``hidden`` (per layer ``(h, c)`` or ``h``, each (B, H)) -> (top output (B, H),
    new per-layer list); ``x`` unused when the caller gives ``gx0``, the bottom layer's ``gx`` (see
    :func:`cell_step`). Equal to ``rnn`` on a length-1 sequence, dropout between layers included, and
    cheaper per step on a CPU (no fused-layer setup per call)."""
    new = []
    for layer, state in enumerate(hidden):
        if layer and rnn.dropout and rnn.training:
            x = dropout(x, rnn.dropout)
        gx = gx0 if layer == 0 and gx0 is not None else gates_of(x, rnn, "ih", layer)
        state = cell_step(gx, state, rnn, layer)
        x = output_of(state)
        new.append(state)
    return x, new


def embedding_gates(emb: torch.Tensor, w_ih: torch.Tensor, b_ih: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a bottom layer that reads ``[embedding; x_t]`` with x_t known only step by step: the
    embedding's share of the gates for all positions at once (``emb`` (B, T, E) -> (B, T, 4H or
    3H), ``b_ih`` included) and the contiguous columns of ``w_ih`` that read x_t."""
    first = emb.size(-1)
    return linear(emb, w_ih[:, :first].contiguous(), b_ih), w_ih[:, first:].contiguous()


GATE_TABLE_LIMIT = 1 << 24  # entries of a table (64 MB in float32); larger vocabularies multiply step by step


def decoding_input_gates(
    tokens: torch.Tensor, embed: Embedding, cell: nn.Module, weight: str, bias: str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Decoding with a bottom layer that reads ``[embedding; x_t]``: the embedding's share of its gates
    for ``tokens`` (B,) as rows of a table ``E W_e^T + b`` (V, 4H) made once per weight version, and the
    columns of ``W`` that read x_t (laid out for :func:`matmul_nt`), so that a step multiplies x_t only.
    None where that does not apply (training, outside ``torch.inference_mode``, too large a table)."""
    w, b = getattr(cell, weight), getattr(cell, bias)
    if (cell.training or embed.training or not torch.is_inference_mode_enabled() or w.is_inference()
            or embed.weight.is_inference() or embed.num_embeddings * w.size(0) > GATE_TABLE_LIMIT):
        return None
    def make() -> tuple[torch.Tensor, torch.Tensor]:
        table, rest = embedding_gates(embed.weight * embed.scale, w, b)
        return table, prepacked(rest)

    key = (embed.weight.data_ptr(), embed.weight._version, w.data_ptr(), w._version,
           None if b is None else (b.data_ptr(), b._version), embed.scale)
    table, rest = cached_layout(cell, f"gate_table_{weight}", key, make)
    return table.index_select(0, tokens), rest


def step_input_gates(table_gates: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor | None) -> torch.Tensor:
    """The bottom layer's ``gx`` for one step from :func:`decoding_input_gates` and x_t (B, I), if any."""
    gates, rest = table_gates
    return gates if x is None else gates.add_(matmul_nt(x, rest))


def state_layers(state: State) -> list:
    """{"h": (B, layers, H)[, "c": ...]} -> the per-layer list of :func:`rnn_step`."""
    if "c" in state:
        return list(zip(state["h"].unbind(1), state["c"].unbind(1)))
    return list(state["h"].unbind(1))


def layers_state(layers: list) -> State:
    """Inverse of :func:`state_layers`."""
    if isinstance(layers[0], tuple):
        return {"h": torch.stack([h for h, _ in layers], 1), "c": torch.stack([c for _, c in layers], 1)}
    return {"h": torch.stack(layers, 1)}


def to_state(hidden: Hidden, layers: int) -> State:
    """torch RNN state (layers*dirs, B, H) [+ cell] -> {"h": (B, layers, dirs*H)[, "c": ...]}: ``layers``
    layers, each with its directions concatenated."""
    parts = hidden if isinstance(hidden, tuple) else (hidden,)
    return {name: t.transpose(0, 1).reshape(t.size(1), layers, -1) for name, t in zip("hc", parts)}


def from_state(state: State) -> Hidden:
    """Inverse of :func:`to_state`: an LSTM state has "c", a GRU state has only "h"."""
    h = state["h"].transpose(0, 1).contiguous()
    if "c" in state:
        return h, state["c"].transpose(0, 1).contiguous()
    return h


def reverse_padded(src: torch.Tensor, src_len: torch.Tensor) -> torch.Tensor:
    """Reverse the first ``src_len[i]`` tokens of each row, leaving the padding in place."""
    pos = torch.arange(src.size(1), device=src.device).unsqueeze(0)  # (1, S)
    lens = src_len.to(src.device).unsqueeze(1)  # (B, 1)
    index = torch.where(pos < lens, lens - 1 - pos, pos)  # (B, S)
    return src.gather(1, index)


def initial_state(enc: State) -> State:
    """The decoder's starting states kept in ``enc`` as "init_h"[/"init_c"] -> {"h"[, "c"]}."""
    return {k[len("init_"):]: v for k, v in enc.items() if k.startswith("init_")}


def stacked_rnn(cell: str, input_dim: int, hidden: int, layers: int, dropout: float,
                bidirectional: bool = False) -> nn.RNNBase:
    """A batch-first ``nn.LSTM``/``nn.GRU`` with ``dropout`` between its layers."""
    return RNN_CLASSES[cell](input_dim, hidden, layers, batch_first=True,
                             dropout=dropout if layers > 1 else 0.0, bidirectional=bidirectional)


def padding_mask(src_len: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) bool, True on real tokens."""
    return torch.arange(width, device=src_len.device).unsqueeze(0) < src_len.unsqueeze(1)


class SortedBatch:
    """A padded batch as length-sorted, time-major rows (longest first), over which RNN layers run as over a
    packed sequence: padding never enters a recurrence, outputs are zero on it, and each row's final state
    is the one after its last token. In training on a CPU an ``nn.LSTM`` runs as :func:`lstm_layer` (one
    node per layer and one matmul for the input's share of the gates); without gradients (decoding, where
    torch's packed LSTM is the faster), elsewhere, and for a GRU, torch's packed RNN runs.
    ``enter`` takes (B, S, F) batch-first tensors in, ``leave`` and ``final`` give results back in batch
    order."""

    def __init__(self, src_len: torch.Tensor, width: int, device: torch.device):
        lens = src_len.cpu()
        self.order = torch.argsort(lens, descending=True, stable=True)
        self.lengths = lens[self.order]
        self.steps, self.width, rows = int(self.lengths.max()) if lens.numel() else 0, width, lens.numel()
        pos = torch.arange(self.steps).unsqueeze(1)  # (T, 1)
        self.batch_sizes = (self.lengths.unsqueeze(0) > pos).sum(1).tolist()
        ends = self.lengths.unsqueeze(0)
        rev = torch.where(pos < ends, ends - 1 - pos, pos)  # (T, B): position t of the reversed row
        self.rev_rows = (rev * rows + torch.arange(rows)).view(-1).to(device)
        self.order_dev, self.inverse = self.order.to(device), torch.argsort(self.order).to(device)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, F) -> (T, B, F), rows sorted, T the longest length."""
        return x.index_select(0, self.order_dev)[:, : self.steps].transpose(0, 1).contiguous()

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        """Each row of (T, B, F) reversed within its length (padding stays in place)."""
        t, b, f = y.shape
        return y.reshape(t * b, f).index_select(0, self.rev_rows).view(t, b, f)

    def leave(self, y: torch.Tensor) -> torch.Tensor:
        """(T, B, F) -> (B, S, F) in batch order, zero-padded to the batch's width."""
        y = F.pad(y, (0, 0, 0, 0, 0, self.width - self.steps))
        return y.transpose(0, 1).index_select(0, self.inverse)

    def final(self, hidden: Hidden) -> Hidden:
        """Final RNN states (layers*dirs, B, H) [+ cell] in batch order."""
        if isinstance(hidden, tuple):
            return tuple(x.index_select(1, self.inverse) for x in hidden)
        return hidden.index_select(1, self.inverse)

    def run(self, rnn: nn.RNNBase, x: torch.Tensor) -> tuple[torch.Tensor, Hidden]:
        """``rnn`` over the (T, B, I) rows from :meth:`enter` -> (outputs (T, B, dirs*H), final states
        (layers*dirs, B, H) [+ cell], sorted rows)."""
        if (isinstance(rnn, nn.LSTM) and torch.is_grad_enabled() and x.device.type == "cpu"
                and x.dtype == torch.float32 and rnn.bias and not rnn.proj_size):
            return self._lstm(rnn, x)
        out, hidden = rnn(pack_padded_sequence(x, self.lengths))  # a packed sequence ignores batch_first
        return pad_packed_sequence(out, total_length=self.steps)[0], hidden

    def _lstm(self, rnn: nn.LSTM, x: torch.Tensor) -> tuple[torch.Tensor, Hidden]:
        suffixes = ["", "_reverse"] if rnn.bidirectional else [""]
        hs, cs = [], []
        for layer in range(rnn.num_layers):
            if layer and rnn.dropout and rnn.training:
                x = dropout(x, rnn.dropout)
            gx, w_hh = [], []
            for d, sfx in enumerate(suffixes):
                bias = getattr(rnn, f"bias_ih_l{layer}{sfx}") + getattr(rnn, f"bias_hh_l{layer}{sfx}")
                gx.append(linear(self.reverse(x) if d else x, getattr(rnn, f"weight_ih_l{layer}{sfx}"), bias))
                w_hh.append(getattr(rnn, f"weight_hh_l{layer}{sfx}"))
            zeros = x.new_zeros(len(suffixes), x.size(1), rnn.hidden_size)
            out, h, c = lstm_layer(torch.stack(gx), torch.stack(w_hh), zeros, zeros, self.batch_sizes)
            x = torch.cat([out[0], self.reverse(out[1])], -1) if rnn.bidirectional else out[0]
            hs.append(h)
            cs.append(c)
        return x, (torch.cat(hs), torch.cat(cs))


class RNNEncoder(nn.Module):
    """Embedding + stacked (optionally bidirectional) RNN over length-sorted rows (:class:`SortedBatch`, as
    over a packed sequence) -> the memory (B, S, dirs*H), zero on padding, and the final states
    {"h": (B, layers, dirs*H)[, "c": ...]} (directions concatenated)."""

    def __init__(self, cell: str, vocab: int, embed_dim: int, hidden: int, layers: int,
                 dropout: float, pad_id: int, bidirectional: bool = False):
        super().__init__()
        self.embed = Embedding(vocab, embed_dim, padding_idx=pad_id)
        self.dropout = Dropout(dropout)
        self.rnn = stacked_rnn(cell, embed_dim, hidden, layers, dropout, bidirectional)
        self.out_dim = (2 if bidirectional else 1) * hidden

    def forward(self, src: torch.Tensor, src_len: torch.Tensor) -> tuple[torch.Tensor, State]:
        x = self.dropout(self.embed(src))  # (B, S, E)
        rows = SortedBatch(src_len, src.size(1), src.device)
        out, hidden = rows.run(self.rnn, rows.enter(x))
        memory = rows.leave(out)  # (B, S, dirs*H)
        return self.dropout(memory), to_state(rows.final(hidden), self.rnn.num_layers)


class RecurrentConfig(ModelConfig):
    """Base of the recurrent family configs (fields ``hidden_dim``, ``embed_dim``, ``tie_embeddings``...)."""

    @property
    def width(self) -> int:
        return self.hidden_dim

    def check_tied_sizes(self, section: str, key: str, size: int, other: str) -> None:
        """With ``tie_embeddings``, refuse ``key`` (``size``) != ``other``: the output layer must read
        vectors of the embedding's size."""
        if self.tie_embeddings and size != getattr(self, other):
            raise MtkitError(
                f"config key '{section}.tie_embeddings': true needs {section}.{key} ({size}) "
                f"== {section}.{other} ({getattr(self, other)})"
            )


# --- the Sutskever model ---------------------------------------------------------------------
@dataclass
class Config(RecurrentConfig):
    arch: str = any_value("lstm")
    cell: str = choice("lstm", "lstm", "gru")
    embed_dim: int = number(256, low=1)
    hidden_dim: int = number(256, low=1)
    layers: int = number(2, low=1)  # encoder and decoder depth (the encoder's final states seed the decoder)
    reverse_source: bool = True  # feed the source backwards (the paper's key trick)
    dropout: float = number(0.2, low=0, high=1)  # on embeddings, between layers, before the output layer
    init_scale: float = number(0.0, low=0)  # uniform(-s, s) init of every weight (paper: 0.08); 0 = torch defaults
    tie_embeddings: bool = False  # share decoder input embedding and output projection
    forget_bias: float = number(1.0)  # initial LSTM forget-gate bias

    def check(self, section: str) -> None:
        self.check_tied_sizes(section, "embed_dim", self.embed_dim, "hidden_dim")


class LSTMSeq2Seq(Seq2Seq):
    """Deep encoder-decoder without attention; ``step`` returns ``attn=None``."""

    Config = Config

    def __init__(self, cfg: Config, src_vocab_size: int, tgt_vocab_size: int, pad_id: int):
        super().__init__(cfg, src_vocab_size, tgt_vocab_size, pad_id)
        self.encoder = RNNEncoder(cfg.cell, src_vocab_size, cfg.embed_dim, cfg.hidden_dim,
                                  cfg.layers, cfg.dropout, pad_id)
        self.tgt_embed = nn.Embedding(tgt_vocab_size, cfg.embed_dim, padding_idx=pad_id)
        self.decoder = stacked_rnn(cfg.cell, cfg.embed_dim, cfg.hidden_dim, cfg.layers, cfg.dropout)
        self.dropout = Dropout(cfg.dropout)
        self.out = Linear(cfg.hidden_dim, tgt_vocab_size)
        init_weights(self, cfg.init_scale, cfg.forget_bias)
        if cfg.tie_embeddings:
            self.out.weight = self.tgt_embed.weight

    def encode(self, src: torch.Tensor, src_len: torch.Tensor) -> State:
        if self.cfg.reverse_source:
            src = reverse_padded(src, src_len)
        _, final = self.encoder(src, src_len)
        return {f"init_{k}": v for k, v in final.items()}  # (B, layers, H) each

    def init_state(self, enc: State) -> State:
        return initial_state(enc)

    def _decode(self, tgt_in: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        x = self.dropout(self.tgt_embed(tgt_in))  # (B, T, E)
        out, hidden = self.decoder(x, from_state(state))  # (B, T, H)
        return self.dropout(out), to_state(hidden, self.cfg.layers)  # features before the output projection

    def output_projection(self) -> nn.Linear:
        return self.out

    def features(self, src: torch.Tensor, src_len: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self._decode(tgt_in, self.init_state(self.encode(src, src_len)))[0]

    def step(
        self, prev_tokens: torch.Tensor, enc: State, state: State, need_attn: bool = True
    ) -> tuple[torch.Tensor, State, None]:
        hidden, state = self._decode(prev_tokens.unsqueeze(1), state)
        return torch.log_softmax(self.out(hidden.squeeze(1)).float(), dim=-1), state, None

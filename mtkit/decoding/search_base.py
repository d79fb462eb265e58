"""What every search mode shares: the hypothesis, the ensemble step, the per-batch set-up, the log-prob
constraints, and the "all done?" check that lets finished rows leave the batch (finding out which rows
are done costs one host read, made every step on CPU and every ``SYNC_EVERY`` steps on accelerators)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mtkit.config import DecodeConfig
from mtkit.decoding import penalties
from mtkit.errors import MtkitError
from mtkit.models.base import Seq2Seq, State, expand_state, reorder_state

SYNC_EVERY = {"cpu": 1}  # steps between "all done?" checks; other devices: DEFAULT_SYNC_EVERY
DEFAULT_SYNC_EVERY = 8
TOPK_BLOCK = 64  # columns per block in row_topk


@dataclass
class Hypothesis:
    tokens: list[int]  # without BOS/EOS
    score: float  # final score after penalties
    log_prob: float  # sum of token log-probs including EOS
    attn: torch.Tensor | None = None  # (len(tokens) + 1, src_len): one row per target step incl. EOS


class Ensemble:
    """Several models behind one step function; each keeps its own ``enc`` and ``state``."""

    def __init__(self, models: Sequence[Seq2Seq]):
        if not models:
            raise MtkitError("decoding needs at least one model")
        sizes = {m.tgt_vocab_size for m in models}
        if len(sizes) > 1:
            raise MtkitError(f"ensemble models have different target vocabularies (sizes {sorted(sizes)})")
        self.models = list(models)
        self.log_m = math.log(len(self.models))

    def max_positions(self) -> int | None:
        return min((m.max_positions() for m in self.models if m.max_positions() is not None), default=None)

    def start(self, src: torch.Tensor, src_len: torch.Tensor) -> tuple[list[State], list[State]]:
        """Encode: one enc and state row per sentence."""
        encs = [m.encode(src, src_len) for m in self.models]
        return encs, [m.init_state(enc) for m, enc in zip(self.models, encs)]

    def fan_out(self, encs: list[State], states: list[State], k: int) -> tuple[list[State], list[State]]:
        """k rows per sentence for the beam: states always, encs unless the model shares them."""
        encs = [e if m.beam_shares_enc else expand_state(e, k) for m, e in zip(self.models, encs)]
        return encs, [expand_state(st, k) for st in states]

    def keep_sentences(self, encs: list[State], sentences: torch.Tensor, rows: torch.Tensor) -> list[State]:
        """The encs of the kept ``sentences`` (whose decoder rows are ``rows``)."""
        return [reorder_state(e, sentences if m.beam_shares_enc else rows) for m, e in zip(self.models, encs)]

    def step(
        self, prev: torch.Tensor, encs: list[State], states: list[State], need_attn: bool = True
    ) -> tuple[torch.Tensor, list[State], torch.Tensor | None]:
        """-> (log_probs (N, V) float32, new states, attention (N, S) or None)."""
        outs = [m.step(prev, enc, st, need_attn=need_attn) for m, enc, st in zip(self.models, encs, states)]
        new_states = [o[1] for o in outs]
        if len(outs) == 1:
            lp, _, attn = outs[0]
            return lp.float(), new_states, (None if attn is None else attn.float())
        lp = torch.logsumexp(torch.stack([o[0].float() for o in outs]), dim=0) - self.log_m
        attns = [o[2] for o in outs]
        attn = None if any(a is None for a in attns) else torch.stack([a.float() for a in attns]).mean(0)
        return lp, new_states, attn


def row_topk(x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(c, dim=1)`` of a wide (N, V) CPU array in two cheap passes (ties may come in another order).
    The c largest of a row lie in the c blocks of ``TOPK_BLOCK`` columns with the largest maxima; a
    vectorised block maximum plus a top-c of c blocks reads each row once instead of sorting it.
    Other devices use ``topk``."""
    n, v = x.shape
    blocks = v // TOPK_BLOCK
    if x.device.type != "cpu" or blocks < 2 * c:
        return x.topk(c, dim=1)
    main = blocks * TOPK_BLOCK
    best = x[:, :main].reshape(n, blocks, TOPK_BLOCK).amax(2).topk(c, dim=1).indices  # (N, c)
    cols = (best.unsqueeze(2) * TOPK_BLOCK + torch.arange(TOPK_BLOCK, device=x.device)).view(n, -1)
    if main < v:  # the last, partial block is always a candidate
        cols = torch.cat([cols, torch.arange(main, v, device=x.device).expand(n, -1)], 1)
    values, pos = x.gather(1, cols).topk(c, dim=1)
    return values, cols.gather(1, pos)


def scatter_rows(x: torch.Tensor, rows: torch.Tensor, n: int, fill: float | int) -> torch.Tensor:
    """Place the live rows ``x`` (len(rows), ...) at ``rows`` of a new (n, ...) tensor."""
    if rows.numel() == n:
        return x
    full = x.new_full((n, *x.shape[1:]), fill)
    full[rows] = x
    return full


@dataclass
class SearchSetup:
    """What every search mode works out once per batch, before its first step."""

    cfg: DecodeConfig
    eos: int
    length_penalty: Callable[[torch.Tensor, float], torch.Tensor]
    max_len: torch.Tensor  # (N,) most tokens per sentence, EOS excluded
    steps: int  # most steps any sentence can take
    shortest_max: int  # a lower bound of max_len: no row is at its limit before this step
    banned: list[int]  # never generated: pad and BOS
    src_mask: torch.Tensor  # (N, S) True on real source positions
    keep_attn: bool  # the model returns attention (wanted, or the coverage penalty needs it)
    encs: list[State]
    states: list[State]

    def constrain(
        self, log_probs: torch.Tensor, t: int, max_len: torch.Tensor, history: torch.Tensor | None
    ) -> torch.Tensor:
        """Apply the constraints to the step's (N, V) log-probs, in place where possible."""
        log_probs = penalties.ban_tokens_(log_probs, self.banned)
        if self.cfg.no_repeat_ngram > 0 and history is not None:
            log_probs = penalties.block_repeated_ngrams(log_probs, history, self.cfg.no_repeat_ngram)
        return penalties.enforce_length_(log_probs, t, self.eos, self.cfg.min_len, max_len, self.shortest_max)


def set_up(
    ens: Ensemble, src: torch.Tensor, src_len: torch.Tensor, cfg: DecodeConfig, bos: int, eos: int, attention: bool
) -> SearchSetup:
    """Length limits, banned tokens and source mask of a batch, and its encoding."""
    n, device = src.size(0), src.device
    length_penalty = penalties.length_penalty_fn(cfg.length_penalty)
    max_len = (cfg.max_len_a * src_len.to(torch.float64) + cfg.max_len_b).floor().long().clamp(min=0)
    limit = ens.max_positions()
    if limit is not None:
        max_len = max_len.clamp(max=limit - 1)  # decoder input is BOS + tokens: at most ``limit`` positions
    steps = int(max_len.max()) + 1 if n else 0
    shortest_max = int(max_len.min()) if n else 0
    banned = sorted({bos, ens.models[0].pad_id} - {eos})
    src_mask = torch.arange(src.size(1), device=device).unsqueeze(0) < src_len.unsqueeze(1)
    keep_attn = attention or bool(cfg.beta)
    encs, states = ens.start(src, src_len)
    return SearchSetup(cfg, eos, length_penalty, max_len, steps, shortest_max, banned, src_mask, keep_attn, encs, states)


class DoneCheck:
    """The "all done?" check: every ``SYNC_EVERY`` steps, whether to stop and which rows to keep."""

    def __init__(self, device: torch.device):
        self.every = SYNC_EVERY.get(device.type, DEFAULT_SYNC_EVERY)
        self.device = device

    def __call__(self, done: torch.Tensor, t: int) -> tuple[bool, torch.Tensor | None]:
        """After step ``t``: (all rows done, the rows still searched or None to keep them all)."""
        if (t + 1) % self.every:
            return False, None
        finished = done.cpu()
        if bool(finished.all()):
            return True, None
        if bool(finished.any()):
            return False, (~finished).nonzero().squeeze(1).to(self.device)
        return False, None

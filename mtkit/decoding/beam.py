"""Batched beam search over the Seq2Seq contract, as four named phases per step.

All sentences of a batch and all their beams are decoded together as ``(batch * beam, ...)`` tensors
on the model's device. Per step: 1. :func:`score_update`; 2. :func:`top_candidates`, the top ``2k``
extensions per sentence (no beam starves if up to ``k`` end in EOS); 3. :func:`finish`, penalised EOS
extensions join a fixed-size finished store; 4. :func:`next_beams` and :func:`reorder`, the best ``k``
non-EOS extensions become the next beam and the models' states follow.

Tokens and attention are recovered at the end from per-step backpointers. A sentence is done when its
store holds ``k`` hypotheses (``decode.stopping: full``, as fairseq), or once its best-ranked extension
is EOS and ``nbest`` hypotheses are finished (``first``, as OpenNMT-py), or when no live beam is left.
Its results are then frozen, so a sentence decodes the same alone and inside a batch, and it leaves the
batch at the next "all done?" check: the model only steps the sentences still searched."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mtkit.config import DecodeConfig
from mtkit.decoding import penalties
from mtkit.decoding.penalties import NEG_INF
from mtkit.decoding.search_base import (
    DoneCheck,
    Ensemble,
    Hypothesis,
    SearchSetup,
    row_topk,
    scatter_rows,
    set_up,
)
from mtkit.models.base import State, reorder_state


@dataclass
class FinishedStore:
    """Per sentence, its ``k`` best finished hypotheses, best first."""

    score: torch.Tensor  # (B, k) final score after penalties, -inf where empty
    log_prob: torch.Tensor  # (B, k) sum of token log-probs incl. EOS
    length: torch.Tensor  # (B, k) tokens before EOS
    parent: torch.Tensor  # (B, k) the beam fed at the EOS step

    @classmethod
    def empty(cls, sentences: int, k: int, device: torch.device) -> FinishedStore:
        score = torch.full((sentences, k), NEG_INF, device=device)
        length = torch.zeros(sentences, k, dtype=torch.long, device=device)
        return cls(score, score.clone(), length, length.clone())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.score, self.log_prob, self.length, self.parent

    def select(self, sentences: torch.Tensor) -> FinishedStore:
        return FinishedStore(*(x[sentences] for x in self.tensors()))

    def write_rows(self, part: FinishedStore, sentences: torch.Tensor) -> None:
        """Copy ``part``, the store of ``sentences``, into their rows of this (whole batch's) store."""
        for whole, rows in zip(self.tensors(), part.tensors()):
            whole[sentences] = rows


@dataclass
class LiveBeams:
    """The search's tensors over the sentences still searched (``live`` maps them to the batch)."""

    live: torch.Tensor  # (L,) batch index of each sentence
    scores: torch.Tensor  # (L, k) cumulative log-prob of each beam
    prev: torch.Tensor  # (L * k,) last token of each beam (step 0: (L,), one row per sentence)
    done: torch.Tensor  # (L,) the sentence's store is final
    max_len: torch.Tensor  # (L * k,) most tokens per beam
    src_mask: torch.Tensor  # (L, S)
    encs: list[State]
    states: list[State]
    coverage: torch.Tensor | None  # (L * k, S) attention mass so far (coverage penalty only)
    history: torch.Tensor  # (L * k, t) tokens so far (no-repeat n-gram blocking only)
    finished: FinishedStore


@dataclass
class Candidates:
    """A step's top ``2k`` extensions per sentence, best first."""

    scores: torch.Tensor  # (L, 2k) cumulative log-probs
    parent: torch.Tensor  # (L, 2k) the beam each extends
    tokens: torch.Tensor  # (L, 2k)
    is_eos: torch.Tensor  # (L, 2k)


def start_beams(setup: SearchSetup, src: torch.Tensor, k: int, bos: int) -> LiveBeams:
    """Step 0 runs one row per sentence; all ``k`` beams start identical, only the first live."""
    b, device = src.size(0), src.device
    scores = torch.full((b, k), NEG_INF, device=device)
    scores[:, 0] = 0.0
    return LiveBeams(
        live=torch.arange(b, device=device),
        scores=scores,
        prev=torch.full((b,), bos, dtype=torch.long, device=device),
        done=torch.zeros(b, dtype=torch.bool, device=device),
        max_len=setup.max_len.repeat_interleave(k),
        src_mask=setup.src_mask,
        encs=setup.encs,
        states=setup.states,
        coverage=torch.zeros(b * k, src.size(1), device=device) if setup.cfg.beta else None,
        history=torch.zeros(b * k, 0, dtype=torch.long, device=device),
        finished=FinishedStore.empty(b, k, device),
    )


def score_update(
    log_probs: torch.Tensor, beams: LiveBeams, ens: Ensemble, attn: torch.Tensor | None, k: int, first_step: bool
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
    """1. A row's best ``c = 2k`` tokens are all its sentence's top 2k can use; they extend the
    row's cumulative log-prob. After step 0 (one row per sentence) the rows, the attention and the
    models fan out to k beams. -> (extension scores (L, k * c), their tokens (L * k, c), c, attn)."""
    c = min(2 * k, log_probs.size(1))
    row_top, row_tok = row_topk(log_probs, c)  # (rows, c)
    if first_step:
        row_top, row_tok = row_top.repeat_interleave(k, 0), row_tok.repeat_interleave(k, 0)
        attn = None if attn is None else attn.repeat_interleave(k, 0)
        beams.encs, beams.states = ens.fan_out(beams.encs, beams.states, k)
    live_count = beams.live.numel()
    extended = (row_top + beams.scores.view(live_count * k, 1)).view(live_count, k * c)
    return extended, row_tok, c, attn


def top_candidates(extended: torch.Tensor, row_tok: torch.Tensor, c: int, k: int, eos: int) -> Candidates:
    """2. The top ``2k`` extensions per sentence."""
    top_scores, top_idx = extended.topk(min(2 * k, k * c), dim=1)
    parent, tokens = top_idx // c, row_tok.view(extended.size(0), k * c).gather(1, top_idx)  # (L, 2k)
    return Candidates(top_scores, parent, tokens, tokens == eos)


def finish(
    cand: Candidates, beams: LiveBeams, setup: SearchSetup, attn: torch.Tensor | None, t: int, k: int
) -> torch.Tensor:
    """3. EOS extensions ranked within the top k join the store (not for done sentences), scored
    with the length and coverage penalties. -> which candidates finished (L, 2k)."""
    cfg, store = setup.cfg, beams.finished
    rank_ok = torch.arange(cand.scores.size(1), device=cand.scores.device).unsqueeze(0) < k
    new_finished = cand.is_eos & rank_ok & torch.isfinite(cand.scores) & ~beams.done.unsqueeze(1)
    coverage_term = None
    if beams.coverage is not None and attn is not None:
        coverage_rows = (beams.coverage + attn).view(beams.live.numel(), k, -1)
        parent_rows = cand.parent.unsqueeze(2).expand(-1, -1, coverage_rows.size(2))
        cand_coverage = coverage_rows.gather(1, parent_rows)
        coverage_term = penalties.coverage_penalty(cand_coverage, beams.src_mask.unsqueeze(1), cfg.beta)
    length = torch.full_like(cand.scores, t + 1)
    final = penalties.final_score(cand.scores, length, setup.length_penalty, cfg.alpha, coverage_term)
    final = final.masked_fill(~new_finished, NEG_INF)
    score, keep = torch.cat([store.score, final], 1).topk(k, dim=1)
    new = (cand.scores, torch.full_like(cand.parent, t), cand.parent)  # log-prob, length, parent
    kept = (torch.cat([old, x], 1).gather(1, keep) for old, x in zip(store.tensors()[1:], new))
    beams.finished = FinishedStore(score, *kept)
    return new_finished


def next_beams(cand: Candidates, beams: LiveBeams, k: int) -> torch.Tensor:
    """4a. The best ``k`` non-EOS extensions are the next beam. -> each beam's parent (L, k)."""
    beams.scores, pick = cand.scores.masked_fill(cand.is_eos, NEG_INF).topk(k, dim=1)
    beam_parent, beams.prev = cand.parent.gather(1, pick), cand.tokens.gather(1, pick)  # (L, k)
    return beam_parent


def mark_done(beams: LiveBeams, new_finished: torch.Tensor, cfg: DecodeConfig, k: int) -> None:
    """A sentence is done once k hypotheses are finished (or, stopping "first", once its best
    extension ended with nbest finished), or when no live beam is left."""
    store = beams.finished
    finished_now = torch.isfinite(store.score[:, -1]) | ~torch.isfinite(beams.scores).any(1)
    if cfg.stopping == "first":
        finished_now |= new_finished[:, 0] & torch.isfinite(store.score[:, min(cfg.nbest, k) - 1])
    beams.done = beams.done | finished_now


def drop_sentences(
    beams: LiveBeams, keep: torch.Tensor, rows: torch.Tensor, whole_store: FinishedStore, ens: Ensemble, k: int
) -> torch.Tensor:
    """Finished sentences leave the batch, their store written back. -> the kept beams' parent rows."""
    whole_store.write_rows(beams.finished, beams.live)
    kept = (x[keep] for x in (beams.live, beams.done, beams.scores, beams.prev, beams.src_mask))
    beams.live, beams.done, beams.scores, beams.prev, beams.src_mask = kept
    beams.finished = beams.finished.select(keep)
    keep_rows = (keep.unsqueeze(1) * k + torch.arange(k, device=keep.device)).view(-1)
    beams.max_len = beams.max_len[keep_rows]
    beams.encs = ens.keep_sentences(beams.encs, keep, keep_rows)
    return rows[keep]


def reorder(beams: LiveBeams, rows: torch.Tensor, follow_coverage: bool, track_history: bool) -> None:
    """4b. The models' states (and coverage, token history) follow each beam's parent row."""
    rows = rows.reshape(-1)
    beams.prev = beams.prev.reshape(-1)
    beams.states = [reorder_state(st, rows) for st in beams.states]
    if beams.coverage is not None and follow_coverage:
        beams.coverage = beams.coverage.index_select(0, rows)
    if track_history:
        beams.history = torch.cat([beams.history.index_select(0, rows), beams.prev.unsqueeze(1)], 1)


@dataclass
class Backpointers:
    """Per step, at full batch size: what :func:`collect` follows back from each finished hypothesis."""

    tokens: list[torch.Tensor]  # (B, k) token of each live beam after step t
    parents: list[torch.Tensor]  # (B, k) its beam at step t-1
    attn: list[torch.Tensor]  # (B, k, S) attention of the rows fed at step t


def beam_search(
    ens: Ensemble, src: torch.Tensor, src_len: torch.Tensor, cfg: DecodeConfig, bos: int, eos: int,
    attention: bool,
) -> list[list[Hypothesis]]:
    """Batched beam search; finished sentences leave the batch at each "all done?" check."""
    b, k = src.size(0), cfg.beam
    setup = set_up(ens, src, src_len, cfg, bos, eos, attention)
    beams = start_beams(setup, src, k, bos)
    whole_store = FinishedStore.empty(b, k, src.device)  # by batch sentence; beams.finished by live one
    trace = Backpointers([], [], [])
    done_check = DoneCheck(src.device)
    for t in range(setup.steps):
        log_probs, beams.states, attn = ens.step(beams.prev, beams.encs, beams.states, need_attn=setup.keep_attn)
        every = k if t == 0 else 1  # step 0 ran one row per sentence: all k beams start identical
        history = beams.history[::every] if cfg.no_repeat_ngram else None
        log_probs = setup.constrain(log_probs, t, beams.max_len[::every], history)
        extended, row_tok, c, attn = score_update(log_probs, beams, ens, attn, k, t == 0)
        live_count = beams.live.numel()
        if attention and attn is not None:
            trace.attn.append(scatter_rows(attn.view(live_count, k, -1), beams.live, b, 0.0))
        cand = top_candidates(extended, row_tok, c, k, eos)
        new_finished = finish(cand, beams, setup, attn, t, k)
        beam_parent = next_beams(cand, beams, k)
        trace.tokens.append(scatter_rows(beams.prev, beams.live, b, eos))
        trace.parents.append(scatter_rows(beam_parent, beams.live, b, 0))
        mark_done(beams, new_finished, cfg, k)
        rows = beam_parent + (torch.arange(live_count, device=src.device) * k).unsqueeze(1)  # (L, k) model rows
        if beams.coverage is not None and attn is not None:
            beams.coverage = beams.coverage + attn
        stop, keep = done_check(beams.done, t)
        if stop:
            break
        if keep is not None:
            rows = drop_sentences(beams, keep, rows, whole_store, ens, k)
        reorder(beams, rows, attn is not None, bool(cfg.no_repeat_ngram))
    whole_store.write_rows(beams.finished, beams.live)
    return collect(cfg, whole_store, trace, src_len, eos)  # trace.attn stays empty unless attention


def backtrack(store: FinishedStore, trace: Backpointers, pad: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Follow backpointers from each finished hypothesis: -> (tokens (B, k, steps), attention
    (B, k, steps, S) or None)."""
    b, k = store.score.shape
    steps, device = len(trace.tokens), store.score.device
    tokens = torch.full((b, k, max(steps, 1)), pad, dtype=torch.long, device=device)
    attn = torch.zeros(b, k, steps, trace.attn[0].size(2), device=device) if trace.attn else None
    beam = store.parent  # the beam fed at step store.length (the EOS step)
    for s in range(steps - 1, -1, -1):
        if attn is not None and s < len(trace.attn):
            at_s = s <= store.length
            row = trace.attn[s].gather(1, beam.unsqueeze(2).expand(-1, -1, attn.size(3)))
            attn[:, :, s] = torch.where(at_s.unsqueeze(2), row, 0.0)
        if s == 0:
            break
        active = (s - 1) < store.length  # position s-1 holds a real token
        tokens[:, :, s - 1] = torch.where(active, trace.tokens[s - 1].gather(1, beam), pad)
        beam = torch.where(active, trace.parents[s - 1].gather(1, beam), beam)
    return tokens, attn


def collect(
    cfg: DecodeConfig, store: FinishedStore, trace: Backpointers, src_len: torch.Tensor, pad: int
) -> list[list[Hypothesis]]:
    """Up to ``nbest`` hypotheses per sentence from the finished store, best first."""
    tokens, attn = backtrack(store, trace, pad)
    b, k = store.score.shape
    fin_score, fin_logp, fin_len = store.score.cpu(), store.log_prob.cpu(), store.length.cpu()
    tokens, src_len = tokens.cpu(), src_len.cpu()
    attn = attn.cpu() if attn is not None else None
    out: list[list[Hypothesis]] = []
    for i in range(b):
        hyps = []
        for j in range(min(cfg.nbest, k)):
            if not math.isfinite(float(fin_score[i, j])):
                break
            m = int(fin_len[i, j])
            a = attn[i, j, : m + 1, : int(src_len[i])].clone() if attn is not None else None
            hyps.append(Hypothesis(tokens[i, j, :m].tolist(), float(fin_score[i, j]), float(fin_logp[i, j]), a))
        if not hyps:  # nothing could finish (every extension impossible under the model)
            hyps.append(Hypothesis([], NEG_INF, NEG_INF, None))
        out.append(hyps)
    return out

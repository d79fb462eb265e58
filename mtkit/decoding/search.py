"""Greedy, sampling and batched beam search over the Seq2Seq contract, for every model family.

All sentences of a batch and all their beams are decoded together as tensors of shape
``(batch * beam, ...)`` on the model's device. Per step, beam search runs four named phases:

1. score update  -- cumulative log-prob of each beam's best ``2k`` extensions (no sentence
                    can use more of one beam's);
2. candidates    -- the top ``2k`` extensions per sentence, so a beam never starves when
                    up to ``k`` of them end in EOS;
3. finish        -- EOS extensions among the top ``k`` are scored with the length/coverage
                    penalties and merged into a fixed-size store of finished hypotheses;
4. reorder       -- the best ``k`` non-EOS extensions become the next beam; the models' states
                    follow through :func:`mtkit.models.base.reorder_state`.

Tokens and attention are recovered at the end from per-step backpointers. A sentence is done
when its store holds ``k`` hypotheses (``decode.stopping: full``, as fairseq), or once its
best-ranked extension is EOS and ``nbest`` hypotheses are finished (``first``, as OpenNMT-py),
or when no live beam is left. Its results are then frozen, so a sentence
decodes the same alone and inside a batch, and it leaves the batch: the model only steps the
sentences still searched. Finding out which are done costs one host read, made every step on
CPU and every ``SYNC_EVERY`` steps on accelerators; the loop stops once all are done.

Scores: ``Hypothesis.log_prob`` is the sum of the token log-probs (EOS included) under the
model -- for an ensemble, the log of the mean of the models' probabilities -- exactly what
teacher forcing gives; ``Hypothesis.score`` adds the penalties of :mod:`mtkit.decoding.penalties`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mtkit.config import DecodeConfig, check_section
from mtkit.decoding import penalties as P
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


@dataclass
class SamplingOptions:
    """Random sampling for back-translation (``beam`` is ignored; ``nbest`` samples each)."""

    temperature: float = 1.0
    topk: int = 0  # 0 = whole vocabulary
    topp: float = 1.0  # nucleus mass, 1.0 = off
    generator: torch.Generator | None = None


# ---------------------------------------------------------------------------------------------
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
        limits = [m.max_positions() for m in self.models if m.max_positions() is not None]
        return min(limits) if limits else None

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


def max_lengths(src_len: torch.Tensor, cfg: DecodeConfig, limit: int | None) -> torch.Tensor:
    """Most tokens (EOS excluded) per sentence: ``a * src_len + b``, within the model's limit."""
    n = (cfg.max_len_a * src_len.to(torch.float64) + cfg.max_len_b).floor().long().clamp(min=0)
    if limit is not None:
        n = n.clamp(max=limit - 1)  # decoder input is BOS + tokens: at most ``limit`` positions
    return n


def check_config(cfg: DecodeConfig, sampling: SamplingOptions | None) -> None:
    """The decode section's own rules, then what joins it to the search mode."""
    check_section(cfg, "decode")
    if sampling is None and cfg.nbest > cfg.beam:
        raise MtkitError(f"nbest ({cfg.nbest}) cannot exceed the beam size ({cfg.beam})")
    if sampling is not None:
        check_sampling(sampling)


def check_sampling(sampling: SamplingOptions) -> None:
    if not sampling.temperature > 0 or not math.isfinite(sampling.temperature):
        raise MtkitError(f"sampling temperature must be > 0, got {sampling.temperature}")
    if not 0.0 < sampling.topp <= 1.0:
        raise MtkitError(f"top-p must be in (0, 1], got {sampling.topp}")
    if sampling.topk < 0:
        raise MtkitError(f"top-k must be >= 0, got {sampling.topk}")


def _constrain(
    lp: torch.Tensor, t: int, cfg: DecodeConfig, max_len: torch.Tensor, banned: list[int], eos: int,
    history: torch.Tensor | None, shortest_max: int,
) -> torch.Tensor:
    """Apply the constraints to ``lp``, the step's (N, V) log-probs, in place where possible;
    ``shortest_max`` is a lower bound of ``max_len``."""
    lp = P.ban_tokens_(lp, banned)
    if cfg.no_repeat_ngram > 0 and history is not None:
        lp = P.block_repeated_ngrams(lp, history, cfg.no_repeat_ngram)
    return P.enforce_length_(lp, t, eos, cfg.min_len, max_len, shortest_max)


def row_topk(x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(c, dim=1)`` of a wide (N, V) CPU array in two cheap passes (ties may come in another order).

    The c largest of a row lie in the c blocks of ``TOPK_BLOCK`` columns with the largest maxima,
    and a vectorised block maximum plus a top-c of c blocks is 2-5x faster on a CPU than
    ``topk`` (or ``argmax``, c = 1) over a row of 8000. Other devices use ``topk``.
    """
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


def _sync_every(device: torch.device) -> int:
    return SYNC_EVERY.get(device.type, DEFAULT_SYNC_EVERY)


# ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def generate(
    models: Sequence[Seq2Seq],
    src: torch.Tensor,
    src_len: torch.Tensor,
    cfg: DecodeConfig,
    bos: int,
    eos: int,
    *,
    attention: bool = False,
    sampling: SamplingOptions | None = None,
) -> list[list[Hypothesis]]:
    """Decode a batch; per sentence up to ``cfg.nbest`` hypotheses, best first.

    ``cfg.beam == 1`` is greedy search; ``sampling`` draws ``cfg.nbest`` random samples per
    sentence instead. ``attention=True`` fills ``Hypothesis.attn``.
    """
    check_config(cfg, sampling)
    ens = Ensemble(models)
    if sampling is not None or cfg.beam == 1:
        return _greedy(ens, src, src_len, cfg, bos, eos, attention, sampling)
    return _beam_search(ens, src, src_len, cfg, bos, eos, attention)


def _greedy(
    ens: Ensemble, src: torch.Tensor, src_len: torch.Tensor, cfg: DecodeConfig, bos: int, eos: int,
    attention: bool, sampling: SamplingOptions | None,
) -> list[list[Hypothesis]]:
    """Greedy search, or random sampling with ``cfg.nbest`` samples per sentence.

    Rows that reached EOS leave the batch at the next "all done?" check (every step on CPU), so
    the model only ever steps the rows still being decoded; ``live`` maps them to batch rows.
    """
    n_per = cfg.nbest if sampling is not None else 1
    if n_per > 1:
        src, src_len = src.repeat_interleave(n_per, 0), src_len.repeat_interleave(n_per, 0)
    n, device = src.size(0), src.device
    lp_fn = P.length_penalty_fn(cfg.length_penalty)
    max_len_all = max_lengths(src_len, cfg, ens.max_positions())
    steps = int(max_len_all.max()) + 1 if n else 0
    shortest_max = int(max_len_all.min()) if n else 0
    banned = sorted({bos, ens.models[0].pad_id} - {eos})
    src_mask = torch.arange(src.size(1), device=device).unsqueeze(0) < src_len.unsqueeze(1)
    keep_attn = attention or bool(cfg.beta)

    encs, states = ens.start(src, src_len)
    live = torch.arange(n, device=device)  # batch rows still decoded, in model-row order
    max_len = max_len_all
    prev = torch.full((n,), bos, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)  # per live row
    log_prob = torch.zeros(n, device=device)  # per batch row, from here on
    length = torch.zeros(n, dtype=torch.long, device=device)  # tokens incl. EOS
    tokens: list[torch.Tensor] = []  # (n,) per step, EOS once a row is finished
    attns: list[torch.Tensor] = []
    coverage = torch.zeros(src.shape, device=device) if cfg.beta else None
    sync = _sync_every(device)
    for t in range(steps):
        lp, states, attn = ens.step(prev, encs, states, need_attn=keep_attn)
        history = torch.stack(tokens, 1)[live] if tokens and cfg.no_repeat_ngram else None
        lp = _constrain(lp, t, cfg, max_len, banned, eos, history, shortest_max)
        if sampling is None:
            tok = row_topk(lp, 1)[1].squeeze(1)
        else:
            logits = P.filter_for_sampling(lp, sampling.temperature, sampling.topk, sampling.topp)
            tok = torch.multinomial(logits.softmax(-1), 1, generator=sampling.generator).squeeze(1)
        act = ~done
        log_prob.index_add_(0, live, torch.where(act, lp.gather(1, tok.unsqueeze(1)).squeeze(1), 0.0))
        length.index_add_(0, live, act.long())
        if coverage is not None and attn is not None:
            coverage.index_add_(0, live, attn * act.unsqueeze(1))
        tok = torch.where(act, tok, eos)
        tokens.append(_scatter_rows(tok, live, n, eos))
        if attention and attn is not None:
            attns.append(_scatter_rows(attn, live, n, 0.0))
        done = done | (tok == eos)
        prev = tok
        if (t + 1) % sync == 0:
            finished = done.cpu()
            if bool(finished.all()):
                break
            if bool(finished.any()):  # drop finished rows from the batch
                keep = (~finished).nonzero().squeeze(1).to(device)
                live, prev, done, max_len = live[keep], prev[keep], done[keep], max_len[keep]
                encs = [reorder_state(e, keep) for e in encs]
                states = [reorder_state(st, keep) for st in states]

    cov_term = None if coverage is None else P.coverage_penalty(coverage, src_mask, cfg.beta)
    score = P.final_score(log_prob, length, lp_fn, cfg.alpha, cov_term)
    tok_host = torch.stack(tokens, 1).cpu() if tokens else torch.zeros(n, 0, dtype=torch.long)
    attn_host = torch.stack(attns, 1).cpu() if attns else None
    score, log_prob, length, src_len_h = score.cpu(), log_prob.cpu(), length.cpu(), src_len.cpu()
    hyps = []
    for i in range(n):
        m = int(length[i])
        a = attn_host[i, :m, : int(src_len_h[i])].clone() if attn_host is not None else None
        hyps.append(Hypothesis(tok_host[i, : max(m - 1, 0)].tolist(), float(score[i]), float(log_prob[i]), a))
    out = [hyps[i * n_per : (i + 1) * n_per] for i in range(n // n_per)]
    return [sorted(h, key=lambda x: -x.score) for h in out]


def _scatter_rows(x: torch.Tensor, rows: torch.Tensor, n: int, fill: float | int) -> torch.Tensor:
    """Place the live rows ``x`` (len(rows), ...) at ``rows`` of a new (n, ...) tensor."""
    if rows.numel() == n:
        return x
    full = x.new_full((n, *x.shape[1:]), fill)
    full[rows] = x
    return full


def _write_back(full: list[torch.Tensor], live_part: tuple[torch.Tensor, ...], live: torch.Tensor) -> None:
    """Copy the live sentences' rows of the finished store into the whole batch's store."""
    for f, part in zip(full, live_part):
        f[live] = part


def _beam_search(
    ens: Ensemble, src: torch.Tensor, src_len: torch.Tensor, cfg: DecodeConfig, bos: int, eos: int,
    attention: bool,
) -> list[list[Hypothesis]]:
    """Batched beam search; finished sentences leave the batch at each "all done?" check.

    Tensors named ``*_all`` and the finished store are indexed by sentence; everything else
    only covers the sentences still searched (``live`` maps them back), so the model's work
    shrinks as sentences finish. Per-step histories are kept at full batch size for
    :func:`_collect`.
    """
    b, k, device = src.size(0), cfg.beam, src.device
    lp_fn = P.length_penalty_fn(cfg.length_penalty)
    max_len_all = max_lengths(src_len, cfg, ens.max_positions())
    steps = int(max_len_all.max()) + 1 if b else 0
    shortest_max = int(max_len_all.min()) if b else 0
    banned = sorted({bos, ens.models[0].pad_id} - {eos})
    src_mask_all = torch.arange(src.size(1), device=device).unsqueeze(0) < src_len.unsqueeze(1)  # (B, S)
    use_cov = bool(cfg.beta)
    keep_attn = attention or use_cov
    first = cfg.stopping == "first"
    beam_idx = torch.arange(k, device=device)

    encs, states = ens.start(src, src_len)  # the first step runs one row per sentence, then fans out
    live = torch.arange(b, device=device)  # sentences still searched
    max_len, src_mask = max_len_all.repeat_interleave(k), src_mask_all
    prev = torch.full((b,), bos, dtype=torch.long, device=device)
    scores = torch.full((b, k), P.NEG_INF, device=device)
    scores[:, 0] = 0.0  # all beams start identical: only the first one is live at step 0
    coverage = torch.zeros(b * k, src.size(1), device=device) if use_cov else None
    history = torch.zeros(b * k, 0, dtype=torch.long, device=device)  # only kept for n-gram blocking
    # finished store, best first: final score, log-prob, tokens before EOS, parent beam at EOS
    fin_score = torch.full((b, k), P.NEG_INF, device=device)
    fin_logp = torch.full((b, k), P.NEG_INF, device=device)
    fin_len = torch.zeros(b, k, dtype=torch.long, device=device)
    fin_parent = torch.zeros(b, k, dtype=torch.long, device=device)
    fin_all = [t.clone() for t in (fin_score, fin_logp, fin_len, fin_parent)]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    tok_hist: list[torch.Tensor] = []  # (B, k) token of each live beam after step t
    parent_hist: list[torch.Tensor] = []  # (B, k) its beam at step t-1
    attn_hist: list[torch.Tensor] = []  # (B, k, S) attention of the rows fed at step t
    sync = _sync_every(device)

    for t in range(steps):
        bl = live.numel()
        n = bl * k
        lp, states, attn = ens.step(prev, encs, states, need_attn=keep_attn)
        every = k if t == 0 else 1  # step 0 ran one row per sentence: all k beams start identical
        lp = _constrain(lp, t, cfg, max_len[::every], banned, eos, history[::every] if cfg.no_repeat_ngram else None,
                        shortest_max)
        # 1. score update: a row's best 2k tokens are all that its sentence's top 2k can use; they
        #    extend the row's cumulative log-prob
        c = min(2 * k, lp.size(1))
        row_top, row_tok = row_topk(lp, c)  # (rows, c)
        if t == 0:
            row_top, row_tok = row_top.repeat_interleave(k, 0), row_tok.repeat_interleave(k, 0)
            attn = None if attn is None else attn.repeat_interleave(k, 0)
            encs, states = ens.fan_out(encs, states, k)
        if attention and attn is not None:
            attn_hist.append(_scatter_rows(attn.view(bl, k, -1), live, b, 0.0))
        cand = (row_top + scores.view(n, 1)).view(bl, k * c)
        # 2. candidates: top 2k extensions per sentence
        top_scores, top_idx = cand.topk(min(2 * k, k * c), dim=1)
        parent, tok = top_idx // c, row_tok.view(bl, k * c).gather(1, top_idx)  # (bl, 2k)
        is_eos = tok == eos
        # 3. finish: EOS extensions ranked within the top k join the store (not for done sentences)
        rank_ok = torch.arange(top_idx.size(1), device=device).unsqueeze(0) < k
        new_fin = is_eos & rank_ok & torch.isfinite(top_scores) & ~done.unsqueeze(1)
        cov_term = None
        if use_cov and attn is not None:
            cov_rows = (coverage + attn).view(bl, k, -1)
            cand_cov = cov_rows.gather(1, parent.unsqueeze(2).expand(-1, -1, cov_rows.size(2)))
            cov_term = P.coverage_penalty(cand_cov, src_mask.unsqueeze(1), cfg.beta)
        length = torch.full_like(top_scores, t + 1)
        cand_final = P.final_score(top_scores, length, lp_fn, cfg.alpha, cov_term).masked_fill(~new_fin, P.NEG_INF)
        fin_score, keep = torch.cat([fin_score, cand_final], 1).topk(k, dim=1)
        fin_logp = torch.cat([fin_logp, top_scores], 1).gather(1, keep)
        fin_len = torch.cat([fin_len, torch.full_like(parent, t)], 1).gather(1, keep)
        fin_parent = torch.cat([fin_parent, parent], 1).gather(1, keep)
        # 4. reorder: the best k non-EOS extensions are the next beam
        scores, pick = top_scores.masked_fill(is_eos, P.NEG_INF).topk(k, dim=1)
        beam_parent, prev = parent.gather(1, pick), tok.gather(1, pick)  # (bl, k)
        tok_hist.append(_scatter_rows(prev, live, b, eos))
        parent_hist.append(_scatter_rows(beam_parent, live, b, 0))
        # a sentence is done once k hypotheses are finished (or, stopping "first", once its best
        # extension ended with nbest finished), or when no live beam is left
        finished_now = torch.isfinite(fin_score[:, -1]) | ~torch.isfinite(scores).any(1)
        if first:
            finished_now |= new_fin[:, 0] & torch.isfinite(fin_score[:, min(cfg.nbest, k) - 1])
        done = done | finished_now
        rows = beam_parent + (torch.arange(bl, device=device) * k).unsqueeze(1)  # (bl, k) model rows
        if coverage is not None and attn is not None:
            coverage = coverage + attn
        if (t + 1) % sync == 0:
            finished = done.cpu()
            if bool(finished.all()):
                break
            if bool(finished.any()):  # drop finished sentences: keep their store, shrink the batch
                _write_back(fin_all, (fin_score, fin_logp, fin_len, fin_parent), live)
                keep_s = (~finished).nonzero().squeeze(1).to(device)
                live, done, scores, prev = live[keep_s], done[keep_s], scores[keep_s], prev[keep_s]
                fin_score, fin_logp, fin_len, fin_parent = (x[keep_s] for x in (fin_score, fin_logp, fin_len, fin_parent))
                src_mask = src_mask[keep_s]
                rows = rows[keep_s]
                keep_rows = (keep_s.unsqueeze(1) * k + beam_idx).view(-1)
                max_len = max_len[keep_rows]
                encs = ens.keep_sentences(encs, keep_s, keep_rows)
        rows = rows.reshape(-1)
        prev = prev.reshape(-1)
        states = [reorder_state(st, rows) for st in states]
        if coverage is not None and attn is not None:
            coverage = coverage.index_select(0, rows)
        if cfg.no_repeat_ngram:
            history = torch.cat([history.index_select(0, rows), prev.unsqueeze(1)], 1)

    _write_back(fin_all, (fin_score, fin_logp, fin_len, fin_parent), live)
    return _collect(cfg, *fin_all, tok_hist, parent_hist, attn_hist if attention else [], src_len, eos)


def _collect(
    cfg: DecodeConfig, fin_score: torch.Tensor, fin_logp: torch.Tensor, fin_len: torch.Tensor,
    fin_parent: torch.Tensor, tok_hist: list[torch.Tensor], parent_hist: list[torch.Tensor],
    attn_hist: list[torch.Tensor], src_len: torch.Tensor, pad: int,
) -> list[list[Hypothesis]]:
    """Follow backpointers from each finished hypothesis to its tokens (and attention)."""
    b, k = fin_score.shape
    steps = len(tok_hist)
    tokens = torch.full((b, k, max(steps, 1)), pad, dtype=torch.long, device=fin_score.device)
    attn = None
    if attn_hist:
        attn = torch.zeros(b, k, steps, attn_hist[0].size(2), device=fin_score.device)
    beam = fin_parent  # the beam fed at step fin_len (the EOS step)
    for s in range(steps - 1, -1, -1):
        if attn is not None and s < len(attn_hist):
            at_s = s <= fin_len
            row = attn_hist[s].gather(1, beam.unsqueeze(2).expand(-1, -1, attn.size(3)))
            attn[:, :, s] = torch.where(at_s.unsqueeze(2), row, 0.0)
        if s == 0:
            break
        active = (s - 1) < fin_len  # position s-1 holds a real token
        tokens[:, :, s - 1] = torch.where(active, tok_hist[s - 1].gather(1, beam), pad)
        beam = torch.where(active, parent_hist[s - 1].gather(1, beam), beam)

    fin_score, fin_logp, fin_len = fin_score.cpu(), fin_logp.cpu(), fin_len.cpu()
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
            hyps.append(Hypothesis([], P.NEG_INF, P.NEG_INF, None))
        out.append(hyps)
    return out

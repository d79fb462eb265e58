"""Greedy search, random sampling and the entry point to every search mode, for every model family:
:func:`generate` runs beam search (:mod:`mtkit.decoding.beam`), greedy search (``beam`` 1) or random
sampling, which share the set-up and "all done?" check of :mod:`mtkit.decoding.search_base`.

Scores: ``Hypothesis.log_prob`` is the sum of the token log-probs (EOS included) under the model -- for
an ensemble, the log of the mean of the models' probabilities -- exactly what teacher forcing gives;
``Hypothesis.score`` adds the penalties of :mod:`mtkit.decoding.penalties`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mtkit.config import DecodeConfig
from mtkit.decoding import penalties
from mtkit.decoding.beam import beam_search
from mtkit.decoding.search_base import (
    DoneCheck,
    Ensemble,
    Hypothesis,
    SearchSetup,
    row_topk,
    scatter_rows,
    set_up,
)
from mtkit.errors import MtkitError
from mtkit.models.base import Seq2Seq, reorder_state


@dataclass
class SamplingOptions:
    """Random sampling for back-translation (``beam`` ignored, ``nbest`` samples each); checked when made."""

    temperature: float = 1.0
    topk: int = 0  # 0 = whole vocabulary
    topp: float = 1.0  # nucleus mass, 1.0 = off
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0 or not math.isfinite(self.temperature):
            raise MtkitError(f"sampling temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.topp <= 1.0:
            raise MtkitError(f"top-p must be in (0, 1], got {self.topp}")
        if self.topk < 0:
            raise MtkitError(f"top-k must be >= 0, got {self.topk}")


@torch.inference_mode()
def generate(
    models: Sequence[Seq2Seq], src: torch.Tensor, src_len: torch.Tensor, cfg: DecodeConfig, bos: int, eos: int,
    *, attention: bool = False, sampling: SamplingOptions | None = None,
) -> list[list[Hypothesis]]:
    """Decode a batch; per sentence up to ``cfg.nbest`` hypotheses, best first.
    ``cfg.beam == 1`` is greedy search; ``sampling`` draws ``cfg.nbest`` random samples per
    sentence instead. ``attention=True`` fills ``Hypothesis.attn``. ``cfg`` must have passed
    :meth:`~mtkit.config.DecodeConfig.check_for_search`."""
    ens = Ensemble(models)
    if sampling is not None or cfg.beam == 1:
        return greedy(ens, src, src_len, cfg, bos, eos, attention, sampling)
    return beam_search(ens, src, src_len, cfg, bos, eos, attention)


def pick_tokens(log_probs: torch.Tensor, sampling: SamplingOptions | None) -> torch.Tensor:
    """Each row's next token: its best one, or one drawn from its filtered distribution."""
    if sampling is None:
        return row_topk(log_probs, 1)[1].squeeze(1)
    logits = penalties.filter_for_sampling(log_probs, sampling.temperature, sampling.topk, sampling.topp)
    return torch.multinomial(logits.softmax(-1), 1, generator=sampling.generator).squeeze(1)


def greedy(
    ens: Ensemble, src: torch.Tensor, src_len: torch.Tensor, cfg: DecodeConfig, bos: int, eos: int,
    attention: bool, sampling: SamplingOptions | None,
) -> list[list[Hypothesis]]:
    """Greedy search, or random sampling with ``cfg.nbest`` samples per sentence. Rows that reached EOS
    leave the batch at the next "all done?" check; ``live`` maps the rows still decoded to batch rows."""
    samples = cfg.nbest if sampling is not None else 1
    if samples > 1:
        src, src_len = src.repeat_interleave(samples, 0), src_len.repeat_interleave(samples, 0)
    n, device = src.size(0), src.device
    setup = set_up(ens, src, src_len, cfg, bos, eos, attention)
    encs, states, max_len = setup.encs, setup.states, setup.max_len
    live = torch.arange(n, device=device)  # batch rows still decoded, in model-row order
    prev = torch.full((n,), bos, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)  # per live row
    log_prob = torch.zeros(n, device=device)  # per batch row, from here on
    length = torch.zeros(n, dtype=torch.long, device=device)  # tokens incl. EOS
    tokens: list[torch.Tensor] = []  # (n,) per step, EOS once a row is finished
    attns: list[torch.Tensor] = []
    coverage = torch.zeros(src.shape, device=device) if cfg.beta else None
    done_check = DoneCheck(device)
    for t in range(setup.steps):
        lp, states, attn = ens.step(prev, encs, states, need_attn=setup.keep_attn)
        history = torch.stack(tokens, 1)[live] if tokens and cfg.no_repeat_ngram else None
        lp = setup.constrain(lp, t, max_len, history)
        tok = pick_tokens(lp, sampling)
        active = ~done
        log_prob.index_add_(0, live, torch.where(active, lp.gather(1, tok.unsqueeze(1)).squeeze(1), 0.0))
        length.index_add_(0, live, active.long())
        if coverage is not None and attn is not None:
            coverage.index_add_(0, live, attn * active.unsqueeze(1))
        tok = torch.where(active, tok, eos)
        tokens.append(scatter_rows(tok, live, n, eos))
        if attention and attn is not None:
            attns.append(scatter_rows(attn, live, n, 0.0))
        done = done | (tok == eos)
        prev = tok
        stop, keep = done_check(done, t)
        if stop:
            break
        if keep is not None:  # drop finished rows from the batch
            live, prev, done, max_len = live[keep], prev[keep], done[keep], max_len[keep]
            encs = [reorder_state(e, keep) for e in encs]
            states = [reorder_state(st, keep) for st in states]
    return greedy_hypotheses(setup, src_len, log_prob, length, coverage, tokens, attns, samples)


def greedy_hypotheses(
    setup: SearchSetup, src_len: torch.Tensor, log_prob: torch.Tensor, length: torch.Tensor,
    coverage: torch.Tensor | None, tokens: list[torch.Tensor], attns: list[torch.Tensor], samples: int,
) -> list[list[Hypothesis]]:
    """Score each row's tokens with the penalties; ``samples`` rows per sentence, best first."""
    cfg, n = setup.cfg, src_len.size(0)
    cov_term = None if coverage is None else penalties.coverage_penalty(coverage, setup.src_mask, cfg.beta)
    score = penalties.final_score(log_prob, length, setup.length_penalty, cfg.alpha, cov_term)
    tok_host = torch.stack(tokens, 1).cpu() if tokens else torch.zeros(n, 0, dtype=torch.long)
    attn_host = torch.stack(attns, 1).cpu() if attns else None
    score, log_prob, length, src_len_h = score.cpu(), log_prob.cpu(), length.cpu(), src_len.cpu()
    hyps = []
    for i in range(n):
        m = int(length[i])
        a = attn_host[i, :m, : int(src_len_h[i])].clone() if attn_host is not None else None
        hyps.append(Hypothesis(tok_host[i, : max(m - 1, 0)].tolist(), float(score[i]), float(log_prob[i]), a))
    return [sorted(hyps[i : i + samples], key=lambda x: -x.score) for i in range(0, n, samples)]

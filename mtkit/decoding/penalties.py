"""Scoring penalties and log-prob constraints for search, each a small function. Final score of a
finished hypothesis ``Y`` (``|Y|`` counts its tokens including EOS)::

    score = log P(Y|X) / lp(|Y|) + beta * sum_i log(min(coverage_i, 1))

with ``lp`` one of :data:`LENGTH_PENALTIES` (none: 1, average: |Y|, gnmt: ((5+|Y|)/6)^alpha) and
``coverage_i`` the attention mass source position ``i`` received over all target steps (the GNMT
coverage penalty, Wu et al. 2016). Constraints (min/max length, banned tokens, no-repeat n-grams) set
log-probs to ``-inf`` and never renormalise, so a hypothesis' log-prob is always the model's own."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mtkit.errors import MtkitError

NEG_INF = float("-inf")
COVERAGE_FLOOR = 1e-6  # log(min(cov, 1)) of an unattended source position is log(1e-6), not -inf


def no_length_penalty(length: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.ones_like(length, dtype=torch.float32)


def average_length_penalty(length: torch.Tensor, alpha: float) -> torch.Tensor:
    return length.to(torch.float32).clamp(min=1.0)


def gnmt_length_penalty(length: torch.Tensor, alpha: float) -> torch.Tensor:
    return ((5.0 + length.to(torch.float32)) / 6.0) ** alpha


LENGTH_PENALTIES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "none": no_length_penalty,
    "average": average_length_penalty,
    "gnmt": gnmt_length_penalty,
}


def length_penalty_fn(name: str) -> Callable[[torch.Tensor, float], torch.Tensor]:
    if name not in LENGTH_PENALTIES:
        valid = ", ".join(LENGTH_PENALTIES)
        raise MtkitError(f"unknown length penalty '{name}' (decode.length_penalty); valid: {valid}")
    return LENGTH_PENALTIES[name]


def coverage_penalty(coverage: torch.Tensor, src_mask: torch.Tensor, beta: float) -> torch.Tensor:
    """GNMT coverage penalty: (..., S) accumulated attention -> (...) ``beta * sum log min(c, 1)``;
    ``src_mask`` (broadcastable to ``coverage``) is True on real source positions."""
    capped = coverage.clamp(min=COVERAGE_FLOOR, max=1.0).log()
    return beta * capped.masked_fill(~src_mask, 0.0).sum(-1)


def final_score(
    log_prob: torch.Tensor, length: torch.Tensor, lp_fn: Callable[[torch.Tensor, float], torch.Tensor],
    alpha: float, coverage_term: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score after penalties; ``length`` counts tokens including EOS."""
    score = log_prob / lp_fn(length, alpha)
    return score if coverage_term is None else score + coverage_term


def ban_tokens_(log_probs: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Never generate these ids (pad, bos); in place (search owns its (N, V) log-probs)."""
    if token_ids:
        log_probs.index_fill_(1, torch.tensor(token_ids, device=log_probs.device), NEG_INF)
    return log_probs


def enforce_length_(
    log_probs: torch.Tensor, step: int, eos: int, min_len: int, max_len: torch.Tensor, shortest_max: int = 0
) -> torch.Tensor:
    """Before ``min_len`` tokens EOS is banned; at ``max_len`` (per row) only EOS is allowed. In place.
    ``shortest_max``, a known lower bound of ``max_len``, skips the (N, V) pass while no row can be at it."""
    if step < min_len:  # ... unless the row is already at its maximum length
        log_probs[:, eos].masked_fill_(max_len > step, NEG_INF)
    if step >= shortest_max:
        eos_lp = log_probs[:, eos].clone()
        log_probs.masked_fill_((max_len <= step).unsqueeze(1), NEG_INF)  # (N, V)
        log_probs[:, eos] = eos_lp
    return log_probs


def block_repeated_ngrams(log_probs: torch.Tensor, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Ban any token that would complete an n-gram already present in the row's ``tokens`` (N, t)."""
    t = tokens.size(1)
    if n <= 0 or t < n:
        return log_probs
    # windows (N, t-n+1, n): every n-gram so far; its first n-1 tokens against the current suffix
    grams = tokens.unfold(1, n, 1)
    suffix = tokens[:, t - n + 1 :].unsqueeze(1)  # (N, 1, n-1)
    match = (grams[:, :, : n - 1] == suffix).all(-1) if n > 1 else torch.ones_like(grams[:, :, 0], dtype=torch.bool)
    banned = torch.zeros_like(log_probs)
    banned.scatter_add_(1, grams[:, :, n - 1], match.to(log_probs.dtype))
    return log_probs.masked_fill(banned > 0, NEG_INF)


def filter_for_sampling(log_probs: torch.Tensor, temperature: float, topk: int, topp: float) -> torch.Tensor:
    """Logits to sample from: temperature scaling, then top-k, then nucleus (top-p) filtering."""
    logits = log_probs / temperature
    if topk > 0 and topk < logits.size(-1):
        kth = logits.topk(topk, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if 0.0 < topp < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of strictly better tokens
        drop_sorted = before >= topp  # keep the smallest prefix whose mass reaches topp
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, NEG_INF)
    return logits

"""Attention for the recurrent translators: a score function plus an optional local window.

Scores, each a small class with the same constructor: :class:`AdditiveScore` (Bahdanau et al. 2015),
:class:`DotScore`, :class:`GeneralScore` and :class:`ConcatScore` (Luong et al. 2015). Windows (Luong et
al. 2015, section 3.2), added to the scores as a log-space bias: :class:`GlobalWindow` (every source
position), :class:`MonotonicWindow` (local-m) and :class:`PredictiveWindow` (local-p; S: the source length),
whose Gaussian ``exp(-(s - p_t)^2 / (2 sigma^2))`` multiplies the alignment inside the softmax, so the
weights are renormalised and still sum to 1 (the paper multiplies after the softmax).

Padding is masked in every variant: weights are exactly zero on padding and sum to 1 per row. The projected
memory (``keys``) depends only on the source, so :meth:`Attention.precompute` computes it once per sentence,
kept in the encoder output. A decoder whose queries do not depend on earlier contexts attends over the whole
target in one batched score: (B, T, Hq) queries; scores and window biases are always (B, T, S).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mtkit.errors import MtkitError
from mtkit.kernels.linear import Linear


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis of (..., S) scores where ``mask`` (broadcast to them) is True."""
    return torch.softmax(scores.float().masked_fill(~mask, float("-inf")), dim=-1)


# --- scores: precompute(memory) -> keys; forward(query (B, T, Hq), keys (B, S, K)) -> (B, T, S)
class AdditiveScore(nn.Module):
    """Bahdanau's MLP score ``v^T tanh(W q + U h_s)`` with an ``attn_dim``-unit hidden layer."""

    def __init__(self, query_dim: int, memory_dim: int, attn_dim: int):
        super().__init__()
        self.key_proj = Linear(memory_dim, attn_dim, bias=False)  # U
        self.query_proj = Linear(query_dim, attn_dim)  # W (+ bias)
        self.v = Linear(attn_dim, 1, bias=False)

    def precompute(self, memory: torch.Tensor) -> torch.Tensor:
        return self.key_proj(memory)  # (B, S, A)

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(keys.unsqueeze(1) + self.query_proj(query).unsqueeze(2))  # (B, T, S, A)
        return self.v(hidden).squeeze(-1)  # (B, T, S)


class ConcatScore(AdditiveScore):
    """Luong's ``concat``: ``v^T tanh(W_a [q; h_s])``, i.e. the additive score with W_a split in two."""


class DotScore(nn.Module):
    """Luong's ``dot``: ``q^T h_s`` (query and memory must have the same size)."""

    def __init__(self, query_dim: int, memory_dim: int, attn_dim: int):
        super().__init__()
        if query_dim != memory_dim:
            raise MtkitError(
                f"dot attention needs the decoder hidden size ({query_dim}) to equal the encoder "
                f"output size ({memory_dim}); use model.attention=general or a unidirectional encoder"
            )

    def precompute(self, memory: torch.Tensor) -> torch.Tensor:
        return memory

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return torch.bmm(query, keys.transpose(1, 2))  # (B, T, H) @ (B, H, S) -> (B, T, S)


class GeneralScore(DotScore):
    """Luong's ``general``: ``q^T W_a h_s``; ``W_a h_s`` is precomputed once per sentence."""

    def __init__(self, query_dim: int, memory_dim: int, attn_dim: int):
        nn.Module.__init__(self)
        self.key_proj = Linear(memory_dim, query_dim, bias=False)  # W_a

    def precompute(self, memory: torch.Tensor) -> torch.Tensor:
        return self.key_proj(memory)  # (B, S, Hq)


# --- windows: forward(query (B, T, Hq), src_len, t (B, T), width) -> (B, T, S) bias or None --
class GlobalWindow(nn.Module):
    def __init__(self, size: int, query_dim: int):
        super().__init__()

    def forward(self, query: torch.Tensor, src_len: torch.Tensor, t: torch.Tensor | None, width: int) -> None:
        return None


class MonotonicWindow(nn.Module):
    """local-m: attend to ``[p_t - D, p_t + D]`` with ``p_t = t`` clamped to the last source token."""

    def __init__(self, size: int, query_dim: int):
        super().__init__()
        if size < 1:
            raise MtkitError(f"config key 'model.window_size' must be >= 1 for local attention, got {size}")
        self.size = size

    def center(self, query: torch.Tensor, src_len: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """p_t, shaped like ``t``: (B,) or (B, T)."""
        lens = src_len.view(-1, *[1] * (t.dim() - 1))
        return torch.minimum(t, lens - 1).to(query.dtype)

    def forward(self, query: torch.Tensor, src_len: torch.Tensor, t: torch.Tensor, width: int) -> torch.Tensor:
        p = self.center(query, src_len, t).unsqueeze(-1)  # (B, T, 1)
        pos = torch.arange(width, device=query.device, dtype=query.dtype)  # (S,)
        inside = (pos - p).abs() <= self.size
        return torch.where(inside, self.inside_bias(pos, p), torch.full_like(pos - p, float("-inf")))

    def inside_bias(self, pos: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(pos - p)


class PredictiveWindow(MonotonicWindow):
    """local-p: ``p_t = S * sigmoid(v_p^T tanh(W_p q))`` and a Gaussian of ``sigma = D/2`` around it."""

    def __init__(self, size: int, query_dim: int):
        super().__init__(size, query_dim)
        self.proj = Linear(query_dim, query_dim, bias=False)  # W_p
        self.v = Linear(query_dim, 1, bias=False)  # v_p
        self.sigma = size / 2.0

    def center(self, query: torch.Tensor, src_len: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.v(torch.tanh(self.proj(query)))).squeeze(-1)  # (B,) or (B, T)
        return src_len.view(-1, *[1] * (gate.dim() - 1)).to(query.dtype) * gate

    def inside_bias(self, pos: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return -((pos - p) ** 2) / (2 * self.sigma**2)


SCORES: dict[str, type[nn.Module]] = {
    "bahdanau": AdditiveScore, "dot": DotScore, "general": GeneralScore, "concat": ConcatScore,
}
WINDOWS: dict[str, type[nn.Module]] = {
    "global": GlobalWindow, "local-m": MonotonicWindow, "local-p": PredictiveWindow,
}


class AttentionLoop:
    """The memory gradients of a decoder loop that attends one step at a time, in two batched products.

    Autograd would give each step's context ``w_t . memory`` (and dot-product score ``keys . q_t``) a
    (B, S, Hm) outer-product gradient and sum them, step after step. Here a step's backward keeps only
    ``dL/dcontext_t`` (``dL/dscore_t``), and the node through which :meth:`wrap` passes the encoder
    tensors, which autograd reaches after every step that uses them, adds ``sum_t w_t dC_t``
    (``sum_t dS_t q_t``) as one batched product each: the same gradients up to rounding. It applies
    where gradients are enabled, to float32 tensors outside autocast; elsewhere nothing changes."""

    def __init__(self) -> None:
        self.steps: dict[str, list[list[torch.Tensor | None]]] = {"keys": [], "memory": []}
        self.wrapped = False  # steps defer only once the encoder tensors pass through the node

    @staticmethod
    def applies(query: torch.Tensor, memory: torch.Tensor) -> bool:
        return (torch.is_grad_enabled() and query.dtype == memory.dtype == torch.float32
                and not torch.is_autocast_enabled(query.device.type))

    def wrap(self, enc: dict) -> dict:
        """``enc`` with "keys" and "memory" passed through the node that adds the steps' gradients."""
        if not self.applies(enc["memory"], enc["memory"]):
            return enc
        keys, memory = _LoopStart.apply(enc["keys"], enc["memory"], self)
        self.wrapped = True
        return {**enc, "keys": keys, "memory": memory}

    def add_step(self, kind: str, left: torch.Tensor | None, right: torch.Tensor | None) -> list:
        """A step's factors (B, S) and (B, H) of its ``kind`` gradient ``left^T right``; the one that
        backward gives is None until then (the returned slot is where it goes)."""
        slot = [left, right]
        self.steps[kind].append(slot)
        return slot

    def total(self, kind: str) -> torch.Tensor | None:
        """sum_t left_t^T right_t -> (B, S, H) over the steps backward reached; None if none did."""
        pairs = [(left, right) for left, right in self.steps[kind] if left is not None and right is not None]
        if not pairs:
            return None
        return torch.bmm(torch.stack([left for left, _ in pairs], 2), torch.stack([right for _, right in pairs], 1))


class _LoopStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, keys: torch.Tensor, memory: torch.Tensor, loop: AttentionLoop):
        ctx.loop = loop
        return keys.view_as(keys), memory.view_as(memory)

    @staticmethod
    def backward(ctx: Any, grad_keys: torch.Tensor, grad_memory: torch.Tensor):
        extra_keys, extra_memory = ctx.loop.total("keys"), ctx.loop.total("memory")
        if extra_keys is not None:
            grad_keys = grad_keys + extra_keys
        if extra_memory is not None:
            grad_memory = grad_memory + extra_memory
        return grad_keys, grad_memory, None


class _LoopScore(torch.autograd.Function):
    """Dot-product scores ``keys . q`` (B, S) of one step; the keys' gradient is left to the loop."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, keys: torch.Tensor, loop: AttentionLoop):
        ctx.slot = loop.add_step("keys", None, query.detach())
        ctx.save_for_backward(keys)
        return torch.bmm(query.unsqueeze(1), keys.transpose(1, 2)).squeeze(1)  # a row times a matrix: fast

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        (keys,) = ctx.saved_tensors
        ctx.slot[0] = grad
        return torch.bmm(grad.unsqueeze(1), keys).squeeze(1), None, None


class _LoopContext(torch.autograd.Function):
    """The context ``w . memory`` (B, Hm) of one step; the memory's gradient is left to the loop."""

    @staticmethod
    def forward(ctx: Any, weights: torch.Tensor, memory: torch.Tensor, loop: AttentionLoop):
        ctx.slot = loop.add_step("memory", weights.detach(), None)
        ctx.save_for_backward(memory)
        return torch.bmm(weights.unsqueeze(1), memory).squeeze(1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        (memory,) = ctx.saved_tensors
        ctx.slot[1] = grad
        return torch.bmm(grad.unsqueeze(1), memory.transpose(1, 2)).squeeze(1), None, None


class Attention(nn.Module):
    """A score plus a window. ``forward`` returns (context (B, Hm), weights (B, S)) for a (B, Hq)
    query, or (context (B, T, Hm), weights (B, T, S)) for (B, T, Hq) queries."""

    def __init__(self, score: nn.Module, window: nn.Module):
        super().__init__()
        self.score, self.window = score, window

    def precompute(self, memory: torch.Tensor) -> torch.Tensor:
        return self.score.precompute(memory)

    def forward(
        self,
        query: torch.Tensor,  # (B, Hq), or (B, T, Hq)
        memory: torch.Tensor,  # (B, S, Hm)
        keys: torch.Tensor,  # (B, S, K) from precompute
        mask: torch.Tensor,  # (B, S) True on real tokens
        src_len: torch.Tensor,  # (B,)
        t: torch.Tensor | None = None,  # (B,) or (B, T) decoder positions (local-m needs them)
        loop: AttentionLoop | None = None,  # a training loop's one-step calls (see AttentionLoop)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        one_step = query.dim() == 2
        loop = loop if one_step and loop is not None and loop.wrapped and loop.applies(query, memory) else None
        if one_step:
            query = query.unsqueeze(1)  # (B, 1, Hq)
            t = None if t is None else t.unsqueeze(1)
        if loop is not None and isinstance(self.score, DotScore):
            scores = _LoopScore.apply(query.squeeze(1), keys, loop).unsqueeze(1)
        else:
            scores = self.score(query, keys)  # (B, T, S)
        bias = self.window(query, src_len, t, memory.size(1))
        if bias is not None:
            scores = scores + bias
        weights = masked_softmax(scores, mask.unsqueeze(1))  # (B, T, S), float32
        if loop is not None:
            return _LoopContext.apply(weights.squeeze(1), memory, loop), weights.squeeze(1)
        context = torch.bmm(weights.to(memory.dtype), memory)  # (B, T, Hm)
        if one_step:
            return context.squeeze(1), weights.squeeze(1)
        return context, weights


def build_attention(
    score: str, query_dim: int, memory_dim: int, attn_dim: int, window: str = "global", window_size: int = 10
) -> Attention:
    """Build from config names (``model.attention``, ``model.window``)."""
    for key, name, table in (("attention", score, SCORES), ("window", window, WINDOWS)):
        if name not in table:
            raise MtkitError(f"config key 'model.{key}': unknown value '{name}' (valid: {', '.join(table)})")
    return Attention(SCORES[score](query_dim, memory_dim, attn_dim), WINDOWS[window](window_size, query_dim))

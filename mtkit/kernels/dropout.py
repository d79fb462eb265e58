"""Dropout whose CPU mask costs a quarter of PyTorch's random draws.

On a CPU, ``F.dropout`` draws two 32-bit Mersenne-Twister numbers per element (a float64 Bernoulli
sample; the vectorised MKL path is taken on Intel CPUs only): after the matmuls, the largest cost of a
Transformer training step. Here each 32-bit draw gives two 15-bit uniform integers, and an element is
kept when its integer is at least ``round(p * 2**15)``: the drop probability is ``p`` rounded to a multiple
of 2**-15 (0.1 becomes 0.100006) and kept elements are scaled by the exact ``1 / (1 - p')``, so the
expectation is unchanged. The draws come from torch's generator, so ``torch.manual_seed`` and
checkpointed RNG states reproduce them. Other devices use ``F.dropout``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_LEVELS = 1 << 15


def _scaled_mask(like: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """A tensor shaped like ``like`` holding 0 with probability ~p, else 1 / (1 - p')."""
    n = like.numel()
    bits = torch.empty((n + 1) // 2, dtype=torch.int32, device=like.device).random_()  # 31 random bits each
    u = bits.view(torch.int16)[:n].bitwise_and_(_LEVELS - 1)  # two uniform 15-bit integers per draw
    drop = round(p * _LEVELS)
    scale = torch.tensor(_LEVELS / (_LEVELS - drop), dtype=dtype)
    return torch.where(u >= drop, scale, 0.0).view(like.shape)


def _cpu_mask_applies(x: torch.Tensor, p: float, training: bool) -> bool:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    return training and 0.0 < p < 1.0 and x.device.type == "cpu" and x.is_floating_point()


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``, with the cheaper mask on a CPU."""
    return x * _scaled_mask(x, p, x.dtype) if _cpu_mask_applies(x, p, training) else F.dropout(x, p, training)


def add_dropout(x: torch.Tensor, y: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``x + dropout(y, p, training)`` (a residual connection), one fused pass on a CPU."""
    if not _cpu_mask_applies(y, p, training) or x.shape != y.shape:
        return x + F.dropout(y, p, training)
    return torch.addcmul(x, y, _scaled_mask(y, p, torch.promote_types(x.dtype, y.dtype)))


class Dropout(torch.nn.Dropout):
    """``nn.Dropout`` (same arguments) computed by :func:`dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

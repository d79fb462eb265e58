"""Linear layers whose float32 CPU matmuls run through oneDNN.

PyTorch sends float32 ``F.linear`` / ``@`` on a CPU to its BLAS (MKL in the x86 wheels), while
bfloat16 goes to oneDNN. On some CPUs (e.g. AMD EPYC with AVX-512, where MKL takes a generic
code path) oneDNN's float32 GEMM is about twice as fast for the shapes of these models, forward
and backward, with the same float32 results up to rounding (relative differences ~1e-6). The
fast path covers float32 CPU tensors outside autocast; everything else (CUDA, bfloat16, autocast,
builds without oneDNN) uses ``F.linear`` unchanged. ``MTKIT_ONEDNN=0`` turns it off.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _available() -> bool:
    if os.environ.get("MTKIT_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    try:
        x = torch.ones(2, 3)
        return torch.equal(torch.ops.mkldnn._linear_pointwise(x, torch.ones(4, 3), None, "none", [], ""), x @ torch.ones(3, 4))
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _available()


def _nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T (+ bias) with oneDNN; a and b may be transposed views."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


def fast_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` goes to oneDNN: float32 CPU tensors, no autocast."""
    return (
        ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    )


def matmul_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b.T (+ bias)`` for 2-D a (M, K), b (N, K), without autograd (oneDNN when it applies)."""
    if fast_path(a, b):
        return _nt(a, b, bias)
    return F.linear(a, b, bias)


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _nt(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        gx = _nt(grad, weight.t()) if ctx.needs_input_grad[0] else None  # grad @ W
        gw = _nt(grad.t(), x.t()) if ctx.needs_input_grad[1] else None  # grad^T @ x
        gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with float32 CPU matmuls (forward and backward) through oneDNN."""
    if not fast_path(x, weight) or x.numel() == 0:
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.size(-1))
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        y = _OneDNNLinear.apply(flat, weight, bias)
    else:
        y = _nt(flat, weight, bias)
    return y.view(*x.shape[:-1], weight.size(0))


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

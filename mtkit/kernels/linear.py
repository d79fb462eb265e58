"""Linear layers whose float32 CPU matmuls run through oneDNN.

PyTorch sends float32 ``F.linear`` / ``@`` on a CPU to its BLAS (MKL in the x86 wheels), bfloat16 to
oneDNN. Which float32 GEMM is faster for these models' shapes depends on the CPU and the library builds
(on one AMD EPYC, oneDNN's was about 2x MKL's; on another, with torch 2.13, MKL's is faster for training's
products). Training's :func:`linear` uses oneDNN unless ``MTKIT_ONEDNN=0`` (torch's choice everywhere);
``MTKIT_ONEDNN=auto`` takes the faster of the two on this machine, timed once per process
(:func:`onednn_trains`), at the price of runs that may multiply differently from one process to the next
(rounding-level differences, which break bitwise-identical reruns and resumes). Both give the same float32
results up to rounding (relative differences ~1e-6).
CUDA, bfloat16, autocast and builds without oneDNN use ``F.linear`` unchanged. Under
``torch.inference_mode`` (decoding) a :class:`Linear` in eval mode multiplies float32 or bfloat16 inputs by
a copy of its weight prepacked into oneDNN's blocked layout, made once and redone only when the weight
changes: the same results up to rounding, without re-laying out the weight on every call, and faster than
either library's unpacked product (``benchmarks/decode_speed.py`` measures it).
"""

from __future__ import annotations

import math
import os
import time
import weakref
from collections.abc import Callable
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
PACK_ROWS = 128  # the row count oneDNN lays packed weights out for (any row count works)


def _nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, post_op: str = "none") -> torch.Tensor:
    """a (M, K) @ b (N, K)^T (+ bias, then ``post_op``) with oneDNN; a and b may be transposed
    views, b a prepacked weight."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, post_op, [], "")


def fast_path(x: torch.Tensor, weight: torch.Tensor,
              dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """Whether ``x @ weight.T`` goes to oneDNN (CPU tensors of one dtype among ``dtypes``, no autocast)."""
    return (ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in dtypes
            and not torch.is_autocast_enabled("cpu"))


def matmul_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b.T (+ bias)`` for 2-D a (M, K), b (N, K), without autograd (oneDNN when it applies)."""
    return _nt(a, b, bias) if fast_path(a, b) else F.linear(a, b, bias)


def grad_weight(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad^T @ x`` (the weight gradient of a linear layer) for 2-D grad (N, out), x (N, in). oneDNN reads
    its left operand row-major, so the smaller operand is laid out again: with out > in this is
    ``(x^T @ grad)^T``, returned as a transposed view."""
    if not fast_path(grad, x):
        return grad.t() @ x
    if grad.size(1) > x.size(1):
        return _nt(x.t().contiguous(), grad.t()).t()
    return _nt(grad.t().contiguous(), x.t())


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, post_op: str) -> torch.Tensor:
        y = _nt(x, weight, bias, post_op)
        ctx.save_for_backward(x, weight, y if post_op == "relu" else None)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, weight, relu_out = ctx.saved_tensors
        grad = grad.contiguous()
        if relu_out is not None:
            grad = torch.ops.aten.threshold_backward(grad, relu_out, 0)
        gx = _nt(grad, weight.t()) if ctx.needs_input_grad[0] else None  # grad @ W
        gw = grad_weight(grad, x) if ctx.needs_input_grad[1] else None
        gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


_TRAINS: list[bool] = []  # onednn_trains()'s answer, once known


def onednn_trains() -> bool:
    """Whether :func:`linear` multiplies float32 through oneDNN: yes by default, no with
    ``MTKIT_ONEDNN=0``; with ``MTKIT_ONEDNN=auto``, whether oneDNN is the faster here, timed on first use
    over a layer-sized product's forward, input-gradient and weight-gradient matmuls, alternating the two
    libraries (about 60 ms)."""
    if not _TRAINS:
        setting = os.environ.get("MTKIT_ONEDNN", "1")
        _TRAINS.append(ONEDNN and setting != "0" and (setting != "auto" or _onednn_is_faster()))
    return _TRAINS[0]


def _onednn_is_faster() -> bool:
    x, w, g = torch.randn(256, 512), torch.randn(1024, 512), torch.randn(256, 1024)
    runs = {True: lambda: (_nt(x, w), _nt(g, w.t()), grad_weight(g, x)), False: lambda: (x @ w.t(), g @ w, g.t() @ x)}
    best = {True: math.inf, False: math.inf}
    for _ in range(4):
        for onednn, run in runs.items():
            start = time.perf_counter()
            run()
            best[onednn] = min(best[onednn], time.perf_counter() - start)
    return best[True] < best[False]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, post_op: str = "none") -> torch.Tensor:
    """``F.linear`` (then ReLU with ``post_op="relu"``) with float32 CPU matmuls, forward and
    backward, through oneDNN (the ReLU fused into the matmul) where :func:`onednn_trains`."""
    if not fast_path(x, weight) or x.numel() == 0 or not onednn_trains():
        y = F.linear(x, weight, bias)
        return F.relu(y) if post_op == "relu" else y
    flat = x.reshape(-1, x.size(-1))
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        y = _OneDNNLinear.apply(flat, weight, bias, post_op)
    else:
        y = _nt(flat, weight, bias, post_op)
    return y.view(*x.shape[:-1], weight.size(0))


_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> {name: (weight key, packed or None)}


def release_packed(model: nn.Module) -> None:
    """Drop the prepacked weight copies of ``model``'s layers (training does after validation decoding)."""
    for module in model.modules():
        _PACKED.pop(module, None)


def packed_param(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module``'s weight ``name`` in oneDNN's layout, packed again only after the weight changed
    (None for a weight made under ``torch.inference_mode``: it has no version counter to tell)."""
    w = getattr(module, name)
    if w.is_inference():
        return None
    return cached_layout(module, name, (w.data_ptr(), w._version, w.shape), lambda: _reordered(w))


def cached_layout(module: nn.Module, name: str, key: tuple, make: Callable[[], Any]) -> Any:
    """``make()``, kept with ``module`` under ``name`` until ``key`` changes or :func:`release_packed`."""
    slots = _PACKED.setdefault(module, {})
    cached = slots.get(name)
    if cached is None or cached[0] != key:
        cached = slots[name] = (key, make())
    return cached[1]


def _reordered(weight: torch.Tensor) -> torch.Tensor | None:
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)
    except (AttributeError, RuntimeError):
        return None


def prepacked(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (N, K) laid out for many :func:`matmul_nt` calls with it: in oneDNN's layout where that
    applies (float32 on a CPU), else ``weight`` itself. Not differentiable."""
    packed = _reordered(weight) if fast_path(weight, weight) else None
    return weight if packed is None else packed


def _packed_linear(
    x: torch.Tensor, module: nn.Module, name: str, bias: torch.Tensor | None, post_op: str = "none"
) -> torch.Tensor | None:
    """``x @ module.<name>^T + bias`` (then ``post_op``) with the prepacked weight; None where that does not
    apply (see the module docstring)."""
    w = getattr(module, name)
    if (module.training or not torch.is_inference_mode_enabled() or x.numel() == 0
            or not fast_path(x, w, (torch.float32, torch.bfloat16))):
        return None
    packed = packed_param(module, name)
    if packed is None:
        return None
    return _nt(x.reshape(-1, x.size(-1)), packed, bias, post_op).view(*x.shape[:-1], w.size(0))


def step_linear(x: torch.Tensor, module: nn.Module, name: str, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ module.<name>^T + bias`` for one recurrent step (a few rows): with the prepacked weight
    where it applies (as :class:`Linear` does); otherwise ``F.linear``, whose BLAS beats oneDNN's
    unpacked GEMM, forward and backward, at tens of rows."""
    y = _packed_linear(x, module, name, bias)
    return F.linear(x, getattr(module, name), bias) if y is None else y


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) computed by :func:`linear` or with a prepacked
    weight (see the module docstring); ``post_op="relu"`` fuses a ReLU into the matmul."""

    def packed_weight(self) -> torch.Tensor | None:
        """The weight in oneDNN's layout (see :func:`packed_param`)."""
        return packed_param(self, "weight")

    def forward(self, x: torch.Tensor, post_op: str = "none") -> torch.Tensor:
        y = _packed_linear(x, self, "weight", self.bias, post_op)
        return linear(x, self.weight, self.bias, post_op) if y is None else y

    def relu(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(self(x))``, in one oneDNN call on the prepacked path."""
        return self(x, "relu")

    def activated(self, x: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``activation(self(x))``; a ReLU is fused into the matmul (:meth:`relu`)."""
        return self.relu(x) if activation is F.relu else activation(self(x))

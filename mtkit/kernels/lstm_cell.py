"""The LSTM cell's elementwise part on a CPU, with a hand-written backward.

From the gate pre-activations ``gx + gh`` (B, 4H; torch's gate order i, f, g, o) and ``c_{t-1}``:
``c_t = f c_{t-1} + i tanh(g)``, ``h_t = o tanh(c_t)``. A CPU tanh costs about three sigmoids, so
``tanh(x) = 2 sigmoid(2x) - 1`` and one sigmoid call covers the four gates. Autograd would record a node
per operation, each with its own temporaries; here the backward is one node whose gate derivatives take
one ``sigmoid_backward`` call (for the g gate, ``tanh'(x) = 4 s (1 - s)`` with ``s = sigmoid(2x)``).
The same values and gradients as the plain formulas up to rounding (about 1e-7).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable


def cell_forward_(gates: torch.Tensor, c_prev: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(h, c, the four gates' sigmoids, tanh(c)) from the pre-activations (..., 4H), turned into the
    sigmoids in place, and c_{t-1} (..., H)."""
    n = c_prev.size(-1)
    gates[..., 2 * n : 3 * n] *= 2.0
    i, f, g, o = gates.sigmoid_().chunk(4, -1)  # g holds sigmoid(2 a_g): tanh(a_g) = 2 g - 1
    c = torch.addcmul(f * c_prev - i, i, g, value=2.0)  # f c + i tanh(a_g)
    tanh_c = torch.sigmoid(2.0 * c).mul_(2.0).sub_(1.0)
    return o * tanh_c, c, gates, tanh_c


def cell_backward(
    grad_h: torch.Tensor, grad_c: torch.Tensor, s: torch.Tensor, c_prev: torch.Tensor, tanh_c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """From the gradients of h_t and c_t and what :func:`cell_forward_` gave: (the gradient of the gate
    pre-activations (..., 4H), the gradient of c_{t-1})."""
    i, f, g, o = s.chunk(4, -1)
    grad_c = torch.addcmul(grad_c, grad_h * o, 1.0 - tanh_c * tanh_c)  # through h = o tanh(c) too
    grad = torch.empty_like(s)
    gi, gf, gg, go = grad.chunk(4, -1)
    torch.mul(grad_c, g * 2.0 - 1.0, out=gi)
    torch.mul(grad_c, c_prev, out=gf)
    torch.mul(grad_c, i, out=gg).mul_(4.0)
    torch.mul(grad_h, tanh_c, out=go)
    return torch.ops.aten.sigmoid_backward(grad, s), grad_c * f


class _LSTMPointwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gx: torch.Tensor, gh: torch.Tensor, c_prev: torch.Tensor):
        h, c, s, tanh_c = cell_forward_(torch.add(gx, gh), c_prev)
        ctx.save_for_backward(s, c_prev, tanh_c)
        return h, c

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_h: torch.Tensor, grad_c: torch.Tensor):
        grad, grad_c_prev = cell_backward(grad_h, grad_c, *ctx.saved_tensors)
        return grad, grad, grad_c_prev


def lstm_pointwise(gx: torch.Tensor, gh: torch.Tensor, c_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h_t, c_t) from the input's and the recurrence's shares of the gates (B, 4H) and c_{t-1} (B, H)."""
    if torch.is_grad_enabled() and (gx.requires_grad or gh.requires_grad or c_prev.requires_grad):
        return _LSTMPointwise.apply(gx, gh, c_prev)
    return cell_forward_(torch.add(gx, gh), c_prev)[:2]

"""A whole LSTM layer over length-sorted, time-major sequences on a CPU, as one autograd node.

torch's LSTM over a packed sequence runs, on a CPU, one unfused cell per time step and direction: a
matmul and about ten elementwise operations, each recorded by autograd with its own backward node. Here
the input's share of the gates is one matmul over all positions (by the caller), and the recurrence of
every direction runs in one loop, forward and backward, without autograd: per step one batched matmul
(directions x active rows) and the cell's elementwise part (that of :mod:`mtkit.kernels.lstm_cell`). The
backward loop keeps only each step's gate gradients; the recurrent weights' gradient is then one batched
product over all steps.

Rows are sorted by length, longest first, so at step t the rows still running are the first
``batch_sizes[t]``; a finished row's state stays as its last step left it and its outputs are zero, as
with a packed sequence. A reverse direction reads its inputs reversed within each row's length (the
caller reverses them), so every direction runs over steps 0, 1, ... The values equal torch's LSTM up to
rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from mtkit.kernels.lstm_cell import cell_backward, cell_forward_


def _zero_past_ends(x: torch.Tensor, batch_sizes: list[int]) -> torch.Tensor:
    """``x`` (D, T, B, ...) with the rows that have ended by step t set to zero at t."""
    for t, n in enumerate(batch_sizes):
        if n < x.size(2):
            x[:, t, n:] = 0.0
    return x


def _run(gx: torch.Tensor, w_hh_t: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, batch_sizes: list[int],
         saved: list | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward loop: -> (outputs (D, T, B, H), h_T, c_T (D, B, H)); per step (gates, c, tanh c) into
    ``saved`` when given."""
    d, steps, b, _ = gx.shape
    out = _zero_past_ends(gx.new_empty(d, steps, b, h0.size(-1)), batch_sizes)
    h, c = h0.clone(), c0.clone()
    for t, n in enumerate(batch_sizes):
        gates = torch.baddbmm(gx[:, t, :n], h[:, :n], w_hh_t)  # (D, n, 4H)
        h_t, c_t, s, tanh_c = cell_forward_(gates, c[:, :n])
        out[:, t, :n] = h_t
        h[:, :n] = h_t
        c[:, :n] = c_t
        if saved is not None:
            saved.append((s, c_t, tanh_c))
    return out, h, c


class _LSTMLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gx: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                batch_sizes: list[int]):
        saved: list = []
        out, h, c = _run(gx, w_hh.transpose(1, 2), h0, c0, batch_sizes, saved)
        ctx.steps, ctx.batch_sizes = saved, batch_sizes
        ctx.save_for_backward(w_hh, h0, c0, out)
        return out, h, c

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor, grad_h: torch.Tensor, grad_c: torch.Tensor):
        w_hh, h0, c0, out = ctx.saved_tensors
        steps, batch_sizes = ctx.steps, ctx.batch_sizes
        d, t_max, b, n_h = out.shape
        grad_gx = _zero_past_ends(out.new_empty(d, t_max, b, 4 * n_h), batch_sizes)
        dh, dc = grad_h.clone(), grad_c.clone()
        for t in range(t_max - 1, -1, -1):
            n = batch_sizes[t]
            s, _, tanh_c = steps[t]
            c_prev = steps[t - 1][1][:, :n] if t else c0[:, :n]
            grad, dc[:, :n] = cell_backward(dh[:, :n] + grad_out[:, t, :n], dc[:, :n], s, c_prev, tanh_c)
            grad_gx[:, t, :n] = grad
            dh[:, :n] = torch.bmm(grad, w_hh)
        # h_{t-1} of the rows running at step t: the previous step's outputs (h0 at step 0)
        h_prev = torch.cat([h0.unsqueeze(1), out[:, :-1]], 1).view(d, t_max * b, n_h)
        grad_w = torch.bmm(grad_gx.view(d, t_max * b, 4 * n_h).transpose(1, 2), h_prev)
        return grad_gx, grad_w, dh, dc, None


def lstm_layer(gx: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
               batch_sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LSTM recurrences of D directions over length-sorted rows: ``gx`` (D, T, B, 4H) the input's share of
    the gates, both biases included (torch's gate order i, f, g, o); ``w_hh`` (D, 4H, H); ``h0``, ``c0``
    (D, B, H); ``batch_sizes[t]`` the rows still running at step t (non-increasing). -> (outputs (D, T, B, H),
    zero where a row has ended; h and c after each row's last step (D, B, H))."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (gx, w_hh, h0, c0)):
        return _LSTMLayer.apply(gx, w_hh, h0, c0, batch_sizes)
    return _run(gx, w_hh.transpose(1, 2), h0, c0, batch_sizes, None)

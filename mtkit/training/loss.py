"""Label-smoothed cross entropy over non-pad target tokens.

With smoothing ``eps`` and vocabulary size V the target puts ``1 - eps + eps/V`` on the reference
token and ``eps/V`` on every other, so per token (z: logits, lse: logsumexp z)

    loss = (1 - eps) * nll + (eps / V) * sum_v -log p(v) = lse - (1 - eps) * z_y - (eps / V) * sum_v z_v

summed over non-pad positions (as ``F.cross_entropy(..., label_smoothing=eps)``). Its gradient,
``softmax(z) - q`` with q the smoothed target, is known once the forward pass has z: :func:`projected_nll`
makes it there, chunk by chunk, with the output projection, and returns the plain nll for perplexity.
"""

from __future__ import annotations

from typing import Any

import torch

from mtkit.kernels.linear import grad_weight, matmul_nt


class _ProjectedNLL(torch.autograd.Function):
    """Output projection and label-smoothed loss in one pass over row chunks: each chunk's logits
    are made, turned into loss terms and into the gradient ``softmax(z) - q`` in place, and
    multiplied straight into the gradients of the hidden states and of the projection. No (N, V)
    tensor outlives its chunk; backward only scales the stored gradients by the incoming one."""

    @staticmethod
    def forward(ctx: Any, hidden, weight, bias, target, keep, eps: float, dtype: torch.dtype, chunk: int, need_grad: bool):
        N, V = hidden.size(0), weight.size(0)
        h, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        loss, nll = hidden.new_zeros((), dtype=torch.float32), hidden.new_zeros((), dtype=torch.float32)
        grad_h = torch.empty(N, hidden.size(1), dtype=torch.float32, device=hidden.device) if need_grad else None
        grad_w = torch.zeros(V, weight.size(1), dtype=torch.float32, device=weight.device) if need_grad else None
        grad_b = torch.zeros(V, dtype=torch.float32, device=weight.device) if need_grad and bias is not None else None
        for s in range(0, N, chunk):
            x, y, k = h[s : s + chunk], target[s : s + chunk], keep[s : s + chunk]
            logp = torch.log_softmax(matmul_nt(x, w, b).float(), -1)  # (n, V)
            lp_y, lp_sum = logp.gather(-1, y[:, None]).squeeze(-1), logp.sum(-1)
            nll -= (lp_y * k).sum()
            loss -= (((1.0 - eps) * lp_y + (eps / V) * lp_sum) * k).sum()
            if not need_grad:
                continue
            z = logp.exp_()  # softmax, then minus the smoothed target: the gradient of the loss
            if eps > 0.0:
                z.sub_(eps / V)
            z.scatter_add_(-1, y[:, None], z.new_full((z.size(0), 1), -(1.0 - eps)))
            z.mul_(k[:, None])
            g = z.to(dtype)
            grad_h[s : s + chunk] = matmul_nt(g, w.t())  # g @ w
            grad_w += grad_weight(g, x)  # g^T @ x
            if grad_b is not None:
                grad_b += z.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_nll: torch.Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if grad_h is None:
            raise RuntimeError("projected_nll was called without gradients enabled")
        h_dtype, w_dtype = ctx.dtypes
        grad_h, grad_w = (grad_h * grad_loss).to(h_dtype), (grad_w * grad_loss).to(w_dtype)
        grad_b = None if grad_b is None else (grad_b * grad_loss).to(w_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def projected_nll(
    hidden: torch.Tensor, layer: torch.nn.Linear, target: torch.Tensor, pad: int, eps: float,
    dtype: torch.dtype | None = None, chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(label-smoothed loss sum, nll sum, non-pad tokens) of ``layer(hidden)`` against ``target``.

    hidden (..., H): the model's features before its output projection ``layer`` (a Linear to V
    classes, bias or not). Matmuls run in ``dtype`` (default: the weight's, e.g. bfloat16 under
    autocast), softmax and sums in float32; ``chunk`` rows per pass (default: about 4M logits on a
    CPU, more on a GPU). The values and gradients of projecting, then taking the loss, in less time
    and without the (..., V) logits, a training step's largest tensors."""
    flat, target = hidden.reshape(-1, hidden.size(-1)), target.reshape(-1)
    keep = target != pad
    chunk = chunk or max(1, (2**22 if flat.device.type == "cpu" else 2**27) // layer.weight.size(0))
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or layer.weight.requires_grad)
    loss, nll = _ProjectedNLL.apply(
        flat, layer.weight, layer.bias, target, keep.float(), float(eps), dtype or layer.weight.dtype, chunk, need_grad
    )
    return loss, nll.detach(), int(keep.sum())

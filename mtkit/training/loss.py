"""Label-smoothed cross entropy over non-pad target tokens.

With smoothing ``eps`` and vocabulary size V, the target distribution puts ``1 - eps + eps/V``
on the reference token and ``eps/V`` on every other token, so per token

    loss = (1 - eps) * nll + (eps / V) * sum_v -log p(v)
         = lse - (1 - eps) * z_y - (eps / V) * sum_v z_v        (z: logits, lse: logsumexp z)

summed over non-pad positions (the same value as ``torch.nn.functional.cross_entropy(...,
label_smoothing=eps)``). The gradient is ``softmax(z) - q`` with q the smoothed target, so the
backward pass builds one (N, V) tensor and the forward none: on a CPU the loss over an 8k
vocabulary costs about as much as one extra matmul instead of several full log-softmax passes.
The plain negative log-likelihood is returned beside it for perplexity.
"""

from __future__ import annotations

from typing import Any

import torch


class _SmoothedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, eps: float):
        # logits (N, V) float32, target (N,), weight (N,) 1.0 for real tokens and 0.0 for pad
        V = logits.size(-1)
        lse = torch.logsumexp(logits, dim=-1)  # (N,)
        z_y = logits.gather(-1, target[:, None]).squeeze(-1)
        nll = ((lse - z_y) * weight).sum()
        loss = (1.0 - eps) * nll
        if eps > 0.0:
            loss = loss + (eps / V) * ((V * lse - logits.sum(-1)) * weight).sum()
        ctx.save_for_backward(logits, target, weight, lse)
        ctx.eps = eps
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_nll: torch.Tensor):
        logits, target, weight, lse = ctx.saved_tensors
        eps, V = ctx.eps, logits.size(-1)
        grad = torch.exp(logits - lse[:, None])  # softmax, the only (N, V) allocation
        if eps > 0.0:
            grad.sub_(eps / V)
        grad.scatter_add_(-1, target[:, None], grad.new_full((grad.size(0), 1), -(1.0 - eps)))
        grad.mul_((weight * grad_loss)[:, None])
        return grad, None, None, None


def label_smoothed_nll(
    logits: torch.Tensor, target: torch.Tensor, pad: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """logits (..., V), target (...) -> (smoothed loss sum, nll sum (detached), non-pad tokens).

    Both sums are float32 scalars over non-pad positions (logits in lower precision are upcast).
    """
    V = logits.size(-1)
    flat = logits.reshape(-1, V).float()
    target = target.reshape(-1)
    keep = target != pad
    loss, nll = _SmoothedNLL.apply(flat, target, keep.to(flat.dtype), float(eps))
    return loss, nll.detach(), int(keep.sum())

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

from mtkit.models.linear import matmul_nt


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


class _ProjectedNLL(torch.autograd.Function):
    """Output projection and label-smoothed loss in one pass over row chunks.

    The loss is a scalar, so its gradient with respect to the logits, ``softmax(z) - q`` per
    row, is known in the forward pass: each chunk's logits are made, turned into loss terms and
    into that gradient in place, and multiplied straight into the gradients of the hidden states
    and of the projection. No (N, V) tensor outlives its chunk; backward only scales the two
    stored gradients by the incoming one.
    """

    @staticmethod
    def forward(ctx: Any, hidden, weight, bias, target, keep, eps: float, dtype: torch.dtype, chunk: int, need_grad: bool):
        N, V = hidden.size(0), weight.size(0)
        h, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        loss = hidden.new_zeros((), dtype=torch.float32)
        nll = hidden.new_zeros((), dtype=torch.float32)
        grad_h = torch.empty(N, hidden.size(1), dtype=torch.float32, device=hidden.device) if need_grad else None
        grad_w = torch.zeros(V, weight.size(1), dtype=torch.float32, device=weight.device) if need_grad else None
        grad_b = torch.zeros(V, dtype=torch.float32, device=weight.device) if need_grad and bias is not None else None
        for s in range(0, N, chunk):
            x, y, k = h[s : s + chunk], target[s : s + chunk], keep[s : s + chunk]
            z = matmul_nt(x, w, b).float()  # (n, V) logits
            z.sub_(z.amax(-1, keepdim=True))  # shifted logits: lse below is log sum exp of these
            z_sum, z_y = z.sum(-1), z.gather(-1, y[:, None]).squeeze(-1)
            z.exp_()
            total = z.sum(-1)
            lse = total.log()
            nll += ((lse - z_y) * k).sum()
            loss += (((1.0 - eps) * (lse - z_y) + (eps / V) * (V * lse - z_sum)) * k).sum()
            if not need_grad:
                continue
            z.div_(total[:, None])  # softmax
            if eps > 0.0:
                z.sub_(eps / V)
            z.scatter_add_(-1, y[:, None], z.new_full((z.size(0), 1), -(1.0 - eps)))
            z.mul_(k[:, None])
            g = z.to(dtype)
            grad_h[s : s + chunk] = matmul_nt(g, w.t())  # g @ w
            grad_w += matmul_nt(g.t(), x.t())  # g^T @ x
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
    """``label_smoothed_nll(layer(hidden), target, pad, eps)`` without the (..., V) logits.

    hidden (..., H) are the model's features before its output projection ``layer`` (a Linear
    to V classes, with or without bias); the matmuls run in ``dtype`` (default: the weight's,
    e.g. bfloat16 for autocast training), the softmax and the sums in float32. The same values
    and gradients as the unfused pair, in less time and without the largest tensors of a
    training step. ``chunk``: rows per pass (default: about 4M logits on a CPU, more on a GPU).
    """
    H = hidden.size(-1)
    flat = hidden.reshape(-1, H)
    target = target.reshape(-1)
    keep = target != pad
    V = layer.weight.size(0)
    chunk = chunk or max(1, (2**22 if flat.device.type == "cpu" else 2**27) // V)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or layer.weight.requires_grad)
    loss, nll = _ProjectedNLL.apply(
        flat, layer.weight, layer.bias, target, keep.float(), float(eps), dtype or layer.weight.dtype, chunk, need_grad
    )
    return loss, nll.detach(), int(keep.sum())

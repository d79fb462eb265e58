"""One optimizer update: forward/backward over its batches (accumulated, each in runs of at most
``train.pass_tokens`` padded tokens), gradient norm and clipping, the finite check agreed over the
ranks, and the optimizer step; and its loss, label-smoothed cross entropy over non-pad target tokens.

With smoothing ``eps`` and vocabulary size V the target puts ``1 - eps + eps/V`` on the reference
token and ``eps/V`` on every other, so per token (z: logits, lse: logsumexp z)

    loss = (1 - eps) * nll + (eps / V) * sum_v -log p(v) = lse - (1 - eps) * z_y - (eps / V) * sum_v z_v

summed over non-pad positions (as ``F.cross_entropy(..., label_smoothing=eps)``). Its gradient,
``softmax(z) - q`` with q the smoothed target, is known once the forward pass has z: :func:`projected_nll`
makes it there, chunk by chunk, with the output projection, and returns the plain nll for perplexity.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch

from mtkit.config import TrainConfig
from mtkit.kernels.linear import grad_weight, matmul_nt, prepacked
from mtkit.training import builders
from mtkit.training.distributed import RankGroup
from mtkit.training.schedule import Scheduler


class _ProjectedNLL(torch.autograd.Function):
    """Output projection and label-smoothed loss in one pass over row chunks of non-pad rows: each
    chunk's logits are made, turned into loss terms and into the gradient ``softmax(z) - q`` in place,
    and multiplied straight into the gradients of the hidden states and of the projection. No (N, V)
    tensor outlives its chunk; backward only scales the stored gradients by the incoming one.

    What is the same for every vocabulary entry is taken out of the chunks: ``sum_v z_v`` is one
    matrix-vector product (``x . sum_v W_v + sum_v b_v``), and the ``eps / V`` share of ``q`` adds a
    rank-one term to each gradient after the loop. A chunk's softmax is made in place (max, exponential
    and its sum, one scaling), and the weight's gradient accumulates inside its product where the
    dtypes allow it."""

    @staticmethod
    def forward(ctx: Any, hidden, weight, bias, target, eps: float, dtype: torch.dtype, chunk: int, need_grad: bool):
        N, V = hidden.size(0), weight.size(0)
        h, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        w_packed = prepacked(w)  # laid out once for the chunks' forward products
        w_sum = w.float().sum(0)  # (H,)
        z_sum = h.float() @ w_sum + (0.0 if b is None else b.float().sum())  # (N,) sum_v z_v
        lse, lp_y = torch.empty(N, device=h.device), torch.empty(N, device=h.device)
        grad_h = torch.empty(N, hidden.size(1), dtype=torch.float32, device=hidden.device) if need_grad else None
        grad_w = torch.zeros(V, weight.size(1), dtype=torch.float32, device=weight.device) if need_grad else None
        grad_b = torch.zeros(V, dtype=torch.float32, device=weight.device) if need_grad and bias is not None else None
        for s in range(0, N, chunk):
            x, y = h[s : s + chunk], target[s : s + chunk, None]
            z = matmul_nt(x, w_packed, b).float()  # (n, V)
            z_y = z.gather(-1, y).squeeze(-1)
            z_max = z.amax(-1, keepdim=True)
            sum_exp = z.sub_(z_max).exp_().sum(-1, keepdim=True)  # z holds exp(z - max) from here
            lse[s : s + chunk] = (z_max + sum_exp.log()).squeeze(-1)
            lp_y[s : s + chunk] = z_y - lse[s : s + chunk]
            if not need_grad:
                continue
            g = z.mul_(sum_exp.reciprocal_()).scatter_add_(-1, y, z.new_full(y.shape, -(1.0 - eps)))  # p - (1-eps) 1_y
            if grad_b is not None:
                grad_b += g.sum(0)
            g = g.to(dtype)
            grad_h[s : s + chunk] = g @ w
            if g.dtype == grad_w.dtype:
                grad_w.addmm_(g.t(), x)  # += g^T @ x, accumulated by the product itself
            else:
                grad_w += grad_weight(g, x)
        # sum_v log p(v) = sum_v z_v - V * lse, in float64: V * lse is large next to the terms' spread
        lp_sum = z_sum.double() - V * lse.double()
        nll = -lp_y.double().sum()
        loss = ((1.0 - eps) * nll - (eps / V) * lp_sum.sum()).float()
        if need_grad and eps > 0.0:  # the eps / V share of q, the same in every column (rank one)
            grad_h -= (eps / V) * w_sum
            grad_w -= (eps / V) * h.float().sum(0)
            if grad_b is not None:
                grad_b -= eps / V * N
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        nll = nll.float()
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
        return grad_h, grad_w, grad_b, None, None, None, None, None


def projected_nll(
    hidden: torch.Tensor, layer: torch.nn.Linear, target: torch.Tensor, pad: int, eps: float,
    dtype: torch.dtype | None = None, chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(label-smoothed loss sum, nll sum, non-pad tokens) of ``layer(hidden)`` against ``target``.

    hidden (..., H): the model's features before its output projection ``layer`` (a Linear to V
    classes, bias or not). Pad positions are left out before projecting. Matmuls run in ``dtype``
    (default: the weight's, e.g. bfloat16 under autocast), softmax and sums in float32; ``chunk`` rows
    per pass (default: about 4M logits on a CPU, more on a GPU). The values and gradients of projecting,
    then taking the loss, in less time and without the (..., V) logits, a training step's largest tensors."""
    flat, target = hidden.reshape(-1, hidden.size(-1)), target.reshape(-1)
    keep = target != pad
    n = int(keep.sum())
    if n < target.numel():
        rows = keep.nonzero().squeeze(1)
        flat, target = flat.index_select(0, rows), target.index_select(0, rows)
    chunk = chunk or max(1, (2**22 if flat.device.type == "cpu" else 2**27) // layer.weight.size(0))
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or layer.weight.requires_grad)
    loss, nll = _ProjectedNLL.apply(
        flat, layer.weight, layer.bias, target, float(eps), dtype or layer.weight.dtype, chunk, need_grad
    )
    return loss, nll.detach(), n


def split_batch(dataset: Any, batch: np.ndarray, pass_tokens: int) -> list[np.ndarray]:
    """``batch`` cut into runs of its (length-sorted) sentences of at most ``pass_tokens`` padded tokens
    (0: the whole batch), passed one by one: the same update with a fraction of the activation memory."""
    if pass_tokens == 0 or len(batch) < 2:
        return [batch]
    width = int(max(dataset.src_lens[batch].max() + 1, dataset.tgt_lens[batch].max() + 1))
    n = min(len(batch), -(-len(batch) * width // pass_tokens))
    return np.array_split(batch, n)  # n <= len(batch): no empty run


class UpdateStep:
    """The optimizer update of a training run over its model, optimizer and mixed precision."""

    def __init__(
        self, model: torch.nn.Module, ddp: torch.nn.parallel.DistributedDataParallel | None,
        optimizer: torch.optim.Optimizer, scheduler: Scheduler, autocast_dtype: torch.dtype | None,
        collate: builders.Collator, train_cfg: TrainConfig, ranks: RankGroup,
    ):
        self.model, self.ddp, self.optimizer, self.scheduler = model, ddp, optimizer, scheduler
        self.step_model: torch.nn.Module = ddp if ddp is not None else model  # what the forward runs through
        self.autocast_dtype = autocast_dtype
        self.scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None  # fp16 only
        self.collate, self.train_cfg, self.ranks = collate, train_cfg, ranks

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the training dtype (nothing in float32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.ranks.device.type, dtype=self.autocast_dtype)

    def loss(self, hidden: torch.Tensor, tgt_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(label-smoothed loss sum, nll sum, target tokens) of the features, output projection fused in."""
        return projected_nll(hidden, self.model.output_projection(), tgt_out, self.collate.tgt_pad,
                             self.train_cfg.label_smoothing, self.autocast_dtype)

    def _backward_runs(self, dataset: Any, batches: list[np.ndarray], ntok: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over every run of ``batches``; returns the (loss, nll) sums."""
        loss_sum, nll_sum = torch.zeros((), device=self.ranks.device), torch.zeros((), device=self.ranks.device)
        runs = [run for b in batches for run in split_batch(dataset, b, self.train_cfg.pass_tokens)]
        for i, run in enumerate(runs):
            src, src_len, tgt_in, tgt_out = self.collate(dataset, run)
            # DDP all-reduces gradients on the update's last run only
            sync = self.ddp is None or i == len(runs) - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with self.autocast():
                    hidden = self.step_model(src, src_len, tgt_in, features_only=True)
                loss, nll, _ = self.loss(hidden, tgt_out)
                # token-level mean over the whole update; x world_size undoes DDP's average over ranks
                scaled = loss * self.ranks.world_size / ntok
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach()
            nll_sum += nll
        return loss_sum, nll_sum

    def gradients(self, dataset: Any, batches: list[np.ndarray], max_tgt: int) -> dict[str, Any]:
        """Zero the gradients, then accumulate the update's over ``batches``. Returns its loss and nll
        sums, target tokens, gradient norm (summed over the ranks) and ``finite`` (no rank saw NaN/inf)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        ntok = sum(int(np.minimum(dataset.tgt_lens[b] + 1, max_tgt).sum()) for b in batches)
        ntok = int(self.ranks.sum([ntok])[0])  # target tokens of the whole update, over all ranks
        loss_sum, nll_sum = self._backward_runs(dataset, batches, ntok)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        # the gradients' total norm, clipped to train.clip_norm when that is set
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.train_cfg.clip_norm > 0 or not hasattr(torch.nn.utils, "get_total_norm"):
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, self.train_cfg.clip_norm or float("inf")))
        else:  # measure only: the norm is logged so vanishing/exploding gradients show
            gnorm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        # one all-reduce on several ranks: the update's loss sums, and whether any rank saw NaN/inf
        local_bad = not math.isfinite(float(loss_sum)) or (not math.isfinite(gnorm) and self.scaler is None)
        loss_value, nll_value, bad = self.ranks.sum([float(loss_sum), float(nll_sum), float(local_bad)])
        finite = bad == 0 and math.isfinite(loss_value)
        return {"loss": loss_value, "nll": nll_value, "ntok": ntok, "gnorm": gnorm, "finite": finite}

    def apply(self, update: int, elapsed: float) -> float:
        """The optimizer step of update number ``update``, at the scheduled lr; returns the lr."""
        lr = self.scheduler.step(update, elapsed)
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips the step itself on fp16 overflow
            self.scaler.update()
        else:
            self.optimizer.step()
        return lr

    def discard(self) -> None:
        """Drop the accumulated gradients of a non-finite update."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.update()

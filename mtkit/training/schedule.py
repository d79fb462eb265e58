"""Learning-rate schedules as plain functions of the update number, plus a tiny stateful wrapper.

``inverse_sqrt`` (fairseq): linear warmup from ``warmup_init_lr`` to ``lr`` over ``warmup_updates``,
then ``lr * sqrt(warmup_updates / t)``; ``noam`` (Vaswani et al. 2017): ``factor * d_model^-0.5 *
min(t^-0.5, t * warmup^-1.5)``; ``constant``: ``lr`` after an optional linear warmup.
``train.time_decay`` multiplies any of them by a factor that reaches zero exactly when the time
budget ``max_time_minutes`` of elapsed training time is spent (ending on time on any machine):
``linear`` ``1 - f``, ``cosine`` ``(1 + cos(pi f)) / 2``, f the share used; ``none``: no change.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mtkit.config import TrainConfig, check_section


def inverse_sqrt(t: int, lr: float, warmup: int, init_lr: float = 0.0) -> float:
    if warmup > 0 and t < warmup:
        return constant(t, lr, warmup, init_lr)
    return lr * math.sqrt(max(warmup, 1) / max(t, 1))


def noam(t: int, d_model: int, warmup: int, factor: float = 2.0) -> float:
    t = max(t, 1)
    return factor * d_model**-0.5 * min(t**-0.5, t * max(warmup, 1) ** -1.5)


def constant(t: int, lr: float, warmup: int = 0, init_lr: float = 0.0) -> float:
    return init_lr + (lr - init_lr) * t / warmup if warmup > 0 and t < warmup else lr


def time_factor(kind: str, used: float) -> float:
    """The ``time_decay`` multiplier after ``used`` (0..1) of the time budget."""
    f = min(max(used, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - f
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * f))
    return 1.0


class Scheduler:
    """Sets the optimizer's lr for each update; its state is just the update number."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, d_model: int = 512):
        check_section(cfg, "train")  # the scheduler's choices and the time budget its decay needs
        self.optimizer, self.cfg, self.d_model = optimizer, cfg, d_model
        self.update = 0

    def lr_at(self, t: int) -> float:
        c = self.cfg
        if c.lr_scheduler == "inverse_sqrt":
            return inverse_sqrt(t, c.lr, c.warmup_updates, c.warmup_init_lr)
        if c.lr_scheduler == "noam":
            return noam(t, self.d_model, c.warmup_updates, c.noam_factor)
        return constant(t, c.lr, c.warmup_updates, c.warmup_init_lr)

    def step(self, update: int, elapsed: float = 0.0) -> float:
        """Set and return the lr of update ``update`` (1-based), ``elapsed`` training seconds in."""
        self.update = update
        lr = self.lr_at(update)
        if self.cfg.time_decay != "none":
            lr *= time_factor(self.cfg.time_decay, elapsed / (60.0 * self.cfg.max_time_minutes))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"update": self.update, "name": self.cfg.lr_scheduler}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.update = int(state["update"])

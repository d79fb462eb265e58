"""Learning-rate schedules as plain functions of the update number, plus a tiny stateful wrapper.

- ``inverse_sqrt`` (fairseq): linear warmup from ``warmup_init_lr`` to ``lr`` over
  ``warmup_updates``, then ``lr * sqrt(warmup_updates / t)``.
- ``noam`` (Vaswani et al. 2017): ``factor * d_model^-0.5 * min(t^-0.5, t * warmup^-1.5)``.
- ``constant``: ``lr`` after an optional linear warmup.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mtkit.config import TrainConfig
from mtkit.errors import MtkitError

SCHEDULES = ("inverse_sqrt", "noam", "constant")


def _warmup(t: int, warmup: int, init_lr: float, lr: float) -> float:
    return init_lr + (lr - init_lr) * t / warmup


def inverse_sqrt(t: int, lr: float, warmup: int, init_lr: float = 0.0) -> float:
    if warmup > 0 and t < warmup:
        return _warmup(t, warmup, init_lr, lr)
    return lr * math.sqrt(max(warmup, 1) / max(t, 1))


def noam(t: int, d_model: int, warmup: int, factor: float = 2.0) -> float:
    t = max(t, 1)
    return factor * d_model**-0.5 * min(t**-0.5, t * max(warmup, 1) ** -1.5)


def constant(t: int, lr: float, warmup: int = 0, init_lr: float = 0.0) -> float:
    if warmup > 0 and t < warmup:
        return _warmup(t, warmup, init_lr, lr)
    return lr


class Scheduler:
    """Sets the optimizer's lr for each update; its state is just the update number."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, d_model: int = 512):
        if cfg.lr_scheduler not in SCHEDULES:
            raise MtkitError(f"train.lr_scheduler '{cfg.lr_scheduler}' must be one of {', '.join(SCHEDULES)}")
        self.optimizer, self.cfg, self.d_model = optimizer, cfg, d_model
        self.update = 0

    def lr_at(self, t: int) -> float:
        c = self.cfg
        if c.lr_scheduler == "inverse_sqrt":
            return inverse_sqrt(t, c.lr, c.warmup_updates, c.warmup_init_lr)
        if c.lr_scheduler == "noam":
            return noam(t, self.d_model, c.warmup_updates, c.noam_factor)
        return constant(t, c.lr, c.warmup_updates, c.warmup_init_lr)

    def step(self, update: int) -> float:
        """Set the lr used by update number ``update`` (1-based); returns it."""
        self.update = update
        lr = self.lr_at(update)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"update": self.update, "name": self.cfg.lr_scheduler}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.update = int(state["update"])

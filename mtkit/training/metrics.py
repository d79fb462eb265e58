"""A training run's records: ``metrics.jsonl`` events (mirrored to TensorBoard when asked), the
window of training statistics between two log lines, the train log line and the progress bar."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtkit.errors import MtkitError
from mtkit.utils import atomic_write_text, progress_enabled

logger = logging.getLogger("mtkit.train")


def tensorboard_writer_class() -> type:
    """torch's TensorBoard ``SummaryWriter``; a one-line error when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MtkitError("train.tensorboard_dir is set but the tensorboard package is not installed "
                         "(pip install tensorboard)") from None
    return SummaryWriter


class MetricsLog:
    """``metrics.jsonl`` in the save dir, written by rank 0 only (``enabled``)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.tensorboard: Any = None  # a SummaryWriter while rank 0 trains with train.tensorboard_dir

    def write(self, record: dict[str, Any]) -> None:
        """One event of ``metrics.jsonl``; also a TensorBoard scalar per number (``train/loss``, ...)."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("kind", "update") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["update"])

    def truncate(self, update: int) -> None:
        """After a resume, drop events the interrupted run logged past ``update``."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a torn last line
                if json.loads(line).get("update", 0) <= update:
                    kept.append(line)
        atomic_write_text(self.path, "".join(x + "\n" for x in kept))

    def discard(self) -> None:
        """Delete the events of an earlier run that never saved a checkpoint."""
        if self.enabled and self.path.exists():
            self.path.unlink()


@dataclass
class TrainWindow:
    """Sums of the training statistics since the last train log line."""

    loss: float = 0.0
    nll: float = 0.0
    ntok: int = 0
    gnorm: float = 0.0
    updates: int = 0
    seconds: float = 0.0

    def add(self, stats: dict[str, float], seconds: float) -> None:
        """Add one update's statistics (``train_step``'s) and its duration."""
        self.loss += stats["loss"]
        self.nll += stats["nll"]
        self.ntok += stats["ntok"]
        self.gnorm += stats["gnorm"]
        self.updates += 1
        self.seconds += seconds

    def record(self, update: int, epoch: int, lr: float, elapsed: float) -> dict[str, Any]:
        """The ``train`` event of ``metrics.jsonl`` for this window."""
        ntok = max(self.ntok, 1)
        return {
            "kind": "train", "update": update, "epoch": epoch, "loss": self.loss / ntok,
            "ppl": math.exp(min(self.nll / ntok, 100.0)), "lr": lr, "gnorm": self.gnorm / max(self.updates, 1),
            "tgt_tokens_per_s": self.ntok / max(self.seconds, 1e-9), "elapsed": round(elapsed, 3),
        }


class UpdateProgress:
    """What a run shows of its updates: rank 0's progress bar where progress bars are on, and
    every ``log_interval`` updates a ``train`` event (with its log line when there is no bar)."""

    def __init__(self, metrics: MetricsLog, log_interval: int, max_updates: int, update: int, is_main: bool):
        self.metrics, self.log_interval = metrics, log_interval
        self.window = TrainWindow()
        self.bar: Any = None
        if progress_enabled() and is_main:
            from tqdm import tqdm

            self.bar = tqdm(total=max_updates or None, initial=update, unit="upd", dynamic_ncols=True, leave=False,
                            file=sys.stderr)

    def add(self, stats: dict[str, float], seconds: float, update: int, epoch: int, elapsed: float) -> None:
        """Count update number ``update`` (``train_step``'s ``stats``, taking ``seconds``)."""
        self.window.add(stats, seconds)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{stats['loss'] / stats['ntok']:.3f}", lr=f"{stats['lr']:.2e}")
        if update % self.log_interval != 0:
            return
        record = self.window.record(update, epoch, stats["lr"], elapsed)
        self.metrics.write(record)
        self.window = TrainWindow()
        if self.bar is None:  # the console/train.log line of the event
            logger.info(
                "train | update %d | epoch %d | loss %.4f | ppl %.2f | lr %.3e | gnorm %.3f | %.0f tgt tok/s",
                *(record[k] for k in ("update", "epoch", "loss", "ppl", "lr", "gnorm", "tgt_tokens_per_s")),
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

"""Validation during training: valid-set loss, perplexity and BLEU of its greedy or beam
translations, the early-stopping state tracking the best result, and the conditions ending a run."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mtkit.config import Config, DecodeConfig, TrainConfig
from mtkit.data.batching import fixed_batches, length_sorted_batches
from mtkit.data.subword import SubwordModel
from mtkit.errors import MtkitError
from mtkit.kernels.linear import release_packed
from mtkit.training.distributed import RankGroup
from mtkit.training.metrics import MetricsLog

logger = logging.getLogger("mtkit.train")

Collate = Callable[[Any, np.ndarray], tuple[torch.Tensor, ...]]
AutocastFactory = Callable[[], Any]
LossFunction = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, int]]


def bleu_batches(src_lens: np.ndarray, decode_cfg: DecodeConfig) -> list[np.ndarray]:
    """Length-sorted batches of the sentences: ``decode.batch_size`` sentences each, or (0) up to
    ``decode.max_tokens`` source tokens per beam hypothesis (the batcher translate uses)."""
    budget = max(decode_cfg.max_tokens // max(decode_cfg.beam, 1), 1)
    return length_sorted_batches(src_lens, decode_cfg.batch_size, budget)


@dataclass
class EarlyStopping:
    """The best validation result on the early-stopping metric and the validations since."""

    configured_metric: str  # train.early_stop_metric
    bleu_enabled: bool  # train.valid_bleu
    metric: str | None = None  # the metric in use, fixed at the first validation
    best: float | None = None
    stale: int = 0  # validations without improvement

    def _metric_value(self, metrics: dict[str, Any]) -> tuple[str, float]:
        """The metric in use and its value in ``metrics``; the first call fixes the metric: valid
        loss when BLEU is asked for but missing."""
        if self.metric is None:
            self.metric = self.configured_metric
            if self.metric == "bleu" and metrics.get("bleu") is None:
                log = logger.warning if self.bleu_enabled else logger.info
                log("no validation BLEU: early stopping and the best checkpoint use valid loss")
                self.metric = "loss"
        name = self.metric
        return name, metrics[name] if metrics.get(name) is not None else metrics["loss"]

    def is_better(self, metrics: dict[str, Any]) -> bool:
        """Whether ``metrics`` beat the best result so far (the first result always does)."""
        name, value = self._metric_value(metrics)
        return self.best is None or (value > self.best if name == "bleu" else value < self.best)

    def record(self, metrics: dict[str, Any]) -> bool:
        """Record ``metrics`` (the new best, or one more stale validation); whether it is the new best."""
        better = self.is_better(metrics)
        if better:
            self.best, self.stale = self._metric_value(metrics)[1], 0
        else:
            self.stale += 1
        return better

    def state_dict(self) -> dict[str, Any]:
        """The state a checkpoint's ``train_state`` keeps."""
        return {"best": self.best, "best_metric": self.metric, "stale": self.stale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back :meth:`state_dict`'s state (missing keys: a fresh state)."""
        self.best, self.metric, self.stale = state.get("best"), state.get("best_metric"), state.get("stale", 0)

    def exhausted(self, patience: int) -> bool:
        """Whether ``patience`` (> 0) validations in a row have not improved."""
        return bool(patience) and self.stale >= patience


class Validator:
    """A run's validation on the valid set: its metrics, log line, ``valid`` event and early stopping."""

    def __init__(
        self, model: torch.nn.Module, dataset: Any, tgt_spm: SubwordModel, cfg: Config, collate: Collate,
        autocast: AutocastFactory, loss: LossFunction, ranks: RankGroup, metrics_log: MetricsLog,
    ):
        self.model, self.dataset, self.tgt_spm, self.cfg = model, dataset, tgt_spm, cfg
        self.collate, self.autocast, self.loss, self.ranks = collate, autocast, loss, ranks
        self.metrics_log = metrics_log
        self.early_stopping = EarlyStopping(cfg.train.early_stop_metric, cfg.train.valid_bleu)

    @torch.no_grad()
    def metrics(self) -> dict[str, Any]:
        """Valid loss, nll, perplexity and (with ``train.valid_bleu``) BLEU of the current weights."""
        self.model.eval()
        metrics: dict[str, Any] = self._loss()
        metrics["bleu"] = self._bleu() if self.cfg.train.valid_bleu else None
        self.model.train()
        return metrics

    def _loss(self) -> dict[str, float]:
        """Valid-set token-level loss, nll and perplexity, its batches sharded over the ranks (sums added)."""
        model, dataset, ranks = self.model, self.dataset, self.ranks
        loss_sum, nll_sum, ntok = 0.0, 0.0, 0
        batches = fixed_batches(dataset.src_lens, dataset.tgt_lens, self.cfg.train.max_tokens)
        for b in batches[ranks.rank :: ranks.world_size]:
            src, src_len, tgt_in, tgt_out = self.collate(dataset, b)
            with self.autocast():
                hidden = model(src, src_len, tgt_in, features_only=True)
            batch_loss, batch_nll, n = self.loss(hidden, tgt_out)
            loss_sum, nll_sum, ntok = loss_sum + float(batch_loss), nll_sum + float(batch_nll), ntok + n
        loss_sum, nll_sum, ntok = ranks.sum([loss_sum, nll_sum, ntok])
        ntok = max(ntok, 1)
        return {"loss": loss_sum / ntok, "nll": nll_sum / ntok, "ppl": math.exp(min(nll_sum / ntok, 100.0))}

    def _bleu(self) -> float:
        """Corpus BLEU of the 1-best translations of the first ``train.valid_bleu_max_sentences`` (0: all)
        valid sentences, decoded with the ``decode`` config in batches sharded over the ranks."""
        import sacrebleu

        from mtkit.decoding.search import generate

        model, dataset, tgt_spm, ranks = self.model, self.dataset, self.tgt_spm, self.ranks
        max_sentences = self.cfg.train.valid_bleu_max_sentences
        n = len(dataset) if max_sentences <= 0 else min(len(dataset), max_sentences)
        one_best = dataclasses.replace(self.cfg.decode, nbest=1)
        hyps: dict[int, list[int]] = {}
        for b in bleu_batches(dataset.src_lens[:n], one_best)[ranks.rank :: ranks.world_size]:
            src, src_len, _, _ = self.collate(dataset, b)
            with self.autocast():
                out = generate([model], src, src_len, one_best, tgt_spm.bos, tgt_spm.eos)
            for i, nbest in zip(b.tolist(), out):
                hyps[i] = nbest[0].tokens
        release_packed(model)  # the weights change with the next update
        hyps = {i: h for shard in ranks.gather(hyps) for i, h in shard.items()}
        sys_out = tgt_spm.decode([hyps[i] for i in range(n)])
        refs = tgt_spm.decode([dataset[i][1] for i in range(n)])
        return float(sacrebleu.corpus_bleu(sys_out, [refs]).score)

    def run(self, update: int, epoch: int, lr: float, elapsed: float) -> tuple[dict[str, Any], bool]:
        """Validate at update number ``update``, log it and record it for early stopping.
        Returns the metrics (rank 0's on every rank) and whether they are the new best."""
        t0 = time.perf_counter()
        metrics = self.ranks.agree(self.metrics())  # the ranks compute the same; rank 0's value rules
        best = self.early_stopping.record(metrics)
        bleu = "" if metrics["bleu"] is None else f" | bleu {metrics['bleu']:.2f}"
        logger.info(
            "valid | update %d | loss %.4f | ppl %.2f%s%s | %.1fs", update, metrics["loss"], metrics["ppl"],
            bleu, " | best" if best else "", time.perf_counter() - t0,
        )
        self.metrics_log.write({
            "kind": "valid", "update": update, "epoch": epoch, "loss": metrics["loss"], "ppl": metrics["ppl"],
            "bleu": metrics["bleu"], "lr": lr, "elapsed": round(elapsed, 3),
        })
        return metrics, best


def stop_reason(train_cfg: TrainConfig, update: int, epoch: int, elapsed: float, early_stopping: EarlyStopping,
                ranks: RankGroup) -> str | None:
    """Why the run stops before update number ``update`` + 1, or ``None`` to go on: a limit on
    updates, epochs or training time (reached on any rank), or early stopping."""
    if train_cfg.max_updates and update >= train_cfg.max_updates:
        return f"reached max_updates {train_cfg.max_updates}"
    if train_cfg.max_epochs and epoch > train_cfg.max_epochs:
        return f"reached max_epochs {train_cfg.max_epochs}"
    if train_cfg.max_time_minutes and ranks.any(elapsed >= train_cfg.max_time_minutes * 60):
        return f"reached max_time_minutes {train_cfg.max_time_minutes}"
    if early_stopping.exhausted(train_cfg.patience):
        return f"no improvement in {train_cfg.patience} validations (early stopping)"
    if not train_cfg.max_updates and not train_cfg.max_epochs and not train_cfg.max_time_minutes and not train_cfg.patience:
        raise MtkitError("set at least one of train.max_updates, max_epochs, max_time_minutes or patience")
    return None

"""The one training loop shared by every model family.

``train(data_dir, cfg, save_dir)`` runs :class:`Trainer` on a preprocessed data dir: label-smoothed
cross entropy, token-budget batches with ``update_freq`` accumulation, mixed precision, gradient
clipping, validation (loss, perplexity, BLEU) with early stopping, and atomic checkpoints.
Resuming is exact: checkpoints are written at update boundaries with the data-iterator position,
the optimizer, scheduler and every RNG state, so on CPU an interrupted and resumed run ends with
bit-identical weights to an uninterrupted one. Data-parallel (``torchrun``) set-up:
:mod:`mtkit.training.distributed`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from mtkit import checkpoint, provenance
from mtkit.checkpoint import BEST, LAST
from mtkit.config import Config, dump_config
from mtkit.devices import training_device
from mtkit.errors import MtkitError
from mtkit.models.base import num_parameters
from mtkit.signals import Interrupted, stop_requests
from mtkit.training import builders, resume
from mtkit.training.builders import TrainData, load_data
from mtkit.training.distributed import RankGroup, distributed_env, joined_process_group
from mtkit.training.metrics import MetricsLog, UpdateProgress, tensorboard_writer_class
from mtkit.training.schedule import Scheduler
from mtkit.training.step import UpdateStep
from mtkit.training.validation import Validator, stop_reason
from mtkit.utils import atomic_write_text, release_free_memory, rss_gib

logger = logging.getLogger("mtkit.train")


def train(
    data_dir: str | Path, cfg: Config, save_dir: str | Path, resume: bool = False, device: str = "auto"
) -> dict[str, Any]:
    """Train on a preprocessed data dir; returns a summary (updates, epochs, checkpoints, ...).
    Launched by ``torchrun`` with WORLD_SIZE > 1, this process becomes one data-parallel rank."""
    rank, world_size, local_rank = distributed_env()
    if world_size == 1:
        return Trainer(load_data(data_dir), cfg, save_dir, device=device).fit(resume=resume)
    dev = training_device(device, local_rank=local_rank)
    with joined_process_group(dev, rank, world_size):
        trainer = Trainer(load_data(data_dir), cfg, save_dir, device=dev, rank=rank, world_size=world_size)
        return trainer.fit(resume=resume)


class Trainer:
    """One training run: built from a config and data, it trains with :meth:`fit`."""

    def __init__(
        self, data: TrainData, cfg: Config, save_dir: str | Path, device: str | torch.device = "auto",
        rank: int = 0, world_size: int = 1,
    ):
        """``rank``/``world_size`` > 1 need the default process group joined (see :func:`train`)."""
        self.data, self.cfg, self.train_cfg = data, cfg, cfg.train
        self.provenance = provenance.collect(cfg.to_dict(), data.data_dir, world_size)
        if cfg.train.tensorboard_dir:
            tensorboard_writer_class()  # a missing package fails before any work
        self.save_dir = Path(save_dir)
        self.device = training_device(device)
        self.ranks = RankGroup(rank, world_size, self.device)  # world_size > 1: the process group is joined
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0
        if self.train_cfg.num_threads > 0:
            torch.set_num_threads(self.train_cfg.num_threads)
        self._build()
        self.metrics = MetricsLog(self.save_dir / "metrics.jsonl", enabled=self.is_main)
        self.validator = Validator(self.model, data.valid, data.tgt_spm, cfg, self.collate, self.step.autocast,
                                   self.step.loss, self.ranks, self.metrics)
        self.early_stopping = self.validator.early_stopping
        self.update = self.bad_in_row = self.bad_total = 0  # updates made; non-finite ones skipped in a row, in all
        self.elapsed = 0.0  # seconds spent in training steps (validation and saving excluded)
        self.last_valid: dict[str, Any] = {}
        self.saved_at = -1

    def _build(self) -> None:
        """The model (and its DDP wrapper), optimizer, scheduler, mixed precision, batches and the
        update step over them."""
        data, cfg, device, rank, world_size = self.data, self.cfg, self.device, self.rank, self.world_size
        self.model, self.ddp = builders.build_seeded_model(cfg, data.src_spm.size, data.tgt_spm.size,
                                                           data.tgt_spm.pad, device, rank, world_size)
        self.optimizer = builders.build_optimizer(self.model, cfg.train, device)
        self.scheduler = Scheduler(self.optimizer, cfg.train, cfg.model.width)
        self.autocast_dtype = builders.autocast_dtype(cfg.train.amp, device, self._warn)
        self.max_src, self.max_tgt = builders.length_limits(self.model, cfg.data)
        self.batches = builders.build_batches(data.train, cfg.train, self.max_src, self.max_tgt, rank,
                                              world_size, self._warn)
        self.collate = builders.Collator(
            data.src_spm.pad, data.src_spm.eos, data.tgt_spm.pad, data.tgt_spm.bos, data.tgt_spm.eos,
            self.max_src, self.max_tgt, device,
        )
        self.step = UpdateStep(self.model, self.ddp, self.optimizer, self.scheduler, self.autocast_dtype,
                               self.collate, cfg.train, self.ranks)
        self.scaler = self.step.scaler

    def _warn(self, *args: Any) -> None:
        """A warning every rank would give alike: said once, by rank 0."""
        if self.is_main:
            logger.warning(*args)

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train (resuming from ``checkpoint_last.pt`` with ``resume``) and return the summary; rank 0
        keeps the run's records in the save dir: ``train.log`` (appended) and the resolved ``config.yaml``."""
        found = self._check_save_dir(resume)
        with self._run_records():
            self._resume_or_start(found, resume)
            self._log_start()
            reason = self._train_until_stop()
            self._final_validation_and_save()
            logger.info("stopped at update %d: %s", self.update, reason)
        return {
            "updates": self.update,
            "epochs": round(self.batches.epoch - 1 + self.batches.position / max(len(self.batches), 1), 3),
            "train_seconds": round(self.elapsed, 2),
            "stop_reason": reason,
            "last_checkpoint": str(self.save_dir / LAST),
            "best_checkpoint": str(self.save_dir / BEST),
            "best": {"metric": self.early_stopping.metric, "value": self.early_stopping.best},
            "valid": self.last_valid,
            "skipped_updates": self.bad_total,
            "metrics_file": str(self.metrics.path),
            "world_size": self.world_size,
        }

    def _check_save_dir(self, resume: bool) -> bool:
        """Whether the save dir holds a run to resume (rank 0's view: a save dir must be shared by all
        nodes); one without ``--resume`` is an error."""
        found = self.ranks.agree((self.save_dir / LAST).exists())
        if found and not resume:
            raise MtkitError(f"{self.save_dir} already holds checkpoints: pass --resume to continue, "
                             "or use another --save-dir")
        return found

    def _log_start(self) -> None:
        """The run's first log line: model, data, device."""
        n, train_cfg = self.world_size, self.train_cfg
        ranks = (f" per rank; {n} ranks, an update takes up to {n} x {train_cfg.update_freq} x "
                 f"{train_cfg.max_tokens} tokens" if self.ranks.distributed else "")
        logger.info(
            "model %s: %d parameters; %d training pairs, %d batches per epoch%s; device %s%s",
            self.cfg.model.arch, num_parameters(self.model), len(self.data.train), len(self.batches),
            ranks, self.device, f" ({self.autocast_dtype})" if self.autocast_dtype else "",
        )

    def _run_records(self) -> contextlib.ExitStack:
        """On rank 0: ``train.log`` (provenance first) and the TensorBoard writer, open for the run."""
        records = contextlib.ExitStack()
        if self.is_main:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            records.enter_context(provenance.run_log(self.save_dir / "train.log", self.provenance, "mtkit train"))
            if self.train_cfg.tensorboard_dir:
                self.metrics.tensorboard = records.enter_context(tensorboard_writer_class()(self.train_cfg.tensorboard_dir))
        return records

    def _resume_or_start(self, found: bool, resume: bool) -> None:
        """Restore ``checkpoint_last.pt`` when there is one, else start afresh; write ``config.yaml``."""
        if found:
            self.restore(self.save_dir / LAST)
            self.metrics.truncate(self.update)
        elif resume:
            self._warn("nothing to resume in %s: starting from scratch", self.save_dir)
        if not found:
            self.metrics.discard()  # events of a run that never saved
        if self.is_main:
            atomic_write_text(self.save_dir / "config.yaml", dump_config(self.cfg))

    def _train_until_stop(self) -> str:
        """Updates, with the validations and checkpoints they make due, until a stop condition;
        returns it. SIGTERM/SIGINT: finish this update, write checkpoint_last.pt, raise."""
        train_cfg = self.train_cfg
        progress = UpdateProgress(self.metrics, train_cfg.log_interval, train_cfg.max_updates, self.update, self.is_main)
        try:
            with stop_requests() as request:
                while True:
                    if self.ranks.any(request.requested):  # every rank stops at the same update
                        self._preempted(request.signum or signal.SIGTERM)
                    reason = stop_reason(train_cfg, self.update, self.batches.epoch, self.elapsed, self.early_stopping,
                                         self.ranks)
                    if reason:
                        return reason
                    self._next_update(progress)
        finally:
            progress.close()

    def _next_update(self, progress: UpdateProgress) -> None:
        """One update over the next ``train.update_freq`` batches, then what is due (epoch end too)."""
        chunk: list[np.ndarray] = []
        while len(chunk) < self.train_cfg.update_freq and (batch := self.batches.next_batch()) is not None:
            chunk.append(batch)
        epoch_done = len(chunk) < self.train_cfg.update_freq  # the epoch ran out of batches
        if chunk:
            t0 = time.perf_counter()
            stats = self.train_step(chunk)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            self.elapsed += seconds
            if stats is not None:
                progress.add(stats, seconds, self.update, self.batches.epoch, self.elapsed)
                self._after_update(epoch_end=False)
        if epoch_done:
            self.batches.next_epoch()
            self._after_update(epoch_end=True)

    def _after_update(self, epoch_end: bool) -> None:
        """Validation and checkpoints due at this boundary (an update, or the end of an epoch)."""
        def due(every: int) -> bool:  # every 0: at the end of each epoch
            return every == 0 if epoch_end else every > 0 and self.update % every == 0

        due_save = due(self.train_cfg.save_interval_updates)
        validate = due(self.train_cfg.validate_interval_updates) and self.data.valid is not None
        best = validate and self._validate_and_track()
        if due_save or best:
            self.save(numbered=due_save, best=best)

    def _preempted(self, signum: int) -> NoReturn:
        """Stopped by a signal between updates: write checkpoint_last.pt (data position and RNG
        states included, so ``--resume`` continues bit-exactly), no validation, then raise."""
        if self.saved_at != self.update or not self.ranks.agree((self.save_dir / LAST).exists()):
            self.save(numbered=False)
        name = signal.Signals(signum).name
        logger.warning("%s at update %d: wrote %s; rerun with --resume to continue", name, self.update,
                       self.save_dir / LAST)
        raise Interrupted(signum, f"stopped by {name} at update {self.update}; checkpoint_last.pt is up to date "
                                  "(rerun with --resume)")

    def _final_validation_and_save(self) -> None:
        """Validate the final weights (unless just done) and save them unless saved."""
        best = self.data.valid is None
        if self.data.valid is not None and self.last_valid.get("update") != self.update and self.update > 0:
            best = self._validate_and_track()
        if self.ranks.agree(self.saved_at != self.update or not (self.save_dir / LAST).exists()):
            # numbered too, so that `average --last N` includes the weights training ended with
            self.save(numbered=self.train_cfg.save_interval_updates > 0 and self.update > 0, best=best)
        if self.is_main and not (self.save_dir / BEST).exists():
            checkpoint.link_or_copy(self.save_dir / LAST, self.save_dir / BEST)

    def train_step(self, batches: list[np.ndarray]) -> dict[str, float] | None:
        """Forward/backward over ``batches`` (accumulated), then one optimizer step; returns the
        step's statistics, or ``None`` when the loss or gradient was not finite and it was skipped."""
        stats = self.step.gradients(self.data.train, batches, self.max_tgt)
        if not stats.pop("finite"):
            return self._skip_bad_update(stats["loss"], stats["gnorm"])
        elapsed = self.elapsed  # training seconds so far: the same on every rank when the lr depends on them
        if self.train_cfg.time_decay != "none":
            elapsed = float(self.ranks.agree(self.elapsed))  # rank 0's
        stats["lr"] = self.step.apply(self.update + 1, elapsed)
        self.update += 1
        self.bad_in_row = 0
        if self.train_cfg.trim_memory_gib > 0 and self.device.type == "cpu" and rss_gib() > self.train_cfg.trim_memory_gib:
            release_free_memory()
        return stats

    def _skip_bad_update(self, loss: float, gnorm: float) -> None:
        """Drop a non-finite update; after ``train.max_bad_updates`` in a row, save and stop."""
        self.step.discard()
        self.bad_in_row += 1
        self.bad_total += 1
        self._warn("update %d: non-finite loss %s / grad norm %s, skipped (%d in a row)", self.update + 1,
                   loss, gnorm, self.bad_in_row)
        if self.bad_in_row >= self.train_cfg.max_bad_updates:
            if self.update > self.saved_at:  # keep the good updates made since the last save
                self.save(numbered=False)
            raise MtkitError(
                f"{self.bad_in_row} updates in a row had a non-finite loss or gradient (after update {self.update}); "
                f"lower train.lr or check the data; the last good checkpoint is in {self.save_dir}"
            )

    def validate(self) -> dict[str, Any]:
        """Valid loss, nll, perplexity and (with ``train.valid_bleu``) BLEU of the current weights."""
        return self.validator.metrics()

    def _validate_and_track(self) -> bool:
        """Validate, log and record for early stopping; True if it is the new best (the caller saves)."""
        lr = self.optimizer.param_groups[0]["lr"]
        metrics, best = self.validator.run(self.update, self.batches.epoch, lr, self.elapsed)
        self.last_valid = {"update": self.update, **metrics}
        return best

    def payload(self, rng: dict[str, Any] | None = None) -> dict[str, Any]:
        """The checkpoint payload; ``rng`` from :func:`resume.rng_states` (this process's if None)."""
        rng = resume.rng_states(self.ranks) if rng is None else rng
        return checkpoint.build_payload(
            self.cfg.to_dict(), self.model.state_dict(),
            **checkpoint.subword_entries(self.data.src_spm, self.data.tgt_spm),
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler else {},
            update=self.update, epoch=self.batches.epoch, data_state=self.batches.state_dict(), rng=rng,
            metrics=dict(self.last_valid), provenance=self.provenance,
            train_state={**self.early_stopping.state_dict(), "bad_total": self.bad_total, "elapsed": self.elapsed},
        )

    def save(self, numbered: bool, best: bool = False) -> None:
        """Write a checkpoint (rank 0); on several ranks every rank must call it (RNG gather)."""
        rng = resume.rng_states(self.ranks)
        self.saved_at = self.update
        if self.is_main:
            checkpoint.write_checkpoints(self.save_dir, self.payload(rng), self.update, numbered, best,
                                         self.train_cfg.keep_last)

    def restore(self, path: Path) -> None:
        """Continue from checkpoint ``path``: weights, optimizer, scheduler, scaler, data position, the
        run's counters and every rank's RNG state."""
        payload = checkpoint.load_checkpoint(path)
        resume.check_resumable(payload, self.cfg, self.data.src_spm, self.data.tgt_spm, path)
        try:
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise MtkitError(f"cannot resume from {path}: {str(exc).splitlines()[0]}") from None
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.scaler and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        self.update = int(payload["update"])
        self.batches.load_state_dict(payload["data_state"])
        state = payload.get("train_state", {})
        self.early_stopping.load_state_dict(state)
        self.bad_total, self.elapsed = state.get("bad_total", 0), state.get("elapsed", 0.0)
        self.last_valid = dict(payload.get("metrics") or {})
        if self.is_main:
            resume.warn_world_size_change(payload, self.cfg, self.world_size)
        resume.restore_rng_states(payload, self.ranks, self.train_cfg.seed, self.update)
        self.saved_at = self.update
        logger.info("resumed from %s at update %d (epoch %d)", path, self.update, self.batches.epoch)

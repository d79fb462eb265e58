"""The one training loop shared by every model family.

``train(data_dir, cfg, save_dir)`` loads a preprocessed data dir and runs :class:`Trainer`:
label-smoothed cross entropy over non-pad target tokens, Adam with a warmup schedule, gradient
clipping and norm logging, token-budget batches with length bucketing, ``update_freq``
accumulation, CUDA mixed precision (bf16 autocast, or fp16 with a grad scaler), validation
(loss, perplexity, BLEU) with early stopping, and self-contained atomic checkpoints.

Resuming is exact: checkpoints are written at update boundaries with the data-iterator position
(epoch, batch), the optimizer, scheduler and every RNG state, so on CPU an interrupted and
resumed run ends with bit-identical weights to an uninterrupted one.

Data-parallel training: under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the environment,
WORLD_SIZE > 1) :func:`train` joins the process group (NCCL on CUDA with device
``cuda:LOCAL_RANK``, Gloo on CPU) and the loop wraps the model in DistributedDataParallel. Every
rank builds the same shuffled batch list and takes every ``world_size``-th batch, so one update
over R ranks with ``update_freq`` F sees the same R x F batches that one process sees with
``update_freq`` R x F; the loss is divided by the update's global target-token count (an
all-reduce), which makes the two bit-for-bit the same computation up to float summation order.
Gradient accumulation runs under ``no_sync``. Skip (NaN/inf), validation, early-stopping and
time-limit decisions are agreed across ranks. Only rank 0 writes checkpoints, metrics, info logs
and progress bars; the checkpoint holds every rank's RNG state, and the data position is kept in
batches of the shared list, so a run resumes on the same or on another number of ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist

from mtkit import provenance
from mtkit.checkpoint import (
    build_payload,
    link_or_copy,
    load_checkpoint,
    save_checkpoint,
    subword_entries,
)
from mtkit.config import Config, check_section, dump_config
from mtkit.data.batching import BatchIterator, collate_source, collate_target, fixed_batches
from mtkit.data.subword import SubwordModel
from mtkit.devices import training_device
from mtkit.errors import MtkitError
from mtkit.models import build_model
from mtkit.models.base import num_parameters
from mtkit.models.linear import release_packed
from mtkit.signals import Interrupted, stop_requests
from mtkit.training.loss import projected_nll
from mtkit.training.schedule import Scheduler
from mtkit.utils import (
    atomic_write_text,
    cpu_has_native_bf16,
    progress_enabled,
    release_free_memory,
    rss_gib,
)

logger = logging.getLogger("mtkit.train")

LAST, BEST = "checkpoint_last.pt", "checkpoint_best.pt"
NUMBERED = re.compile(r"checkpoint_(\d+)\.pt$")
OPTIMIZER_CLASSES = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}  # the names of config.OPTIMIZERS


@dataclass
class TrainData:
    """What the loop needs from a data dir (tests pass in-memory datasets instead)."""

    train: Any  # ParallelDataset-like: src_lens, tgt_lens, __len__, __getitem__ -> (src, tgt)
    valid: Any | None
    src_spm: SubwordModel
    tgt_spm: SubwordModel
    data_dir: Path | None = None  # its manifest's hash goes into the provenance record


def load_data(data_dir: str | Path) -> TrainData:
    from mtkit.data.dataset import ParallelDataset, load_manifest, load_spm

    manifest = load_manifest(data_dir)
    src_spm, tgt_spm = load_spm(data_dir)
    splits = manifest["splits"]
    if "train" not in splits:
        raise MtkitError(f"{data_dir} has no train split (has: {', '.join(splits)})")
    valid = ParallelDataset(data_dir, "valid") if "valid" in splits else None
    return TrainData(ParallelDataset(data_dir, "train"), valid, src_spm, tgt_spm, Path(data_dir))


def train(
    data_dir: str | Path, cfg: Config, save_dir: str | Path, resume: bool = False, device: str = "auto"
) -> dict[str, Any]:
    """Train on a preprocessed data dir; returns a summary (updates, epochs, checkpoints, ...).

    Launched by ``torchrun`` with WORLD_SIZE > 1, this process becomes one data-parallel rank."""
    rank, world_size, local_rank = distributed_env()
    if world_size == 1:
        return Trainer(load_data(data_dir), cfg, save_dir, device=device).fit(resume=resume)
    dev = training_device(device, local_rank=local_rank)
    started = init_distributed(dev, rank, world_size)
    restore_logging = _rank_logging(rank)
    try:
        trainer = Trainer(load_data(data_dir), cfg, save_dir, device=dev, rank=rank, world_size=world_size)
        return trainer.fit(resume=resume)
    finally:
        restore_logging()
        if started:
            dist.destroy_process_group()


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the variables torchrun sets; (0, 1, 0) without them."""
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = os.environ.get(name, "")
        try:
            values[name] = int(text) if text.strip() else default
        except ValueError:
            raise MtkitError(f"environment variable {name}={text!r} is not an integer") from None
    rank, world_size, local_rank = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise MtkitError(f"bad torch.distributed environment: RANK={rank} WORLD_SIZE={world_size} LOCAL_RANK={local_rank}")
    return rank, world_size, local_rank


def init_distributed(device: torch.device, rank: int, world_size: int) -> bool:
    """Join the default process group (NCCL on CUDA, Gloo on CPU); False if already joined."""
    if dist.is_initialized():
        return False
    import datetime

    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise MtkitError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set: launch with torchrun or mtkit train --nproc")
    backend = "nccl" if device.type == "cuda" else "gloo"
    # rank 0 alone validates and writes checkpoints while the others wait: allow it time
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=60))
    return True


def launch_local(nproc: int, mtkit_args: list[str], device: str = "auto") -> int:
    """Run ``python -m mtkit MTKIT_ARGS`` as ``nproc`` ranks on this machine through PyTorch's
    own launcher (``torchrun --standalone``); 0, or the exit code of the first rank that failed
    (that rank has printed its error)."""
    if distributed_env()[1] > 1:
        raise MtkitError("--nproc inside a torchrun launch: use one or the other")
    if device in ("auto", "cuda") and torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise MtkitError(f"--nproc {nproc} but only {torch.cuda.device_count()} CUDA devices (one rank per GPU)")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "mtkit", *mtkit_args])
    try:
        torchrun(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode < 0:
            raise MtkitError(f"training rank {rank} was killed by signal {-failure.exitcode}") from None
        return failure.exitcode or 1
    return 0


def _rank_logging(rank: int):
    """Ranks other than 0 log warnings and errors only, tagged with their rank."""
    root = logging.getLogger("mtkit")
    level = root.level
    if rank == 0:
        return lambda: None

    def tag(record: logging.LogRecord) -> bool:
        record.msg = f"[rank {rank}] {record.msg}"
        return True

    root.setLevel(max(level, logging.WARNING))
    for h in root.handlers:
        h.addFilter(tag)

    def restore() -> None:
        root.setLevel(level)
        for h in root.handlers:
            h.removeFilter(tag)

    return restore


def tensorboard_writer_class() -> type:
    """torch's TensorBoard ``SummaryWriter``; a one-line error when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MtkitError("train.tensorboard_dir is set but the tensorboard package is not installed "
                         "(pip install tensorboard)") from None
    return SummaryWriter


class Trainer:
    def __init__(
        self, data: TrainData, cfg: Config, save_dir: str | Path, device: str | torch.device = "auto",
        rank: int = 0, world_size: int = 1,
    ):
        """``rank``/``world_size`` > 1 need the default process group joined (see :func:`train`)."""
        self.data, self.cfg, self.tc = data, cfg, cfg.train
        self.provenance = provenance.collect(cfg.to_dict(), data.data_dir, world_size)
        self.tensorboard: Any = None  # a SummaryWriter while rank 0 trains with train.tensorboard_dir
        if cfg.train.tensorboard_dir:
            tensorboard_writer_class()  # a missing package fails before any work
        self.save_dir = Path(save_dir)
        self.device = training_device(device)
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0
        self.distributed = world_size > 1
        if self.distributed and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("Trainer(world_size > 1) needs torch.distributed.init_process_group first")
        tc = self.tc
        if tc.num_threads > 0:
            torch.set_num_threads(tc.num_threads)
        for name in ("data", "model", "train", "decode"):  # configs built in code get the load-time checks too
            check_section(getattr(cfg, name), name)
        self.src_pad, self.tgt_pad = data.src_spm.pad, data.tgt_spm.pad
        self.bos, self.eos = data.tgt_spm.bos, data.tgt_spm.eos
        self.src_eos = data.src_spm.eos

        torch.manual_seed(tc.seed)
        self.model = build_model(cfg.model, data.src_spm.size, data.tgt_spm.size, self.tgt_pad).to(self.device)
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None
        if self.distributed:
            if rank > 0:  # dropout differs per rank; rank 0 keeps the stream of a 1-process run
                torch.manual_seed(self._rank_seed(rank))
            ddp = torch.nn.parallel.DistributedDataParallel
            # the models' buffers are constants (e.g. position tables): no re-broadcast on each forward
            no_buffer_sync = (
                {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                else {"broadcast_buffers": False}
            )
            self.ddp = ddp(  # copies rank 0's weights to every rank
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None, **no_buffer_sync
            )
        self.optimizer = self._optimizer()
        self.scheduler = Scheduler(self.optimizer, tc, cfg.model.width)
        self.autocast_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None

        limit = self.model.max_positions()
        max_src = min(cfg.data.max_src_len, limit) if limit else cfg.data.max_src_len
        max_tgt = min(cfg.data.max_tgt_len, limit) if limit else cfg.data.max_tgt_len
        self.max_src, self.max_tgt = max_src, max_tgt
        try:
            self.batches = BatchIterator(
                data.train.src_lens, data.train.tgt_lens, tc.max_tokens, tc.max_sentences, seed=tc.seed,
                max_src_len=max_src, max_tgt_len=max_tgt, rank=rank, world_size=world_size,
            )
        except ValueError:
            raise MtkitError(f"no training pair fits data.max_src_len {max_src} / data.max_tgt_len {max_tgt}") from None
        if self.batches.skipped:
            self._warn("skipping %d training pairs longer than %d/%d tokens", self.batches.skipped, max_src, max_tgt)
        if len(self.batches) == 0:
            raise MtkitError(
                f"the training data makes fewer batches than the {world_size} ranks: lower train.max_tokens ({tc.max_tokens})"
            )

        self.update = 0
        self.bad_in_row = 0
        self.bad_total = 0
        self.elapsed = 0.0  # seconds spent in training steps (validation and saving excluded)
        self.best: float | None = None
        self.best_metric_name: str | None = None
        self.stale = 0  # validations without improvement
        self.last_valid: dict[str, Any] = {}
        self.saved_at = -1

    # -- data parallelism ----------------------------------------------------------------------
    def _warn(self, *args: Any) -> None:
        """A warning every rank would give alike: said once, by rank 0."""
        if self.is_main:
            logger.warning(*args)

    def _rank_seed(self, rank: int) -> int:
        return self.tc.seed * 1_000_003 + 7_919 * rank

    @property
    def net(self) -> torch.nn.Module:
        """The module training steps run through: the DDP wrapper on several ranks."""
        return self.ddp if self.ddp is not None else self.model

    def _sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over the ranks (identity on one process)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _agree(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (decisions that must not diverge)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _rng_states(self) -> dict[str, Any]:
        """This process's RNG state; on several ranks, every rank's (gathered, same on all)."""
        local: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            local["cuda"] = torch.cuda.get_rng_state_all()
        if not self.distributed:
            return local
        ranks: list[Any] = [None] * self.world_size
        dist.all_gather_object(ranks, local)
        return {**ranks[0], "world_size": self.world_size, "ranks": ranks}

    # -- setup ---------------------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        tc = self.tc
        # fused: one kernel over all parameters (on a CPU ~20x faster than the per-tensor loop)
        return OPTIMIZER_CLASSES[tc.optimizer](
            self.model.parameters(), lr=tc.lr, betas=tuple(tc.adam_betas), eps=tc.adam_eps,
            weight_decay=tc.weight_decay, fused=self.device.type in ("cpu", "cuda"),
        )

    def _amp_dtype(self) -> torch.dtype | None:
        amp = self.tc.amp
        if amp == "none" or (self.device.type != "cuda" and amp == "auto"):
            return None
        if self.device.type == "cpu":  # opt-in: bf16 matmuls are ~2x faster on CPUs with AVX512-BF16/AMX
            if amp == "fp16":
                raise MtkitError("train.amp fp16 needs a CUDA device (on a CPU use bf16 or none)")
            if not cpu_has_native_bf16():  # emulated bf16 is ~9x slower per matmul than float32
                logger.warning("train.amp bf16: this CPU has no bf16 matmul instructions (AVX512-BF16 or AMX), "
                               "where bf16 is several times slower than float32; training in float32")
                return None
            return torch.bfloat16
        if amp == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if amp == "bf16" else torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # -- batches -------------------------------------------------------------------------------
    def collate(self, dataset: Any, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
        pairs = [dataset[int(i)] for i in indices]
        src, src_len = collate_source([p[0] for p in pairs], self.src_pad, self.src_eos, self.max_src)
        tgt_in, tgt_out = collate_target([p[1][: self.max_tgt - 1] for p in pairs], self.tgt_pad, self.bos, self.eos)
        dev, nb = self.device, self.device.type == "cuda"
        return tuple(t.to(dev, non_blocking=nb) for t in (src, src_len, tgt_in, tgt_out))

    # -- one update ----------------------------------------------------------------------------
    def loss(self, hidden: torch.Tensor, tgt_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(label-smoothed loss sum, nll sum, target tokens) of the features, output projection fused in."""
        layer = self.model.output_projection()
        return projected_nll(hidden, layer, tgt_out, self.tgt_pad, self.tc.label_smoothing, self.autocast_dtype)

    def passes(self, dataset: Any, batch: np.ndarray) -> list[np.ndarray]:
        """``batch`` cut into runs of its (length-sorted) sentences of at most ``train.pass_tokens``
        padded tokens each: forward/backward one run at a time, the gradients adding up to the
        batch's. The same update with a fraction of the activation memory."""
        limit = self.tc.pass_tokens
        if limit <= 0 or len(batch) < 2:
            return [batch]
        width = int(max(dataset.src_lens[batch].max() + 1, dataset.tgt_lens[batch].max() + 1))
        n = min(len(batch), -(-len(batch) * width // limit))
        return np.array_split(batch, n)  # n <= len(batch): no empty run

    def train_step(self, batches: list[np.ndarray]) -> dict[str, float] | None:
        """Forward/backward over ``batches`` (accumulated), then one optimizer step.

        Returns the step's statistics, or ``None`` when the loss or gradient was not finite and
        the update was skipped."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        ds = self.data.train
        ntok = sum(int(np.minimum(ds.tgt_lens[b] + 1, self.max_tgt).sum()) for b in batches)
        ntok = int(self._sum([ntok])[0])  # target tokens of the whole update, over all ranks
        loss_sum = torch.zeros((), device=self.device)
        nll_sum = torch.zeros((), device=self.device)
        passes = [p for b in batches for p in self.passes(ds, b)]
        for i, b in enumerate(passes):
            src, src_len, tgt_in, tgt_out = self.collate(ds, b)
            # DDP all-reduces gradients on the update's last pass only
            sync = self.ddp is None or i == len(passes) - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with self.autocast():
                    hidden = self.net(src, src_len, tgt_in, features_only=True)
                loss, nll, _ = self.loss(hidden, tgt_out)
                # token-level mean over the whole update; x world_size undoes DDP's average over ranks
                scaled = loss * self.world_size / ntok
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach()
            nll_sum += nll
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.tc.clip_norm > 0 or not hasattr(torch.nn.utils, "get_total_norm"):
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, self.tc.clip_norm or float("inf")))
        else:  # measure only: the norm is logged so vanishing/exploding gradients show
            gnorm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        # one all-reduce on several ranks: the update's loss sums, and whether any rank saw NaN/inf
        local_bad = not math.isfinite(float(loss_sum)) or (not math.isfinite(gnorm) and self.scaler is None)
        loss_value, nll_value, bad = self._sum([float(loss_sum), float(nll_sum), float(local_bad)])
        bad = bad != 0 or not math.isfinite(loss_value)
        if bad:
            return self._bad_update(loss_value, gnorm)
        lr = self.scheduler.step(self.update + 1, self._agreed_elapsed())
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips the step itself on fp16 overflow
            self.scaler.update()
        else:
            self.optimizer.step()
        self.update += 1
        self.bad_in_row = 0
        if self.tc.trim_memory_gib > 0 and self.device.type == "cpu" and rss_gib() > self.tc.trim_memory_gib:
            release_free_memory()
        return {"loss": loss_value, "nll": nll_value, "ntok": ntok, "gnorm": gnorm, "lr": lr}

    def _bad_update(self, loss: float, gnorm: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.update()
        self.bad_in_row += 1
        self.bad_total += 1
        self._warn(
            "update %d: non-finite loss %s / grad norm %s, skipped (%d in a row)", self.update + 1, loss, gnorm, self.bad_in_row
        )
        if self.bad_in_row >= self.tc.max_bad_updates:
            if self.update > self.saved_at:  # keep the good updates made since the last save
                self.save(numbered=False)
            raise MtkitError(
                f"{self.bad_in_row} updates in a row had a non-finite loss or gradient (after update {self.update}); "
                f"lower train.lr or check the data; the last good checkpoint is in {self.save_dir}"
            )
        return None

    # -- validation ----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        ds = self.data.valid
        self.model.eval()
        loss_sum = nll_sum = 0.0
        ntok = 0
        batches = fixed_batches(ds.src_lens, ds.tgt_lens, self.tc.max_tokens)
        for b in batches[self.rank :: self.world_size]:  # sharded over the ranks, then summed
            src, src_len, tgt_in, tgt_out = self.collate(ds, b)
            with self.autocast():
                hidden = self.model(src, src_len, tgt_in, features_only=True)
            loss, nll, n = self.loss(hidden, tgt_out)
            loss_sum, nll_sum, ntok = loss_sum + float(loss), nll_sum + float(nll), ntok + n
        if self.distributed:
            loss_sum, nll_sum, ntok = self._sum([loss_sum, nll_sum, ntok])
        metrics: dict[str, Any] = {
            "loss": loss_sum / max(ntok, 1),
            "nll": nll_sum / max(ntok, 1),
            "ppl": math.exp(min(nll_sum / max(ntok, 1), 100.0)),
            "bleu": self.valid_bleu() if self.tc.valid_bleu else None,
        }
        self.model.train()
        return metrics

    def valid_bleu(self) -> float:
        import sacrebleu

        from mtkit.decoding.search import generate

        ds = self.data.valid
        n = len(ds) if self.tc.valid_bleu_max_sentences <= 0 else min(len(ds), self.tc.valid_bleu_max_sentences)
        dcfg = dataclasses.replace(self.cfg.decode, nbest=1)
        hyps: dict[int, list[int]] = {}
        budget = dcfg.max_tokens if dcfg.batch_size <= 0 else None
        src_lens = ds.src_lens[:n]
        order = np.argsort(src_lens, kind="stable")
        if budget is None:
            groups = [order[i : i + dcfg.batch_size] for i in range(0, n, dcfg.batch_size)]
        else:
            groups = fixed_batches(src_lens, np.zeros(n, dtype=np.int64), max(budget // max(dcfg.beam, 1), 1))
        for b in groups[self.rank :: self.world_size]:  # sharded over the ranks, then gathered
            src, src_len, _, _ = self.collate(ds, b)
            with self.autocast():
                out = generate([self.model], src, src_len, dcfg, self.bos, self.eos)
            for i, nbest in zip(b.tolist(), out):
                hyps[i] = nbest[0].tokens
        release_packed(self.model)  # the weights change with the next update
        if self.distributed:
            shards: list[Any] = [None] * self.world_size
            dist.all_gather_object(shards, hyps)
            hyps = {i: h for shard in shards for i, h in shard.items()}
        spm = self.data.tgt_spm
        sys_out = spm.decode([hyps[i] for i in range(n)])
        refs = spm.decode([ds[i][1] for i in range(n)])
        return float(sacrebleu.corpus_bleu(sys_out, [refs]).score)

    def improved(self, metrics: dict[str, Any]) -> bool:
        """Track the best validation result on the early-stopping metric."""
        name = self.best_metric_name
        if name is None:
            name = self.tc.early_stop_metric
            if name == "bleu" and metrics.get("bleu") is None:
                log = logger.warning if self.tc.valid_bleu else logger.info
                log("no validation BLEU: early stopping and the best checkpoint use valid loss")
                name = "loss"
            self.best_metric_name = name
        value = metrics[name] if metrics.get(name) is not None else metrics["loss"]
        better = self.best is None or (value > self.best if name == "bleu" else value < self.best)
        if better:
            self.best, self.stale = value, 0
        else:
            self.stale += 1
        return better

    # -- checkpoints ---------------------------------------------------------------------------
    def payload(self, rng: dict[str, Any] | None = None) -> dict[str, Any]:
        """The checkpoint payload; ``rng`` from :meth:`_rng_states` (this process's if None)."""
        if rng is None:
            rng = self._rng_states()
        return build_payload(
            self.cfg.to_dict(),
            self.model.state_dict(),
            **subword_entries(self.data.src_spm, self.data.tgt_spm),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler else {},
            update=self.update,
            epoch=self.batches.epoch,
            data_state=self.batches.state_dict(),
            rng=rng,
            metrics=dict(self.last_valid),
            provenance=self.provenance,
            train_state={
                "best": self.best, "best_metric": self.best_metric_name, "stale": self.stale,
                "bad_total": self.bad_total, "elapsed": self.elapsed,
            },
        )

    def save(self, numbered: bool, best: bool = False) -> None:
        """Write a checkpoint (rank 0); on several ranks every rank must call it (RNG gather)."""
        rng = self._rng_states()
        self.saved_at = self.update
        if not self.is_main:
            return
        self.save_dir.mkdir(parents=True, exist_ok=True)
        last = self.save_dir / LAST
        payload = self.payload(rng)
        if numbered:
            path = self.save_dir / f"checkpoint_{self.update}.pt"
            save_checkpoint(path, payload)
            link_or_copy(path, last)
        else:
            save_checkpoint(last, payload)
        if best:
            link_or_copy(last, self.save_dir / BEST)
        self.rotate()

    def rotate(self) -> None:
        numbered = sorted(
            (int(m.group(1)), p) for p in self.save_dir.iterdir() if (m := NUMBERED.match(p.name))
        )
        keep = max(self.tc.keep_last, 0)
        for _, p in numbered[: max(len(numbered) - keep, 0)]:
            p.unlink()

    def restore(self, path: Path) -> None:
        payload = load_checkpoint(path)
        mine = self.cfg.to_dict()["model"]
        theirs = payload["config"].get("model", {})
        if theirs.get("arch") != mine["arch"]:
            raise MtkitError(f"cannot resume from {path}: it holds model.arch '{theirs.get('arch')}', the config says '{mine['arch']}'")
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            k = diff[0]
            raise MtkitError(f"cannot resume from {path}: model.{k} is {theirs.get(k)!r} there, {mine.get(k)!r} in the config")
        vocab = payload["vocab"]
        if (vocab["src_size"], vocab["tgt_size"]) != (self.data.src_spm.size, self.data.tgt_spm.size) or (
            payload["spm"]["src"] != self.data.src_spm.model_bytes or payload["spm"]["tgt"] != self.data.tgt_spm.model_bytes
        ):
            raise MtkitError(f"cannot resume from {path}: it was trained with another vocabulary than this data dir's")
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
        ts = payload.get("train_state", {})
        self.best, self.best_metric_name = ts.get("best"), ts.get("best_metric")
        self.stale, self.bad_total, self.elapsed = ts.get("stale", 0), ts.get("bad_total", 0), ts.get("elapsed", 0.0)
        self.last_valid = dict(payload.get("metrics") or {})
        self._restore_rng(payload)
        self.saved_at = self.update
        logger.info("resumed from %s at update %d (epoch %d)", path, self.update, self.batches.epoch)

    def _restore_rng(self, payload: dict[str, Any]) -> None:
        """Every rank takes its own saved RNG state; after a change in the number of ranks, rank 0
        takes the saved rank 0's and the others start fresh streams (seeded by rank and update)."""
        rng = payload["rng"]
        saved_world = int(payload["data_state"].get("world_size", 1))
        if saved_world != self.world_size and self.is_main:
            cfg = payload["config"].get("train", {})
            old_f, old_t = cfg.get("update_freq", self.tc.update_freq), cfg.get("max_tokens", self.tc.max_tokens)
            old, new = saved_world * old_f * old_t, self.world_size * self.tc.update_freq * self.tc.max_tokens
            logger.warning(
                "the checkpoint was written by %d rank(s), this run has %d: the effective batch (ranks x update_freq x "
                "max_tokens) %s from %d x %d x %d = %d to %d x %d x %d = %d tokens; the data goes on from the first "
                "batch not yet seen", saved_world, self.world_size, "changes" if old != new else "stays the same",
                saved_world, old_f, old_t, old, self.world_size, self.tc.update_freq, self.tc.max_tokens, new,
            )
        if saved_world == self.world_size and "ranks" in rng:
            mine = rng["ranks"][self.rank]
        elif self.rank == 0:
            mine = rng
        else:
            mine = {}
            torch.manual_seed(self._rank_seed(self.rank) + 1_000_033 * self.update)
        if "torch" in mine:
            torch.set_rng_state(mine["torch"])
        if "cuda" in mine and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(list(mine["cuda"]))

    # -- metrics -------------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.save_dir / "metrics.jsonl"

    def log_metrics(self, record: dict[str, Any]) -> None:
        """One event of ``metrics.jsonl``; also a TensorBoard scalar per number (``train/loss``, ...)."""
        if not self.is_main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("kind", "update") and isinstance(value, (int, float)) and value is not None:
                    self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["update"])

    def truncate_metrics(self) -> None:
        """After a resume, drop events the interrupted run logged past the checkpoint."""
        if not self.is_main or not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("update", 0) <= self.update:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        self.metrics_path.write_text("".join(x + "\n" for x in kept), encoding="utf-8")

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train (resuming from ``checkpoint_last.pt`` with ``resume``); rank 0 keeps the run's
        records in the save dir: ``train.log`` (appended) and the resolved ``config.yaml``."""
        last = self.save_dir / LAST
        found = self._agree(last.exists())  # rank 0's view: a save dir must be shared by all nodes
        if found and not resume:
            raise MtkitError(f"{self.save_dir} already holds checkpoints: pass --resume to continue, or use another --save-dir")
        records = contextlib.ExitStack()
        if self.is_main:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            records.enter_context(provenance.run_log(self.save_dir / "train.log", self.provenance, "mtkit train"))
            if self.tc.tensorboard_dir:
                self.tensorboard = records.enter_context(tensorboard_writer_class()(self.tc.tensorboard_dir))
        with records:
            if found:
                self.restore(last)
                self.truncate_metrics()
            elif resume:
                self._warn("nothing to resume in %s: starting from scratch", self.save_dir)
            if self.is_main:
                if not found and self.metrics_path.exists():  # events of a run that never saved
                    self.metrics_path.unlink()
                atomic_write_text(self.save_dir / "config.yaml", dump_config(self.cfg))
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        tc = self.tc
        ranks = ""
        if self.distributed:
            ranks = (f"; {self.world_size} ranks, an update takes up to {self.world_size} x {tc.update_freq} x "
                     f"{tc.max_tokens} tokens")
        logger.info(
            "model %s: %d parameters; %d training pairs, %d batches per epoch%s; device %s%s",
            self.cfg.model.arch, num_parameters(self.model), len(self.data.train), len(self.batches),
            " per rank" + ranks if self.distributed else "",
            self.device, f" ({self.autocast_dtype})" if self.autocast_dtype else "",
        )
        bar = None
        if progress_enabled() and self.is_main:
            from tqdm import tqdm

            bar = tqdm(total=tc.max_updates or None, initial=self.update, unit="upd", dynamic_ncols=True, leave=False, file=sys.stderr)
        window = self._new_window()
        stop_reason = None
        stops = stop_requests()  # SIGTERM/SIGINT: finish this update, write checkpoint_last, exit
        request = stops.__enter__()
        try:
            while stop_reason is None:
                if self._any(request.requested):  # every rank stops at the same update
                    self._preempted(request.signum or signal.SIGTERM)
                stop_reason = self._stop_reason()
                if stop_reason:
                    break
                chunk, epoch_done = [], False
                while len(chunk) < tc.update_freq:
                    b = self.batches.next_batch()
                    if b is None:
                        epoch_done = True
                        break
                    chunk.append(b)
                if chunk:
                    t0 = time.perf_counter()
                    stats = self.train_step(chunk)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                    self.elapsed += dt
                    if stats is not None:
                        for k in ("loss", "nll", "ntok", "gnorm"):
                            window[k] += stats[k]
                        window["n"] += 1
                        window["time"] += dt
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(loss=f"{stats['loss'] / stats['ntok']:.3f}", lr=f"{stats['lr']:.2e}")
                        if tc.log_interval > 0 and self.update % tc.log_interval == 0:
                            self._log_train(window, stats["lr"], bar is None)
                            window = self._new_window()
                        self._after_update(epoch_end=False)
                if epoch_done:
                    self.batches.next_epoch()
                    self._after_update(epoch_end=True)
        finally:
            stops.__exit__(None, None, None)
            if bar is not None:
                bar.close()
        # final validation and checkpoint
        best = self.data.valid is None
        if self.data.valid is not None and self.last_valid.get("update") != self.update and self.update > 0:
            best = self._validate_and_track()
        if self._agree(self.saved_at != self.update or not (self.save_dir / LAST).exists()):
            # numbered too, so that `average --last N` includes the weights training ended with
            self.save(numbered=tc.save_interval_updates > 0 and self.update > 0, best=best)
        if self.is_main and not (self.save_dir / BEST).exists():
            link_or_copy(self.save_dir / LAST, self.save_dir / BEST)
        logger.info("stopped at update %d: %s", self.update, stop_reason)
        return {
            "updates": self.update,
            "epochs": round(self.batches.epoch - 1 + self.batches.position / max(len(self.batches), 1), 3),
            "train_seconds": round(self.elapsed, 2),
            "stop_reason": stop_reason,
            "last_checkpoint": str(self.save_dir / LAST),
            "best_checkpoint": str(self.save_dir / BEST),
            "best": {"metric": self.best_metric_name, "value": self.best},
            "valid": self.last_valid,
            "skipped_updates": self.bad_total,
            "metrics_file": str(self.metrics_path),
            "world_size": self.world_size,
        }

    def _preempted(self, signum: int) -> NoReturn:
        """Stopped by a signal between updates: write checkpoint_last.pt (data position and RNG
        states included, so ``--resume`` continues bit-exactly), no validation, then raise."""
        if self.saved_at != self.update or not self._agree((self.save_dir / LAST).exists()):
            self.save(numbered=False)
        name = signal.Signals(signum).name
        logger.warning("%s at update %d: wrote %s; rerun with --resume to continue", name, self.update,
                       self.save_dir / LAST)
        raise Interrupted(signum, f"stopped by {name} at update {self.update}; checkpoint_last.pt is up to date "
                                  "(rerun with --resume)")

    def _stop_reason(self) -> str | None:
        tc = self.tc
        if tc.max_updates and self.update >= tc.max_updates:
            return f"reached max_updates {tc.max_updates}"
        if tc.max_epochs and self.batches.epoch > tc.max_epochs:
            return f"reached max_epochs {tc.max_epochs}"
        if tc.max_time_minutes and self._any(self.elapsed >= tc.max_time_minutes * 60):
            return f"reached max_time_minutes {tc.max_time_minutes}"
        if tc.patience and self.stale >= tc.patience:
            return f"no improvement in {tc.patience} validations (early stopping)"
        if not tc.max_updates and not tc.max_epochs and not tc.max_time_minutes and not tc.patience:
            raise MtkitError("set at least one of train.max_updates, max_epochs, max_time_minutes or patience")
        return None

    def _agreed_elapsed(self) -> float:
        """Training seconds so far, the same on every rank (rank 0's) when the lr depends on it."""
        return self.elapsed if self.tc.time_decay == "none" else float(self._agree(self.elapsed))

    def _any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        return self._sum([float(flag)])[0] > 0 if self.distributed else flag

    @staticmethod
    def _new_window() -> dict[str, float]:
        return {"loss": 0.0, "nll": 0.0, "ntok": 0, "gnorm": 0.0, "n": 0, "time": 0.0}

    def _after_update(self, epoch_end: bool) -> None:
        """Validation and checkpoints due at this boundary (an update, or the end of an epoch)."""
        tc = self.tc
        if epoch_end:
            due_valid, due_save = tc.validate_interval_updates == 0, tc.save_interval_updates == 0
        else:
            due_valid = tc.validate_interval_updates > 0 and self.update % tc.validate_interval_updates == 0
            due_save = tc.save_interval_updates > 0 and self.update % tc.save_interval_updates == 0
        best = False
        if due_valid and self.data.valid is not None:
            best = self._validate_and_track()
        if due_save or best:
            self.save(numbered=due_save, best=best)

    def _validate_and_track(self) -> bool:
        """Validate, log, and track the best result; True if it improved (the caller saves)."""
        t0 = time.perf_counter()
        metrics = self._agree(self.validate())  # the ranks compute the same; rank 0's value rules
        best = self.improved(metrics)
        self.last_valid = {"update": self.update, **metrics}
        bleu = "" if metrics["bleu"] is None else f" | bleu {metrics['bleu']:.2f}"
        logger.info(
            "valid | update %d | loss %.4f | ppl %.2f%s%s | %.1fs", self.update, metrics["loss"], metrics["ppl"],
            bleu, " | best" if best else "", time.perf_counter() - t0,
        )
        self.log_metrics({
            "kind": "valid", "update": self.update, "epoch": self.batches.epoch, "loss": metrics["loss"],
            "ppl": metrics["ppl"], "bleu": metrics["bleu"], "lr": self.optimizer.param_groups[0]["lr"],
            "elapsed": round(self.elapsed, 3),
        })
        return best

    def _log_train(self, w: dict[str, float], lr: float, plain: bool) -> None:
        ntok = max(w["ntok"], 1)
        record = {
            "kind": "train", "update": self.update, "epoch": self.batches.epoch, "loss": w["loss"] / ntok,
            "ppl": math.exp(min(w["nll"] / ntok, 100.0)), "lr": lr, "gnorm": w["gnorm"] / max(w["n"], 1),
            "tgt_tokens_per_s": w["ntok"] / max(w["time"], 1e-9), "elapsed": round(self.elapsed, 3),
        }
        self.log_metrics(record)
        if plain:
            logger.info(
                "train | update %d | epoch %d | loss %.4f | ppl %.2f | lr %.3e | gnorm %.3f | %.0f tgt tok/s",
                self.update, record["epoch"], record["loss"], record["ppl"], lr, record["gnorm"], record["tgt_tokens_per_s"],
            )

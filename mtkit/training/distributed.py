"""Data-parallel set-up (the torchrun environment, process group, launching ranks) and the
collectives the training loop agrees through.

Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK, WORLD_SIZE > 1) a training process joins the
default process group (NCCL on ``cuda:LOCAL_RANK``, Gloo on CPU) and wraps the model in DDP;
``mtkit train --nproc N`` starts N local ranks through PyTorch's own launcher. Each rank takes every
``world_size``-th batch of the same shuffled list and the loss is divided by the update's global
target-token count (an all-reduce), so R ranks with ``update_freq`` F compute what one process does
with R x F, up to float summation order. Accumulation runs under ``no_sync``; skip (NaN/inf),
validation, early-stopping and time-limit decisions are agreed across ranks. Only rank 0 writes
checkpoints, metrics, info logs and progress bars; checkpoints hold every rank's RNG state and the
data position in batches of the shared list, so a run resumes on any number of ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from mtkit.errors import MtkitError


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the variables torchrun sets; (0, 1, 0) without them."""
    values = []
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = os.environ.get(name, "")
        try:
            values.append(int(text) if text.strip() else default)
        except ValueError:
            raise MtkitError(f"environment variable {name}={text!r} is not an integer") from None
    rank, world_size, local_rank = values
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise MtkitError(f"bad torch.distributed environment: RANK={rank} WORLD_SIZE={world_size} LOCAL_RANK={local_rank}")
    return rank, world_size, local_rank


def rank_train_args(
    data_dir: str, config: str, save_dir: str, overrides: Sequence[str], resume: bool, device: str,
    verbosity: int = 0, debug: bool = False,
) -> list[str]:
    """The ``mtkit`` arguments each rank of ``mtkit train --nproc`` runs: the same training
    command (global flags, options and ``--set`` overrides) without ``--nproc``."""
    flags = {1: ["-v"], -1: ["-q"], 0: []}[verbosity] + (["--debug"] if debug else [])
    sets = [arg for item in overrides for arg in ("--set", item)]
    args = ["train", data_dir, "-c", config, "--save-dir", save_dir, "--device", device, *sets]
    return [*flags, *args, *(["--resume"] if resume else [])]


def torchrun_argv(nproc: int, mtkit_args: Sequence[str]) -> list[str]:
    """torchrun's command line that runs ``python -m mtkit MTKIT_ARGS`` as ``nproc`` local ranks."""
    return ["--standalone", f"--nproc-per-node={nproc}", "-m", "mtkit", *mtkit_args]


def launch_local(nproc: int, mtkit_args: list[str], device: str = "auto") -> int:
    """Run ``python -m mtkit MTKIT_ARGS`` as ``nproc`` local ranks through ``torchrun --standalone``;
    0, or the exit code of the first rank that failed (that rank has printed its error)."""
    if distributed_env()[1] > 1:
        raise MtkitError("--nproc inside a torchrun launch: use one or the other")
    if device in ("auto", "cuda") and torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise MtkitError(f"--nproc {nproc} but only {torch.cuda.device_count()} CUDA devices (one rank per GPU)")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    args = get_args_parser().parse_args(torchrun_argv(nproc, mtkit_args))
    try:
        torchrun(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode < 0:
            raise MtkitError(f"training rank {rank} was killed by signal {-failure.exitcode}") from None
        return failure.exitcode or 1
    return 0


@contextlib.contextmanager
def joined_process_group(device: torch.device, rank: int, world_size: int) -> Iterator[None]:
    """While active, this process is rank ``rank`` of the default process group (joined here unless it
    already was, then left again); ranks other than 0 log warnings and errors only, rank-tagged."""
    started = not dist.is_initialized()
    if started and ("MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ):
        raise MtkitError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set: launch with torchrun or mtkit train --nproc")
    if started:  # NCCL on CUDA, Gloo on CPU
        # rank 0 alone validates and writes checkpoints while the others wait: allow it time
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=60))
    root = logging.getLogger("mtkit")
    level = root.level

    def tag(record: logging.LogRecord) -> bool:
        record.msg = f"[rank {rank}] {record.msg}"
        return True

    if rank > 0:
        root.setLevel(max(level, logging.WARNING))
        for handler in root.handlers:
            handler.addFilter(tag)
    try:
        yield
    finally:
        if rank > 0:
            root.setLevel(level)
            for handler in root.handlers:
                handler.removeFilter(tag)
        if started:
            dist.destroy_process_group()


def rank_seed(seed: int, rank: int) -> int:
    """The torch seed of data-parallel rank ``rank`` > 0 (rank 0 keeps ``seed``'s stream)."""
    return seed * 1_000_003 + 7_919 * rank


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """``model`` in DistributedDataParallel (which copies rank 0's weights to every rank)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    # the models' buffers are constants (e.g. position tables): no re-broadcast on each forward
    sync = "forward_sync_buffers"
    if sync not in inspect.signature(ddp).parameters:
        sync = "broadcast_buffers"
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **{sync: False})


class RankGroup:
    """This process's place among the data-parallel ranks and collectives over them (on one: identities)."""

    def __init__(self, rank: int, world_size: int, device: torch.device):
        """``world_size`` > 1 needs the default process group joined (see :func:`joined_process_group`)."""
        self.rank, self.world_size, self.device = rank, world_size, device
        self.distributed = world_size > 1
        if self.distributed and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("Trainer(world_size > 1) needs torch.distributed.init_process_group first")

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over the ranks."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def agree(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (decisions that must not diverge)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        return self.sum([float(flag)])[0] > 0 if self.distributed else flag

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

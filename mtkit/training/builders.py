"""What the training loop is built from: a data dir's data, the model on its device, optimizer,
autocast dtype, length limits, training batches and the collation of a batch into tensors."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtkit.config import Config, DataConfig, TrainConfig
from mtkit.data.batching import BatchIterator, collate_source, collate_target
from mtkit.data.subword import SubwordModel
from mtkit.errors import MtkitError
from mtkit.models import build_model
from mtkit.training.distributed import rank_seed, wrap_ddp
from mtkit.utils import cpu_has_native_bf16

logger = logging.getLogger("mtkit.train")

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
    """The train split (required), the valid split (if any) and the subword models of a data dir."""
    from mtkit.data.dataset import ParallelDataset, load_manifest, load_spm

    splits = load_manifest(data_dir)["splits"]
    src_spm, tgt_spm = load_spm(data_dir)
    if "train" not in splits:
        raise MtkitError(f"{data_dir} has no train split (has: {', '.join(splits)})")
    valid = ParallelDataset(data_dir, "valid") if "valid" in splits else None
    return TrainData(ParallelDataset(data_dir, "train"), valid, src_spm, tgt_spm, Path(data_dir))


def build_seeded_model(
    cfg: Config, src_vocab: int, tgt_vocab: int, pad: int, device: torch.device, rank: int, world_size: int,
) -> tuple[torch.nn.Module, torch.nn.parallel.DistributedDataParallel | None]:
    """The model built under ``train.seed`` on ``device``, and its DDP wrapper on several ranks
    (``None`` on one); a rank > 0 then reseeds, so its dropout differs from rank 0's."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, src_vocab, tgt_vocab, pad).to(device)
    if world_size == 1:
        return model, None
    if rank > 0:  # rank 0 keeps the stream of a 1-process run
        torch.manual_seed(rank_seed(cfg.train.seed, rank))
    return model, wrap_ddp(model, device)


def build_optimizer(model: torch.nn.Module, train_cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """``train.optimizer`` over the model's parameters, fused (one kernel over all) on CPU and CUDA."""
    return OPTIMIZER_CLASSES[train_cfg.optimizer](
        model.parameters(), lr=train_cfg.lr, betas=tuple(train_cfg.adam_betas), eps=train_cfg.adam_eps,
        weight_decay=train_cfg.weight_decay, fused=device.type in ("cpu", "cuda"),
    )


def autocast_dtype(
    amp: str, device: torch.device, warn: Callable[..., None] = logger.warning
) -> torch.dtype | None:
    """The autocast dtype ``train.amp`` asks for on ``device``; ``None`` for float32. On a CPU, bf16 is
    opt-in and used only where the CPU has bf16 matmul instructions (else ``warn`` says so); fp16 needs
    CUDA. On CUDA, ``auto`` takes bf16 where supported, else fp16."""
    if amp == "none" or (device.type != "cuda" and amp == "auto"):
        return None
    if device.type == "cpu":
        if amp == "fp16":
            raise MtkitError("train.amp fp16 needs a CUDA device (on a CPU use bf16 or none)")
        if not cpu_has_native_bf16():
            warn("train.amp bf16: this CPU has no bf16 matmul instructions (AVX512-BF16 or AMX), "
                 "where bf16 is several times slower than float32; training in float32")
            return None
        return torch.bfloat16
    bf16 = amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported())
    return torch.bfloat16 if bf16 else torch.float16


def length_limits(model: torch.nn.Module, data_cfg: DataConfig) -> tuple[int, int]:
    """(max source, max target) tokens: the data config's, capped by the model's positions."""
    limit = model.max_positions()
    return tuple(min(n, limit) if limit else n for n in (data_cfg.max_src_len, data_cfg.max_tgt_len))


def build_batches(
    dataset: Any, train_cfg: TrainConfig, max_src: int, max_tgt: int, rank: int, world_size: int,
    warn: Callable[..., None],
) -> BatchIterator:
    """This rank's token-budget training batches; ``warn`` hears how many pairs were too long."""
    try:
        batches = BatchIterator(
            dataset.src_lens, dataset.tgt_lens, train_cfg.max_tokens, train_cfg.max_sentences, seed=train_cfg.seed,
            max_src_len=max_src, max_tgt_len=max_tgt, rank=rank, world_size=world_size,
        )
    except ValueError:
        raise MtkitError(f"no training pair fits data.max_src_len {max_src} / data.max_tgt_len {max_tgt}") from None
    if batches.skipped:
        warn("skipping %d training pairs longer than %d/%d tokens", batches.skipped, max_src, max_tgt)
    if len(batches) == 0:
        raise MtkitError(f"the training data makes fewer batches than the {world_size} ranks: "
                         f"lower train.max_tokens ({train_cfg.max_tokens})")
    return batches


class Collator:
    """Dataset sentence pairs -> (src, src_len, tgt_in, tgt_out) on the device, cut to the length limits."""

    def __init__(self, src_pad: int, src_eos: int, tgt_pad: int, bos: int, eos: int, max_src: int, max_tgt: int,
                 device: torch.device):
        self.src_pad, self.src_eos, self.tgt_pad, self.bos, self.eos = src_pad, src_eos, tgt_pad, bos, eos
        self.max_src, self.max_tgt, self.device = max_src, max_tgt, device

    def __call__(self, dataset: Any, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
        pairs = [dataset[int(i)] for i in indices]
        src, src_len = collate_source([p[0] for p in pairs], self.src_pad, self.src_eos, self.max_src)
        tgt_in, tgt_out = collate_target([p[1][: self.max_tgt - 1] for p in pairs], self.tgt_pad, self.bos, self.eos)
        dev, nb = self.device, self.device.type == "cuda"
        return tuple(t.to(dev, non_blocking=nb) for t in (src, src_len, tgt_in, tgt_out))

"""What resuming from a checkpoint checks and restores beside the weights: that the checkpoint
fits this run's model and vocabulary, and every rank's RNG state."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mtkit.config import Config
from mtkit.data.subword import SubwordModel
from mtkit.errors import MtkitError
from mtkit.training.distributed import RankGroup, rank_seed

logger = logging.getLogger("mtkit.train")


def check_resumable(payload: dict[str, Any], cfg: Config, src_spm: SubwordModel, tgt_spm: SubwordModel,
                    path: Path) -> None:
    """Refuse a checkpoint made with another model config or another vocabulary."""
    mine = cfg.to_dict()["model"]
    theirs = payload["config"].get("model", {})
    if theirs.get("arch") != mine["arch"]:
        raise MtkitError(f"cannot resume from {path}: it holds model.arch '{theirs.get('arch')}', the config says '{mine['arch']}'")
    k = min((k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)), default=None)
    if k is not None:
        raise MtkitError(f"cannot resume from {path}: model.{k} is {theirs.get(k)!r} there, {mine.get(k)!r} in the config")
    vocab = payload["vocab"]
    if (vocab["src_size"], vocab["tgt_size"]) != (src_spm.size, tgt_spm.size) or (
        payload["spm"]["src"] != src_spm.model_bytes or payload["spm"]["tgt"] != tgt_spm.model_bytes
    ):
        raise MtkitError(f"cannot resume from {path}: it was trained with another vocabulary than this data dir's")


def rng_states(ranks: RankGroup) -> dict[str, Any]:
    """This process's RNG state; on several ranks, every rank's (gathered, same on all)."""
    local: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and ranks.device.type == "cuda":
        local["cuda"] = torch.cuda.get_rng_state_all()
    if not ranks.distributed:
        return local
    every_rank = ranks.gather(local)
    return {**every_rank[0], "world_size": ranks.world_size, "ranks": every_rank}


def warn_world_size_change(payload: dict[str, Any], cfg: Config, world_size: int) -> None:
    """Say how the effective batch changes when the checkpoint was written by another number of ranks."""
    saved_world = int(payload["data_state"].get("world_size", 1))
    if saved_world == world_size:
        return
    train = cfg.train
    saved = payload["config"].get("train", {})
    old_f, old_t = saved.get("update_freq", train.update_freq), saved.get("max_tokens", train.max_tokens)
    old, new = saved_world * old_f * old_t, world_size * train.update_freq * train.max_tokens
    logger.warning(
        "the checkpoint was written by %d rank(s), this run has %d: the effective batch (ranks x update_freq x "
        "max_tokens) %s from %d x %d x %d = %d to %d x %d x %d = %d tokens; the data goes on from the first "
        "batch not yet seen", saved_world, world_size, "changes" if old != new else "stays the same",
        saved_world, old_f, old_t, old, world_size, train.update_freq, train.max_tokens, new,
    )


def restore_rng_states(payload: dict[str, Any], ranks: RankGroup, seed: int, update: int) -> None:
    """Every rank takes its own saved RNG state; after a change in the number of ranks, rank 0
    takes the saved rank 0's and the others start fresh streams (seeded by rank and update)."""
    rng = payload["rng"]
    saved_world = int(payload["data_state"].get("world_size", 1))
    if saved_world == ranks.world_size and "ranks" in rng:
        mine = rng["ranks"][ranks.rank]
    elif ranks.rank == 0:
        mine = rng
    else:
        mine = {}
        torch.manual_seed(rank_seed(seed, ranks.rank) + 1_000_033 * update)
    if "torch" in mine:
        torch.set_rng_state(mine["torch"])
    if "cuda" in mine and ranks.device.type == "cuda":
        torch.cuda.set_rng_state_all(list(mine["cuda"]))

"""``mtkit train`` behind its options: the oneDNN cache limits, the resolved config, launching
local data-parallel ranks, or training in this process."""

from __future__ import annotations

import json
from collections.abc import Sequence

from mtkit.errors import MtkitError


def train_command(
    data_dir: str, config: str, save_dir: str, overrides: Sequence[str], resume: bool, device: str, nproc: int,
    dump_config_only: bool, verbosity: int = 0, debug: bool = False,
) -> tuple[int, str]:
    """Print the resolved config (``dump_config_only``), launch ``nproc`` > 1 local ranks through
    torchrun, or train in this process. Returns (exit code, text for stdout: the YAML config, or
    rank 0's JSON summary line)."""
    from mtkit import utils

    utils.limit_onednn_caches()  # before the first matmul (see there)
    from mtkit.config import dump_config, load_config
    from mtkit.training.distributed import distributed_env, launch_local, rank_train_args
    from mtkit.training.trainer import train

    cfg = load_config(config, overrides)
    if dump_config_only:
        return 0, dump_config(cfg)
    if nproc > 1:
        args = rank_train_args(data_dir, config, save_dir, overrides, resume, device, verbosity, debug)
        return launch_local(nproc, args, device=device), ""
    if nproc < 0:
        raise MtkitError(f"--nproc must be positive, got {nproc}")
    summary = train(data_dir, cfg, save_dir, resume=resume, device=device)
    return 0, json.dumps(summary) + "\n" if distributed_env()[0] == 0 else ""

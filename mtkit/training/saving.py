"""The checkpoint files of a save dir: ``checkpoint_last.pt``, ``checkpoint_best.pt`` and the
numbered ``checkpoint_<update>.pt`` kept by rotation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtkit.checkpoint import BEST, LAST, link_or_copy, numbered_checkpoints, save_checkpoint


def write_checkpoints(save_dir: Path, payload: dict[str, Any], update: int, numbered: bool, best: bool,
                      keep_last: int) -> None:
    """Write ``payload`` as ``checkpoint_last.pt`` (and first as ``checkpoint_<update>.pt`` when
    ``numbered``), as ``checkpoint_best.pt`` too when ``best``; then keep the ``keep_last`` newest
    numbered checkpoints."""
    save_dir.mkdir(parents=True, exist_ok=True)
    last = save_dir / LAST
    if numbered:
        path = save_dir / f"checkpoint_{update}.pt"
        save_checkpoint(path, payload)
        link_or_copy(path, last)
    else:
        save_checkpoint(last, payload)
    if best:
        link_or_copy(last, save_dir / BEST)
    rotate(save_dir, keep_last)


def rotate(save_dir: Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest numbered checkpoints."""
    numbered = numbered_checkpoints(save_dir)
    for _, p in numbered[: max(len(numbered) - keep_last, 0)]:
        p.unlink()

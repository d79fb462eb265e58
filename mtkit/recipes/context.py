"""What the stages of a recipe run share: the stage names, the run's context (recipe, work
directory, each finished stage's outputs) and the completion markers in ``WORKDIR/stages``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from mtkit.data.catalog import Catalog
from mtkit.recipes.schema import Recipe
from mtkit.utils import atomic_write_text

logger = logging.getLogger("mtkit.recipes")

STAGES = ("prepare", "preprocess", "train", "average", "translate", "score")


def short_hash(obj: Any) -> str:
    """16 hex digits of the SHA-256 of ``obj`` as sorted-key JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass
class RunContext:
    recipe: Recipe
    workdir: Path
    data_dir: Any = None
    device: str = "auto"
    catalog: Catalog | None = None
    outputs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)  # of this run (mtkit.provenance)

    @property
    def raw_dir(self) -> Path:
        return self.workdir / "raw"

    @property
    def data_path(self) -> Path:
        return self.workdir / "data"

    @property
    def save_dir(self) -> Path:
        return self.workdir / "checkpoints"

    @property
    def hyp_dir(self) -> Path:
        return self.workdir / "translations"


class Markers:
    """Completion markers: ``WORKDIR/stages/<stage>.json``, written atomically."""

    def __init__(self, workdir: Path):
        self.dir = workdir / "stages"

    def path(self, stage: str) -> Path:
        return self.dir / f"{stage}.json"

    def read(self, stage: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.path(stage).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            logger.warning("marker %s is unreadable; redoing stage %s", self.path(stage), stage)
            return None

    def write(self, stage: str, marker: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path(stage), json.dumps(marker, indent=1, default=str) + "\n")

    def remove(self, stage: str) -> None:
        self.path(stage).unlink(missing_ok=True)

    def stage_seconds(self) -> dict[str, Any]:
        """The seconds each finished stage took, in stage order."""
        markers = {stage: self.read(stage) for stage in STAGES}
        return {stage: m.get("seconds") for stage, m in markers.items() if m and m.get("status") == "done"}

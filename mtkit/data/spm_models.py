"""The sentencepiece models of a preprocessed data dir: trained on a seeded uniform sample of the
training text (both sides for a joint model), or loaded from given files; written beside the shards."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

from mtkit.data.binarize import SplitFiles
from mtkit.data.subword import SubwordModel, train_sentencepiece
from mtkit.data.text import display_name, iter_parallel
from mtkit.errors import MtkitError
from mtkit.utils import progress

logger = logging.getLogger("mtkit.preprocess")

SPM_TRAIN_SENTENCES = 1_000_000  # at most this many sentences (per model) train sentencepiece


def load_models(paths: Sequence[str | Path]) -> tuple[SubwordModel, SubwordModel]:
    """The (source, target) models from one file (joint) or two; they must agree on special ids."""
    models = [SubwordModel.from_file(p) for p in paths]
    src, tgt = models[0], models[-1]
    for attr in ("pad", "bos", "eos", "unk"):
        if getattr(src, attr) != getattr(tgt, attr):
            raise MtkitError(
                f"sentencepiece models {paths[0]} and {paths[1]} disagree on the {attr} id "
                f"({getattr(src, attr)} vs {getattr(tgt, attr)})"
            )
    return src, tgt


class Reservoir:
    """A uniform sample of at most ``size`` items from a stream (algorithm R), seeded."""

    def __init__(self, size: int, seed: int = 1):
        self.size, self.seen, self.items = size, 0, []
        self.rng = random.Random(seed)

    def add(self, item: str) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(item)
        else:
            j = self.rng.randrange(self.seen)
            if j < self.size:
                self.items[j] = item


def train_models(
    train: SplitFiles, vocab_size: int, model_type: str, joint: bool, character_coverage: float,
    user_defined_symbols: Sequence[str], workers: int,
) -> tuple[SubwordModel, SubwordModel]:
    """Train sentencepiece on a sample of the non-empty training lines (both sides if joint)."""
    src_sample = Reservoir(SPM_TRAIN_SENTENCES, seed=1)
    tgt_sample = src_sample if joint else Reservoir(SPM_TRAIN_SENTENCES, seed=2)
    pairs = src_lines = tgt_lines = 0  # pairs read, non-empty lines per side
    for src, tgt in progress(iter_parallel(train.src, train.tgt), desc="read train", unit="pairs"):
        pairs += 1
        if src.strip():
            src_lines += 1
            src_sample.add(src)
        if tgt.strip():
            tgt_lines += 1
            tgt_sample.add(tgt)
    train.pairs = pairs
    where = f"{display_name(train.src)} / {display_name(train.tgt)}"
    if pairs == 0:
        raise MtkitError(f"training corpus {where} is empty")
    if not src_lines or not tgt_lines:
        empty = display_name(train.src if not src_lines else train.tgt)
        raise MtkitError(f"training file {empty} has only empty lines")

    def fit(sample: Reservoir, side: str) -> SubwordModel:
        logger.info("training %s %s sentencepiece model (vocab %d) on %d of %d sentences",
                    side, model_type, vocab_size, len(sample.items), sample.seen)
        try:
            return train_sentencepiece(
                sample.items, vocab_size, model_type, character_coverage, user_defined_symbols,
                input_sentence_size=0, num_threads=workers,  # 0: all (already sampled)
            )
        except MtkitError as exc:
            raise MtkitError(f"{exc} ({side} model, trained on {where})") from None

    if joint:
        model = fit(src_sample, "joint")
        return model, model
    return fit(src_sample, "source"), fit(tgt_sample, "target")


def write_models(
    tmp: Path, src: SubwordModel, tgt: SubwordModel, joint: bool, src_lang: str, tgt_lang: str
) -> dict[str, dict[str, str]]:
    """Write the models into ``tmp`` (``spm.model``, or one per language); returns their file
    names and sha256 for the manifest."""
    info = {}
    for side, model, lang in (("src", src, src_lang), ("tgt", tgt, tgt_lang)):
        name = "spm.model" if joint else f"spm.{lang}.model"
        (tmp / name).write_bytes(model.model_bytes)
        info[side] = {"file": name, "sha256": model.sha256}
    return info

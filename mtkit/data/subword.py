"""SentencePiece models: train, load (from a file or checkpoint bytes), encode, decode; and a data
dir's models, trained on a seeded uniform sample of the training text (both sides for a joint
model) or loaded from given files, written beside the shards. mtkit trains its models with fixed
special ids pad=0, unk=1, bos=2, eos=3; a user-supplied model keeps its own ids, and if it has no
pad piece, the id ``len(model)`` is pad and the vocabulary seen by the models grows by one."""

from __future__ import annotations

import hashlib
import io
import logging
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from mtkit.data.text import SplitFiles, display_name, iter_parallel
from mtkit.errors import MtkitError
from mtkit.utils import progress

logger = logging.getLogger("mtkit.preprocess")

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPM_TRAIN_SENTENCES = 1_000_000  # at most this many sentences (per model) train sentencepiece


class SubwordModel:
    """A loaded sentencepiece model plus the special ids the translators use."""

    def __init__(self, model_bytes: bytes, name: str = "<bytes>"):
        self.model_bytes = model_bytes
        self.name = name
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_bytes)
        except Exception:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise MtkitError(f"{name} is not a sentencepiece model") from None
        n = self.sp.get_piece_size()
        self.unk, self.bos, self.eos = self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()
        if self.bos < 0 or self.eos < 0:
            raise MtkitError(f"sentencepiece model {name} needs bos and eos pieces")
        self.pad = self.sp.pad_id() if self.sp.pad_id() >= 0 else n
        self.size = max(n, self.pad + 1)

    @classmethod
    def from_file(cls, path: str | Path) -> SubwordModel:
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise MtkitError(f"sentencepiece model not found: {path}") from None
        except IsADirectoryError:
            raise MtkitError(f"sentencepiece model path is a directory: {path}") from None
        return cls(data, str(path))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model_bytes).hexdigest()

    def __len__(self) -> int:
        return self.size

    def encode(self, lines: Sequence[str]) -> list[list[int]]:
        lines = list(lines)
        if len(lines) < 16:  # a list costs sentencepiece a thread pool: ~0.1 ms, five lines' encoding
            return [self.sp.encode(line, out_type=int) for line in lines]
        return self.sp.encode(lines, out_type=int)

    def encode_pieces(self, lines: Sequence[str]) -> list[list[str]]:
        return self.sp.encode(list(lines), out_type=str)

    def decode(self, ids: Iterable[Sequence[int]]) -> list[str]:
        specials = {self.pad, self.bos, self.eos}
        return [self.sp.decode([int(i) for i in seq if int(i) not in specials]) for seq in ids]

    def id_to_piece(self, ids: Sequence[int]) -> list[str]:
        n = self.sp.get_piece_size()
        return [self.sp.id_to_piece(int(i)) if int(i) < n else "<pad>" for i in ids]

    def decode_pieces(self, pieces: Sequence[Sequence[str]]) -> list[str]:
        return [self.sp.decode_pieces(list(p)) for p in pieces]


def train_sentencepiece(
    sentences: Iterable[str], vocab_size: int, model_type: str = "bpe", character_coverage: float = 1.0,
    user_defined_symbols: Sequence[str] = (), input_sentence_size: int = 2_000_000, num_threads: int = 2,
) -> SubwordModel:
    """Train a model in memory from an iterator of sentences; returns it loaded."""
    proto = io.BytesIO()
    kwargs = dict(
        sentence_iterator=iter(sentences), model_writer=proto, vocab_size=vocab_size, model_type=model_type,
        character_coverage=character_coverage, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        input_sentence_size=input_sentence_size, shuffle_input_sentence=True, num_threads=num_threads,
        max_sentence_length=1 << 16, minloglevel=2,
    )
    if user_defined_symbols:
        kwargs["user_defined_symbols"] = list(user_defined_symbols)
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except RuntimeError as exc:
        raise MtkitError(_training_error(str(exc), vocab_size)) from None
    return SubwordModel(proto.getvalue(), "<trained>")


def _training_error(text: str, vocab_size: int) -> str:
    """Turn sentencepiece's C++ error text into one line a user can act on."""
    msg = text.strip().splitlines()[-1] if text.strip() else "training failed"
    if high := re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", msg):
        return f"vocab size {vocab_size} is too large for this data (at most {high.group(2)} pieces possible)"
    if low := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg):
        return (
            f"vocab size {vocab_size} is too small: the data needs at least {low.group(2)} pieces "
            "(characters + special pieces); raise the vocab size or lower the character coverage"
        )
    if "sentences_.empty()" in msg:
        return "sentencepiece training failed: no training sentences"
    return "sentencepiece training failed: " + re.sub(r"^\w+: src/\S+ ", "", msg)


# --- the models of a preprocessed data dir ---------------------------------------------------

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
        elif (j := self.rng.randrange(self.seen)) < self.size:
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

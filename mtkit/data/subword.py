"""SentencePiece models: train, load (from a file or checkpoint bytes), encode, decode.

mtkit trains its models with fixed special ids: pad=0, unk=1, bos=2, eos=3. A user-supplied
model keeps its own ids; if it has no pad piece, the id ``len(model)`` is used as pad and the
vocabulary seen by the models grows by one.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from mtkit.errors import MtkitError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


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
        return self.sp.encode(list(lines), out_type=int)

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
    seed_sentencepieces: int | None = None,
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
    if seed_sentencepieces:
        kwargs["seed_sentencepiece_size"] = seed_sentencepieces
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except RuntimeError as exc:
        raise MtkitError(_training_error(str(exc), vocab_size)) from None
    return SubwordModel(proto.getvalue(), "<trained>")


def _training_error(text: str, vocab_size: int) -> str:
    """Turn sentencepiece's C++ error text into one line a user can act on."""
    msg = text.strip().splitlines()[-1] if text.strip() else "training failed"
    high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", msg)
    if high:
        return f"vocab size {vocab_size} is too large for this data (at most {high.group(2)} pieces possible)"
    low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
    if low:
        return (
            f"vocab size {vocab_size} is too small: the data needs at least {low.group(2)} pieces "
            "(characters + special pieces); raise the vocab size or lower the character coverage"
        )
    if "sentences_.empty()" in msg:
        return "sentencepiece training failed: no training sentences"
    msg = re.sub(r"^\w+: src/\S+ ", "", msg)
    return f"sentencepiece training failed: {msg}"

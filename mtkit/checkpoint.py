"""One checkpoint format for every model family: atomic writes, checksummed reads.

File layout: the 8-byte magic ``MTKITCK1``, the 32-byte SHA-256 of the rest, then a ``torch.save``
payload: a dict of plain types and tensors (loaded with ``weights_only=True``):

- ``format_version`` (int), ``mtkit_version`` (str)
- ``config``: the resolved config as a nested dict (``Config.to_dict()``)
- ``spm``: {"src": bytes, "tgt": bytes} sentencepiece models (the same bytes when joint)
- ``vocab``: {"src_size", "tgt_size", "pad", "bos", "eos", "unk", "joint"}
- ``model``: the model's state dict
- resuming (optional for inference): ``optimizer``, ``scheduler``, ``update`` (int), ``epoch``,
  ``data_state`` (dict), ``rng`` (torch CPU/CUDA RNG states; under DDP also ``ranks``, every
  rank's states, and ``world_size``), ``scaler``
- ``metrics``: the latest validation {"loss", "ppl", "bleu", ...} at the time of saving
- ``train_state``: trainer bookkeeping (best metric, bad-update count, elapsed time, ...)
- ``provenance`` (optional; absent in checkpoints of mtkit before it was recorded): versions,
  command line, machine, seed and data manifest hash of the run (:mod:`mtkit.provenance`)

Every payload is assembled by :func:`build_payload`; training, averaging, decoding, scoring and
export all go through this module. Writes go to ``<name>.tmp-<pid>`` in the same directory, fsynced
and renamed over the target: an interrupted write never replaces the previous good checkpoint, and
the next write of that checkpoint removes the temp file of a writer killed outright.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mtkit import __version__
from mtkit.errors import MtkitError
from mtkit.utils import atomic_path

if TYPE_CHECKING:
    from mtkit.config import Config
    from mtkit.data.subword import SubwordModel
    from mtkit.models.base import Seq2Seq

LAST, BEST = "checkpoint_last.pt", "checkpoint_best.pt"  # a save dir's latest and best checkpoints
NUMBERED = re.compile(r"^checkpoint_(\d+)\.pt$")  # and its checkpoint_<update>.pt files
MAGIC = b"MTKITCK1"
HEADER = len(MAGIC) + 32
FORMAT_VERSION = 1
# What a payload may hold besides config, model, spm and vocab (see the module doc).
OPTIONAL_KEYS = frozenset({"format_version", "mtkit_version", "optimizer", "scheduler", "scaler", "update",
                           "epoch", "data_state", "rng", "metrics", "provenance", "train_state"})


def subword_entries(src_spm: SubwordModel, tgt_spm: SubwordModel) -> dict[str, dict[str, Any]]:
    """The ``spm`` and ``vocab`` entries of a payload for a model's source and target
    sentencepiece models (special ids from the target side; ``joint`` when the bytes agree)."""
    joint = src_spm.model_bytes == tgt_spm.model_bytes
    return {
        "spm": {"src": src_spm.model_bytes, "tgt": tgt_spm.model_bytes},
        "vocab": {
            "src_size": src_spm.size, "tgt_size": tgt_spm.size, "pad": tgt_spm.pad, "bos": tgt_spm.bos,
            "eos": tgt_spm.eos, "unk": tgt_spm.unk, "joint": joint,
        },
    }


def build_payload(
    config: dict[str, Any], model_state: dict[str, Any], spm: dict[str, bytes] | None = None,
    vocab: dict[str, Any] | None = None, **extra: Any,
) -> dict[str, Any]:
    """A checkpoint payload: the resolved config (``Config.to_dict()``), the model's state dict, the
    spm models and vocabulary (:func:`subword_entries`), any of :data:`OPTIONAL_KEYS`; None: left out."""
    unknown = sorted(set(extra) - OPTIONAL_KEYS)
    if unknown:
        raise ValueError(f"unknown checkpoint payload entries: {', '.join(unknown)}")
    payload = {"config": config, "spm": spm, "vocab": vocab, "model": model_state, **extra}
    return {key: value for key, value in payload.items() if value is not None}


class _OffsetReader(io.RawIOBase):
    """A read-only view of a file that starts ``offset`` bytes in (what torch.load reads)."""

    def __init__(self, f: io.BufferedReader, offset: int):
        self.f, self.offset = f, offset
        self.f.seek(offset)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self.f.readinto(b)

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos + self.offset if whence == 0 else pos, whence) - self.offset

    def tell(self) -> int:
        return self.f.tell() - self.offset


class _HashingWriter(io.RawIOBase):
    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.h.update(b)
        return self.f.write(b)


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically to ``path`` (temp file, fsync, rename)."""
    path = Path(path)
    payload = dict(payload)
    payload.setdefault("format_version", FORMAT_VERSION)
    payload.setdefault("mtkit_version", __version__)
    for old in path.parent.glob(f"{glob.escape(path.name)}.tmp-*"):  # temp files of writers killed mid-write
        pid = old.name.rsplit("-", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # no such process
            old.unlink(missing_ok=True)
        except PermissionError:  # somebody else's process
            pass
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(MAGIC + b"\0" * 32)
            writer = _HashingWriter(f)
            torch.save(payload, writer)
            f.seek(len(MAGIC))
            f.write(writer.h.digest())
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise MtkitError(f"could not write checkpoint {path}: {exc.strerror or exc}") from None
    with contextlib.suppress(OSError):  # make the rename durable, where the platform allows it
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def numbered_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """``[(update, path), ...]`` of the ``checkpoint_<update>.pt`` files in a directory, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.exists():
        raise MtkitError(f"checkpoint directory not found: {ckpt_dir}")
    if not ckpt_dir.is_dir():
        raise MtkitError(f"expected a checkpoint directory but {ckpt_dir} is a file")
    found = ((NUMBERED.match(p.name), p) for p in ckpt_dir.iterdir())
    return sorted((int(m.group(1)), p) for m, p in found if m and p.is_file())


def link_or_copy(src: Path, dst: Path) -> None:
    """Atomically make ``dst`` hold the bytes of ``src`` (a hard link where possible)."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def write_checkpoints(save_dir: Path, payload: dict[str, Any], update: int, numbered: bool, best: bool,
                      keep_last: int) -> None:
    """Write ``payload`` as ``checkpoint_last.pt`` (first as ``checkpoint_<update>.pt`` when ``numbered``),
    also as ``checkpoint_best.pt`` when ``best``; then keep the ``keep_last`` newest numbered ones."""
    save_dir.mkdir(parents=True, exist_ok=True)
    last = save_dir / LAST
    first = save_dir / f"checkpoint_{update}.pt" if numbered else last
    save_checkpoint(first, payload)
    if numbered:
        link_or_copy(first, last)
    if best:
        link_or_copy(last, save_dir / BEST)
    rotate(save_dir, keep_last)


def rotate(save_dir: Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest numbered checkpoints."""
    numbered = numbered_checkpoints(save_dir)
    for _, p in numbered[: max(len(numbered) - keep_last, 0)]:
        p.unlink()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and verify a checkpoint; any problem is a one-line :class:`MtkitError`."""
    path = Path(path)
    if not path.exists():
        raise MtkitError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise MtkitError(f"checkpoint path is a directory, not a file: {path}")
    with open(path, "rb") as f:
        head = f.read(HEADER)
        if len(head) < HEADER or head[: len(MAGIC)] != MAGIC:
            raise MtkitError(f"{path} is not an mtkit checkpoint")
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        if h.digest() != head[len(MAGIC) :]:
            raise MtkitError(f"checkpoint {path} is corrupt or truncated (checksum mismatch)")
        try:
            payload = torch.load(_OffsetReader(f, HEADER), map_location=map_location, weights_only=True)
        except Exception as exc:  # torch raises many types for a bad archive
            raise MtkitError(f"checkpoint {path} could not be read: {exc.__class__.__name__}") from None
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise MtkitError(f"{path} is not an mtkit checkpoint (no model/config)")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise MtkitError(f"checkpoint {path} was written by a newer mtkit (format {payload['format_version']})")
    return payload


def build_from_checkpoint(
    payload: dict[str, Any], path: str | Path = "<checkpoint>"
) -> tuple[Seq2Seq, Config, SubwordModel, SubwordModel]:
    """(model in eval mode on the payload's device, config, src and tgt SubwordModel) rebuilt from a
    loaded payload alone; weights that do not fit the model config: a one-line :class:`MtkitError`."""
    from mtkit.config import config_from_dict
    from mtkit.data.subword import SubwordModel
    from mtkit.models import build_model

    cfg = config_from_dict(payload["config"])
    src_spm, tgt_spm = (SubwordModel(payload["spm"][side], f"{path}:spm.{side}") for side in ("src", "tgt"))
    vocab = payload["vocab"]
    model = build_model(cfg.model, vocab["src_size"], vocab["tgt_size"], vocab["pad"])
    try:
        missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise MtkitError(f"checkpoint {path} does not match its model config: {str(exc).splitlines()[0]}") from None
    if missing or unexpected:
        raise MtkitError(
            f"checkpoint {path} does not match model '{cfg.model.arch}' "
            f"({'missing' if missing else 'unexpected'} weights: {', '.join((missing or unexpected)[:3])})"
        )
    model.eval()
    return model, cfg, src_spm, tgt_spm


def load_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[Seq2Seq, Config, SubwordModel, SubwordModel]:
    """Load a checkpoint file for inference: (model on device, config, src spm, tgt spm); the one way
    to a model (for the other entries too: :func:`load_checkpoint`, then :func:`build_from_checkpoint`)."""
    payload = load_checkpoint(path, map_location="cpu")
    model, cfg, src_spm, tgt_spm = build_from_checkpoint(payload, path)
    return model.to(device), cfg, src_spm, tgt_spm

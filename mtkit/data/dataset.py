"""Reading a preprocessed data dir: manifest, sentencepiece models and binarized splits. A split
``<name>`` has two files per language: ``<name>.<lang>.bin`` holds the token ids of all sentences
back to back (dtype from the manifest) and ``<name>.<lang>.idx`` n + 1 int64 offsets into it.
Datasets return ids without BOS/EOS; batching adds them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtkit.data.subword import SubwordModel
from mtkit.errors import MtkitError

DATA_FORMAT = 1  # version of the binarized layout written by preprocess; newer ones are refused
REQUIRED_KEYS = ("src_lang", "tgt_lang", "spm", "vocab", "splits", "dtype")


def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    """Read ``data_dir/manifest.json``; any problem is a one-line :class:`MtkitError`."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise MtkitError(f"data directory not found: {data_dir}")
    if not data_dir.is_dir():
        raise MtkitError(f"data directory {data_dir} is not a directory")
    path = data_dir / "manifest.json"
    if not path.exists():
        raise MtkitError(f"{data_dir} is not a preprocessed data directory (no manifest.json); "
                         "run mtkit preprocess")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MtkitError(f"{path} is corrupt ({exc.__class__.__name__})") from None
    if not isinstance(manifest, dict):
        raise MtkitError(f"{path} is corrupt (not a JSON object)")
    if missing := [k for k in REQUIRED_KEYS if k not in manifest]:
        raise MtkitError(f"{path} is incomplete: missing {', '.join(missing)}")
    if manifest.get("format", 1) > DATA_FORMAT:
        raise MtkitError(f"{path} was written by a newer mtkit (data format {manifest['format']})")
    return manifest


def load_spm(data_dir: str | Path) -> tuple[SubwordModel, SubwordModel]:
    """The (source, target) sentencepiece models of a data dir (one object twice when joint)."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    loaded: dict[str, SubwordModel] = {}
    for side in ("src", "tgt"):
        entry = manifest["spm"][side]
        if entry["file"] not in loaded:
            model = SubwordModel.from_file(data_dir / entry["file"])
            if model.sha256 != entry["sha256"]:
                raise MtkitError(f"{data_dir / entry['file']} does not match the sha256 in manifest.json")
            loaded[entry["file"]] = model
    return loaded[manifest["spm"]["src"]["file"]], loaded[manifest["spm"]["tgt"]["file"]]


class ParallelDataset:
    """One binarized split: ``ds[i] -> (src ids, tgt ids)`` as int64 arrays, plus length arrays.
    The ``.bin`` files are memory-mapped lazily (and again after unpickling, so the object can
    be handed to DataLoader worker processes without copying the corpus)."""

    def __init__(self, data_dir: str | Path, split: str):
        self.data_dir = Path(data_dir)
        self.split = split
        self.manifest = load_manifest(self.data_dir)
        splits = self.manifest["splits"]
        if split not in splits:
            raise MtkitError(f"split '{split}' not in {self.data_dir} (has: {', '.join(splits)})")
        self.src_lang, self.tgt_lang = self.manifest["src_lang"], self.manifest["tgt_lang"]
        self._files = {  # side -> (.bin path, .idx path, dtype)
            side: (self._path(lang, "bin"), self._path(lang, "idx"), self.manifest["dtype"][side])
            for side, lang in (("src", self.src_lang), ("tgt", self.tgt_lang))
        }
        self._offsets = {side: self._read_index(side) for side in ("src", "tgt")}
        n = splits[split]["pairs"]
        for side in ("src", "tgt"):
            if len(self._offsets[side]) != n + 1:
                got = len(self._offsets[side]) - 1
                raise MtkitError(f"{self._files[side][1]} holds {got} sentences, manifest.json says {n}")
        self.src_lens, self.tgt_lens = np.diff(self._offsets["src"]), np.diff(self._offsets["tgt"])
        self._data: dict[str, np.ndarray] | None = None

    def _path(self, lang: str, ext: str) -> Path:
        return self.data_dir / f"{self.split}.{lang}.{ext}"

    def _read_index(self, side: str) -> np.ndarray:
        bin_path, idx_path, dtype = self._files[side]
        try:
            offsets = np.fromfile(idx_path, dtype=np.int64)
            bin_size = bin_path.stat().st_size
        except FileNotFoundError as exc:
            raise MtkitError(f"missing data file {exc.filename} (re-run mtkit preprocess)") from None
        itemsize = np.dtype(dtype).itemsize
        bad_start = len(offsets) == 0 or offsets[0] != 0
        if bad_start or np.any(np.diff(offsets) < 0) or offsets[-1] * itemsize != bin_size:
            raise MtkitError(f"{idx_path} does not match {bin_path.name} (corrupt or truncated data)")
        return offsets

    def _open(self) -> dict[str, np.ndarray]:
        return {  # an empty file cannot be memory-mapped
            side: np.memmap(path, dtype=dtype, mode="r") if self._offsets[side][-1] else np.zeros(0, dtype)
            for side, (path, _, dtype) in self._files.items()
        }

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_data"] = None
        return state

    def __len__(self) -> int:
        return len(self.src_lens)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for split '{self.split}' of {n} pairs")
        i %= n
        if self._data is None:
            self._data = self._open()
        out = []
        for side in ("src", "tgt"):
            lo, hi = self._offsets[side][i], self._offsets[side][i + 1]
            out.append(np.asarray(self._data[side][lo:hi], dtype=np.int64))
        return out[0], out[1]


class ListDataset:
    """In-memory (src ids, tgt ids) pairs with the same interface as :class:`ParallelDataset`."""

    def __init__(self, src_seqs: Sequence[Sequence[int]], tgt_seqs: Sequence[Sequence[int]]):
        if len(src_seqs) != len(tgt_seqs):
            raise ValueError(f"{len(src_seqs)} source but {len(tgt_seqs)} target sequences")
        self.src = [np.asarray(s, dtype=np.int64) for s in src_seqs]
        self.tgt = [np.asarray(t, dtype=np.int64) for t in tgt_seqs]
        self.src_lens = np.array([len(s) for s in self.src], dtype=np.int64)
        self.tgt_lens = np.array([len(t) for t in self.tgt], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.src[i], self.tgt[i]

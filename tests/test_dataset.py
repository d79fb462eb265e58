import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from mtkit.data.batching import collate_source, collate_target, length_sorted_batches
from mtkit.data.dataset import ListDataset, ParallelDataset, load_manifest, load_spm
from mtkit.data.preprocess import preprocess
from mtkit.errors import MtkitError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


def write(prefix: Path, pairs) -> Path:
    for lang, side in (("en", 0), ("de", 1)):
        Path(f"{prefix}.{lang}").write_text(
            "".join(p[side] + "\n" for p in pairs), encoding="utf-8"
        )
    return prefix


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ds")
    rng = random.Random(0)
    pairs = []
    for _ in range(120):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 9))]
        pairs.append((" ".join(words), " ".join(w.upper() for w in reversed(words))))
    write(root / "train", pairs)
    write(root / "valid", pairs[:10] + [("", "")])
    write(root / "empty_test", [])
    preprocess(
        "en",
        "de",
        root / "train",
        root / "data",
        valid_prefix=root / "valid",
        test_prefixes=[root / "empty_test"],
        vocab_size=60,
        workers=1,
        max_ratio=0,
    )
    return root / "data"


def copy_dir(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_items_lengths_and_batching(data_dir):
    ds = ParallelDataset(data_dir, "train")
    manifest = load_manifest(data_dir)
    assert len(ds) == manifest["splits"]["train"]["pairs"] == 120
    assert ds.src_lens.dtype.kind == "i" and len(ds.src_lens) == len(ds.tgt_lens) == len(ds)
    for i in (0, 57, len(ds) - 1, -1):
        src, tgt = ds[i]
        assert src.dtype == np.int64 and len(src) == ds.src_lens[i] and len(tgt) == ds.tgt_lens[i]
        assert not {0, 2, 3} & set(src.tolist())  # no pad/bos/eos inside
    with pytest.raises(IndexError):
        ds[len(ds)]
    spm_src, spm_tgt = load_spm(data_dir)
    src, src_len = collate_source([ds[i][0] for i in range(4)], spm_src.pad, spm_src.eos)
    assert src_len.tolist() == [int(n) + 1 for n in ds.src_lens[:4]]
    tgt_in, tgt_out = collate_target(
        [ds[i][1] for i in range(4)], spm_tgt.pad, spm_tgt.bos, spm_tgt.eos
    )
    assert (tgt_in[:, 0] == spm_tgt.bos).all() and tgt_out[0, int(ds.tgt_lens[0])] == spm_tgt.eos
    # the target side is the upper-cased reversed source: check the text round trip
    text_src = spm_src.decode([ds[3][0]])[0]
    assert spm_tgt.decode([ds[3][1]])[0] == " ".join(w.upper() for w in reversed(text_src.split()))


def test_valid_keeps_empty_pair_and_empty_split_opens(data_dir):
    valid = ParallelDataset(data_dir, "valid")
    assert len(valid) == 11 and valid.src_lens[-1] == 0 and len(valid[10][1]) == 0
    empty = ParallelDataset(data_dir, "empty_test")
    assert len(empty) == 0 and empty.src_lens.shape == (0,)


def test_pickles_without_copying_data(data_dir):
    ds = ParallelDataset(data_dir, "train")
    ds[0]  # maps the files
    blob = pickle.dumps(ds)
    for lang in ("en", "de"):  # lengths and offsets travel, the token data does not
        assert (data_dir / f"train.{lang}.bin").read_bytes()[:64] not in blob
    again = pickle.loads(blob)
    assert all((a == b).all() for a, b in zip(again[42], ds[42]))


def test_list_dataset():
    ds = ListDataset([[5, 6], [7]], [[8], [9, 10, 11]])
    assert len(ds) == 2 and ds.src_lens.tolist() == [2, 1] and ds.tgt_lens.tolist() == [1, 3]
    src, tgt = ds[1]
    assert src.tolist() == [7] and tgt.tolist() == [9, 10, 11] and src.dtype == np.int64
    with pytest.raises(ValueError):
        ListDataset([[1]], [])


def test_unknown_split_and_missing_dir(data_dir, tmp_path):
    with pytest.raises(MtkitError, match="split 'test' not in .*has: train, valid, empty_test"):
        ParallelDataset(data_dir, "test")
    with pytest.raises(MtkitError, match="data directory not found"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(MtkitError, match="no manifest.json"):
        load_manifest(tmp_path)


def test_corrupt_manifest(data_dir, tmp_path):
    d = copy_dir(data_dir, tmp_path)
    (d / "manifest.json").write_text("{ not json")
    with pytest.raises(MtkitError, match="manifest.json is corrupt"):
        load_manifest(d)
    (d / "manifest.json").write_text(json.dumps({"src_lang": "en"}))
    with pytest.raises(MtkitError, match="missing tgt_lang"):
        load_manifest(d)


def test_truncated_or_missing_shards(data_dir, tmp_path):
    d = copy_dir(data_dir, tmp_path)
    data = (d / "train.de.bin").read_bytes()
    (d / "train.de.bin").write_bytes(data[:-4])
    with pytest.raises(MtkitError, match="train.de.idx does not match train.de.bin"):
        ParallelDataset(d, "train")
    (d / "valid.en.idx").unlink()
    with pytest.raises(MtkitError, match="missing data file .*valid.en.idx"):
        ParallelDataset(d, "valid")


def test_spm_checksum_checked(data_dir, tmp_path):
    d = copy_dir(data_dir, tmp_path)
    other = tmp_path / "other"
    write(tmp_path / "o", [("x y z w", "q r s t")] * 30)
    preprocess("en", "de", tmp_path / "o", other, vocab_size=20, workers=1)
    shutil.copy(other / "spm.model", d / "spm.model")
    with pytest.raises(MtkitError, match="does not match the sha256"):
        load_spm(d)


def test_length_sorted_batches_by_hand():
    lengths = [5, 1, 9, 3, 3, 7, 2]  # + EOS: 6 2 10 4 4 8 3; sorted (stable): 1 6 3 4 0 5 2
    assert [b.tolist() for b in length_sorted_batches(lengths, batch_size=3)] == [[1, 6, 3], [4, 0, 5], [2]]
    # budget 12 padded tokens: [1 6 3] is 3 x 4; [4 0] 2 x 6; [5] 8 (with 2: 2 x 10); [2] 10
    assert [b.tolist() for b in length_sorted_batches(lengths, max_tokens=12)] == [[1, 6, 3], [4, 0], [5], [2]]
    # a sentence over the budget gets a batch of its own
    assert [b.tolist() for b in length_sorted_batches([30, 1], max_tokens=12)] == [[1], [0]]
    assert length_sorted_batches([], batch_size=2) == [] and length_sorted_batches([], max_tokens=5) == []


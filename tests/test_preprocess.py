import gzip
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import mtkit.data.binarize as binarize
import mtkit.data.subword as subword
from mtkit.cli import main
from mtkit.data.binarize import EMPTY, KEEP, RATIO, TOO_LONG, DuplicateFilter, filter_codes
from mtkit.data.dataset import ParallelDataset, load_manifest, load_spm
from mtkit.data.preprocess import preprocess
from mtkit.data.subword import Reservoir, SubwordModel
from mtkit.data.text import iter_lines, iter_parallel
from mtkit.errors import MtkitError

EN = "the a cat dog sat ran on under mat table red blue big small house garden green tree bird sings".split()
DE = "der die das katze hund sass lief auf unter matte tisch rot blau gross klein haus garten gruen baum vogel".split()
MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"  # shared/ beside the repo


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        k = rng.randint(3, 10)
        pairs.append(
            (
                " ".join(rng.choice(EN) for _ in range(k)),
                " ".join(rng.choice(DE) for _ in range(k + rng.randint(-1, 2))),
            )
        )
    return pairs


def write_corpus(prefix: Path, pairs, gz: bool = False, src: str = "en", tgt: str = "de") -> Path:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for lang, side in ((src, 0), (tgt, 1)):
        data = "".join(p[side] + "\n" for p in pairs).encode()
        if gz:
            Path(f"{prefix}.{lang}.gz").write_bytes(gzip.compress(data))
        else:
            Path(f"{prefix}.{lang}").write_bytes(data)
    return prefix


def run(tmp_path: Path, train_pairs, out="data", **kw):
    train = write_corpus(tmp_path / "raw" / "train", train_pairs)
    kw.setdefault("vocab_size", 60)
    kw.setdefault("workers", 1)
    return preprocess("en", "de", train, tmp_path / out, **kw), tmp_path / out


def decoded(data_dir: Path, split: str) -> tuple[list[str], list[str]]:
    src_spm, tgt_spm = load_spm(data_dir)
    ds = ParallelDataset(data_dir, split)
    return (
        src_spm.decode([ds[i][0] for i in range(len(ds))]),
        tgt_spm.decode([ds[i][1] for i in range(len(ds))]),
    )


def normalized(model: SubwordModel, lines) -> list[str]:
    return [model.sp.decode(model.sp.encode(line)) for line in lines]


# --- round trip, layouts, models --------------------------------------------------------------


def test_joint_round_trip_and_manifest(tmp_path):
    pairs = make_pairs(300)
    valid = make_pairs(20, seed=1) + [("", "")]  # valid keeps an empty pair
    write_corpus(tmp_path / "raw" / "dev", valid)
    write_corpus(tmp_path / "raw" / "news_test", make_pairs(15, seed=2))
    manifest, out = run(
        tmp_path,
        pairs,
        valid_prefix=tmp_path / "raw" / "dev",
        test_prefixes=[tmp_path / "raw" / "news_test"],
        max_ratio=0,
    )
    assert manifest == load_manifest(out)
    assert manifest["joint"] is True and manifest["spm"]["src"]["file"] == "spm.model"
    assert set(manifest["splits"]) == {"train", "valid", "news_test"}
    assert manifest["vocab"] == {
        "src_size": 60,
        "tgt_size": 60,
        "pad": 0,
        "bos": 2,
        "eos": 3,
        "unk": 1,
    }
    assert manifest["dtype"] == {"src": "uint16", "tgt": "uint16"}
    assert (
        manifest["splits"]["valid"]["pairs"] == 21
        and manifest["splits"]["news_test"]["pairs"] == 15
    )
    assert manifest["filters"]["input_pairs"] == 300
    assert manifest["splits"]["train"]["pairs"] == 300 - sum(
        manifest["filters"]["dropped"].values()
    )
    src_spm, tgt_spm = load_spm(out)
    assert src_spm is tgt_spm and src_spm.sha256 == manifest["spm"]["src"]["sha256"]
    for split, split_pairs in (("train", pairs), ("valid", valid)):
        ds = ParallelDataset(out, split)
        src, tgt = decoded(out, split)
        assert src == normalized(src_spm, [p[0] for p in split_pairs])
        assert tgt == normalized(tgt_spm, [p[1] for p in split_pairs])
        assert int(ds.src_lens.sum()) == manifest["splits"][split]["src_tokens"]
        assert int(ds.tgt_lens.max()) == manifest["splits"][split]["tgt_max_len"]
        idx = np.fromfile(out / f"{split}.en.idx", dtype=np.int64)
        assert (
            len(idx) == len(split_pairs) + 1
            and idx[-1] * 2 == (out / f"{split}.en.bin").stat().st_size
        )
    assert ParallelDataset(out, "valid").src_lens[-1] == 0  # empty line kept as empty
    assert not list(tmp_path.glob(".data.tmp-*"))


def test_separate_models(tmp_path):
    manifest, out = run(tmp_path, make_pairs(300), joint=False, vocab_size=40)
    assert manifest["joint"] is False
    assert (
        manifest["spm"]["src"]["file"] == "spm.en.model"
        and manifest["spm"]["tgt"]["file"] == "spm.de.model"
    )
    src_spm, tgt_spm = load_spm(out)
    assert src_spm.sha256 != tgt_spm.sha256
    # each side's model knows only its own language's characters
    assert "▁katze" not in {src_spm.sp.id_to_piece(i) for i in range(src_spm.size)}
    src, tgt = decoded(out, "train")
    pairs = make_pairs(300)
    assert src == normalized(src_spm, [p[0] for p in pairs])
    assert tgt == normalized(tgt_spm, [p[1] for p in pairs])


def test_reuse_spm_models(tmp_path):
    pairs = make_pairs(200)
    first, out1 = run(tmp_path, pairs, out="a", max_ratio=0)
    again, out2 = run(
        tmp_path, pairs, out="b", max_ratio=0, spm_models=[out1 / "spm.model"], vocab_size=9999
    )
    assert again["joint"] is True and again["spm"] == first["spm"]
    assert (out2 / "train.en.bin").read_bytes() == (out1 / "train.en.bin").read_bytes()
    assert (out2 / "train.de.idx").read_bytes() == (out1 / "train.de.idx").read_bytes()

    sep, out3 = run(tmp_path, pairs, out="c", joint=False, vocab_size=40, max_ratio=0)
    reused, out4 = run(
        tmp_path,
        pairs,
        out="d",
        max_ratio=0,
        spm_models=[out3 / "spm.en.model", out3 / "spm.de.model"],
    )
    assert (
        reused["joint"] is False and reused["spm"]["tgt"]["sha256"] == sep["spm"]["tgt"]["sha256"]
    )
    assert (out4 / "train.de.bin").read_bytes() == (out3 / "train.de.bin").read_bytes()

    with pytest.raises(MtkitError, match="one model .joint. or two"):
        run(tmp_path, pairs, out="e", spm_models=[out1 / "spm.model"] * 3)
    with pytest.raises(MtkitError, match="not found"):
        run(tmp_path, pairs, out="f", spm_models=[tmp_path / "nope.model"])


def test_gz_input_same_as_plain(tmp_path):
    pairs = make_pairs(200)
    plain = write_corpus(tmp_path / "plain" / "train", pairs)
    packed = write_corpus(tmp_path / "gz" / "train", pairs, gz=True)
    m1 = preprocess("en", "de", plain, tmp_path / "o1", vocab_size=60, workers=1)
    m2 = preprocess("en", "de", packed, tmp_path / "o2", vocab_size=60, workers=1)
    assert m2["splits"]["train"]["src_files"] == [f"{packed}.en.gz"]
    assert m1["spm"] == m2["spm"]
    for name in ("train.en.bin", "train.de.bin", "train.en.idx"):
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes()


def test_a_gz_name_on_plain_text_is_reported_as_not_gzip(tmp_path):
    fake = tmp_path / "train.en.gz"
    fake.write_text("plain text\n")
    with pytest.raises(MtkitError, match=f"{fake}: not a gzip file"):
        list(iter_lines(fake))
    empty = tmp_path / "empty.gz"
    empty.write_bytes(b"")
    assert list(iter_lines(empty)) == []  # nothing to misread
    real = tmp_path / "real.txt"
    real.write_bytes(gzip.compress(b"a\nb\n"))  # gzip under another name is still read
    assert list(iter_lines(real)) == ["a", "b"]


def test_workers_and_chunks_do_not_change_output(tmp_path, monkeypatch):
    pairs = make_pairs(250) + make_pairs(30)  # duplicates across chunks
    m1, out1 = run(tmp_path, pairs, out="one", dedup=True, workers=1)
    monkeypatch.setattr(binarize, "CHUNK_PAIRS", 17)
    m2, out2 = run(
        tmp_path, pairs, out="two", spm_models=[out1 / "spm.model"], dedup=True, workers=2
    )
    assert m1["filters"] == m2["filters"] and m1["filters"]["dropped"]["duplicate"] == 30
    for name in ("train.en.bin", "train.de.bin", "train.en.idx", "train.de.idx"):
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes()


def test_unigram_and_user_defined_symbols(tmp_path):
    pairs = [(f"<2de> {s}", t) for s, t in make_pairs(300)]
    _, out = run(
        tmp_path, pairs, model_type="unigram", vocab_size=55, user_defined_symbols=["<2de>"]
    )
    src_spm, _ = load_spm(out)
    ds = ParallelDataset(out, "train")
    tag = src_spm.sp.piece_to_id("<2de>")
    assert tag != src_spm.unk
    for i in range(len(ds)):
        src = ds[i][0].tolist()
        assert src.count(tag) == 1 and src.index(tag) <= 1  # kept whole, at the start


# --- filters ---------------------------------------------------------------------------------


def test_filter_codes_by_hand():
    src = np.array([0, 3, 9, 2, 4, 5, 1])
    tgt = np.array([4, 0, 2, 7, 4, 12, 3])
    codes = filter_codes(src, tgt, max_len=8, max_ratio=3.0)
    assert codes.tolist() == [
        EMPTY,
        EMPTY,
        TOO_LONG,
        RATIO,
        KEEP,
        TOO_LONG,
        KEEP,
    ]  # 1 vs 3: ratio 3 kept
    assert filter_codes(src, tgt, max_len=0, max_ratio=0).tolist() == [
        EMPTY,
        EMPTY,
        KEEP,
        KEEP,
        KEEP,
        KEEP,
        KEEP,
    ]


def test_each_filter_counted(tmp_path):
    base = make_pairs(300)
    empty = [("", "der hund"), ("the cat", "   "), ("", "")]
    long_ = [(" ".join(["table"] * 100), " ".join(["tisch"] * 100))]
    ratio = [("cat", "der hund sass auf der matte unter dem tisch rot blau gross klein haus")] * 2
    dups = base[:7]
    pairs = base + empty + long_ + ratio + dups
    random.Random(3).shuffle(pairs)
    manifest, out = run(tmp_path, pairs, max_len=80, max_ratio=3.0, dedup=True)
    dropped = manifest["filters"]["dropped"]
    assert dropped["empty"] == 3 and dropped["max_len"] == 1
    assert dropped["ratio"] >= 1  # the second copy of the ratio pair may count as ratio too
    # independent recount on the real encoded lengths
    spm_model, _ = load_spm(out)
    lens = [(len(spm_model.sp.encode(s)), len(spm_model.sp.encode(t))) for s, t in pairs]
    codes = filter_codes(np.array([a for a, _ in lens]), np.array([b for _, b in lens]), 80, 3.0)
    assert dropped["ratio"] == int((codes == RATIO).sum())
    kept_text = [p for p, c in zip(pairs, codes) if c == KEEP]
    unique = list(dict.fromkeys(kept_text))
    assert dropped["duplicate"] == len(kept_text) - len(unique)
    assert manifest["splits"]["train"]["pairs"] == len(unique) == manifest["filters"]["kept"]
    assert manifest["filters"]["input_pairs"] == len(pairs)
    src, tgt = decoded(out, "train")
    assert list(zip(src, tgt)) == [
        (a, b)
        for a, b in zip(
            normalized(spm_model, [p[0] for p in unique]),
            normalized(spm_model, [p[1] for p in unique]),
        )
    ]
    ds = ParallelDataset(out, "train")
    assert ds.src_lens.max() <= 80 and ds.tgt_lens.max() <= 80 and ds.src_lens.min() > 0


def test_without_dedup_duplicates_are_kept(tmp_path):
    pairs = make_pairs(200) + make_pairs(50)
    manifest, _ = run(tmp_path, pairs, max_ratio=0)
    assert "duplicate" not in manifest["filters"]["dropped"]
    assert manifest["splits"]["train"]["pairs"] == 250


def test_valid_and_test_are_never_filtered(tmp_path):
    odd = [
        ("", "der hund"),
        ("cat", "der hund sass auf der matte unter dem tisch rot blau"),
        (" ".join(["table"] * 40), "tisch"),
    ] + make_pairs(5, seed=9) * 2
    write_corpus(tmp_path / "raw" / "valid", odd)
    write_corpus(tmp_path / "raw" / "t1", odd)
    manifest, out = run(
        tmp_path,
        make_pairs(300),
        valid_prefix=tmp_path / "raw" / "valid",
        test_prefixes=[tmp_path / "raw" / "t1"],
        max_len=20,
        dedup=True,
    )
    for split in ("valid", "t1"):
        assert manifest["splits"][split]["pairs"] == len(odd)
        ds = ParallelDataset(out, split)
        assert ds.src_lens[0] == 0 and ds.src_lens[2] > 20


def test_dedup_filter_matches_python_set():
    rng = np.random.default_rng(0)
    seen_py: set[int] = set()
    f = DuplicateFilter()
    for _ in range(40):
        batch = rng.integers(0, 2000, size=rng.integers(1, 200)).astype(np.uint64)
        expect = []
        for h in batch.tolist():
            expect.append(h not in seen_py)
            seen_py.add(h)
        assert f.first_seen(batch).tolist() == expect
    assert len(f) == len(seen_py) and len(f.runs) <= 12


def test_reservoir_is_bounded_and_uniform():
    r = Reservoir(10, seed=5)
    for i in range(1000):
        r.add(str(i))
    assert len(r.items) == 10 and len(set(r.items)) == 10 and r.seen == 1000
    assert max(int(x) for x in r.items) > 100  # not just the first items
    hits = np.zeros(10)
    for seed in range(300):
        r = Reservoir(3, seed=seed)
        for i in range(10):
            r.add(str(i))
        for x in r.items:
            hits[int(x)] += 1
    assert hits.min() > 40 and hits.max() < 140  # expected 90 each


def test_spm_trains_on_a_bounded_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(subword, "SPM_TRAIN_SENTENCES", 50)
    seen = {}
    real = subword.train_sentencepiece

    def spy(sentences, *args, **kwargs):
        seen["n"] = len(sentences)
        return real(sentences, *args, **kwargs)

    monkeypatch.setattr(subword, "train_sentencepiece", spy)
    manifest, _ = run(tmp_path, make_pairs(300), vocab_size=50)
    assert seen["n"] == 50 and manifest["splits"]["train"]["pairs"] > 0


# --- bad input -------------------------------------------------------------------------------


def cli(args: list[str]):
    result = CliRunner().invoke(main, ["preprocess", *map(str, args)])
    return result


def test_cli_happy_path_prints_counts(tmp_path):
    write_corpus(tmp_path / "raw" / "train", make_pairs(200), gz=True)
    result = cli(
        [
            "-s",
            "en",
            "-t",
            "de",
            "--train",
            tmp_path / "raw" / "train",
            "-o",
            tmp_path / "out",
            "--vocab-size",
            60,
            "--workers",
            1,
            "--user-defined-symbols",
            "<x>,<y>",
        ]
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["splits"]["train"]["pairs"] == 200 - sum(printed["filters"]["dropped"].values())
    assert load_manifest(tmp_path / "out")["options"]["user_defined_symbols"] == ["<x>", "<y>"]


def assert_clean_failure(result, tmp_path: Path, *fragments: str):
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in result.output
    for frag in fragments:
        assert frag in lines[-1], (frag, lines[-1])
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_mismatched_line_counts(tmp_path):
    write_corpus(tmp_path / "raw" / "train", make_pairs(200))
    with open(tmp_path / "raw" / "train.de", "a") as f:
        f.write("ein extra satz\nnoch einer\n")
    result = cli(
        [
            "-s",
            "en",
            "-t",
            "de",
            "--train",
            tmp_path / "raw" / "train",
            "-o",
            tmp_path / "out",
            "--vocab-size",
            60,
        ]
    )
    assert_clean_failure(result, tmp_path, "train.en has 200 lines", "train.de has 202")
    # shorter target, and in a valid split (checked before anything is trained)
    write_corpus(tmp_path / "raw" / "dev", make_pairs(10))
    Path(tmp_path / "raw" / "dev.de").write_text("nur eine zeile\n")
    write_corpus(tmp_path / "raw" / "train", make_pairs(200))
    result = cli(
        [
            "-s",
            "en",
            "-t",
            "de",
            "--train",
            tmp_path / "raw" / "train",
            "--valid",
            tmp_path / "raw" / "dev",
            "-o",
            tmp_path / "out",
            "--vocab-size",
            60,
        ]
    )
    assert_clean_failure(result, tmp_path, "dev.en has 10 lines", "dev.de has 1")


def test_iter_parallel_counts_both_sides(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("1\n2\n3\n")
    b.write_text("1\n2\n3\n4\n5\n")
    for x, y, nx, ny in ((a, b, 3, 5), (b, a, 5, 3)):
        with pytest.raises(MtkitError, match=f"{x.name} has {nx} lines, .*{y.name} has {ny}"):
            list(iter_parallel(x, y))


def test_invalid_utf8_names_file_and_line(tmp_path):
    write_corpus(tmp_path / "raw" / "train", make_pairs(50), gz=True)
    lines = gzip.decompress(Path(tmp_path / "raw" / "train.de.gz").read_bytes()).split(b"\n")
    lines[36] = b"kaputt \xff\xfe text"
    Path(tmp_path / "raw" / "train.de.gz").write_bytes(gzip.compress(b"\n".join(lines)))
    result = cli(
        [
            "-s",
            "en",
            "-t",
            "de",
            "--train",
            tmp_path / "raw" / "train",
            "-o",
            tmp_path / "out",
            "--vocab-size",
            60,
        ]
    )
    assert_clean_failure(result, tmp_path, "train.de.gz line 37", "invalid UTF-8")


def test_missing_file(tmp_path):
    write_corpus(tmp_path / "raw" / "train", make_pairs(50))
    (tmp_path / "raw" / "train.de").unlink()
    result = cli(
        ["-s", "en", "-t", "de", "--train", tmp_path / "raw" / "train", "-o", tmp_path / "out"]
    )
    assert_clean_failure(result, tmp_path, "file not found", "train.de")
    result = cli(
        ["-s", "en", "-t", "de", "--train", tmp_path / "raw" / "nothing", "-o", tmp_path / "out"]
    )
    assert_clean_failure(result, tmp_path, "nothing.en")


def test_empty_corpus_after_filtering(tmp_path):
    write_corpus(tmp_path / "raw" / "train", make_pairs(100))
    result = cli(
        [
            "-s",
            "en",
            "-t",
            "de",
            "--train",
            tmp_path / "raw" / "train",
            "-o",
            tmp_path / "out",
            "--vocab-size",
            60,
            "--max-len",
            2,
        ]
    )
    assert_clean_failure(result, tmp_path, "no training pairs left after filtering", "max_len 100")
    write_corpus(tmp_path / "raw" / "empty", [])
    result = cli(
        ["-s", "en", "-t", "de", "--train", tmp_path / "raw" / "empty", "-o", tmp_path / "out"]
    )
    assert_clean_failure(result, tmp_path, "is empty")
    write_corpus(tmp_path / "raw" / "blank", [("", "x")] * 5)
    result = cli(
        ["-s", "en", "-t", "de", "--train", tmp_path / "raw" / "blank", "-o", tmp_path / "out"]
    )
    assert_clean_failure(result, tmp_path, "blank.en has only empty lines")


def test_vocab_size_too_large(tmp_path):
    write_corpus(tmp_path / "raw" / "train", make_pairs(100))
    result = cli(
        [
            "-s",
            "en",
            "-t",
            "de",
            "--train",
            tmp_path / "raw" / "train",
            "-o",
            tmp_path / "out",
            "--vocab-size",
            5000,
        ]
    )
    assert_clean_failure(result, tmp_path, "vocab size 5000 is too large", "at most")
    result = cli(
        [
            "-s",
            "en",
            "-t",
            "de",
            "--train",
            tmp_path / "raw" / "train",
            "-o",
            tmp_path / "out",
            "--vocab-size",
            12,
        ]
    )
    assert_clean_failure(result, tmp_path, "vocab size 12 is too small", "at least")


def test_bad_options(tmp_path):
    write_corpus(tmp_path / "raw" / "train", make_pairs(20))
    for extra, frag in (
        (["-t", "en"], "must differ"),
        (["-t", "de", "--workers", 0], "workers"),
        (["-t", "de", "--character-coverage", 1.5], "coverage"),
    ):
        result = cli(
            ["-s", "en", *extra, "--train", tmp_path / "raw" / "train", "-o", tmp_path / "out"]
        )
        assert_clean_failure(result, tmp_path, frag)


def test_refuses_to_overwrite_without_force(tmp_path):
    write_corpus(tmp_path / "raw" / "train", make_pairs(200))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = [
        "-s",
        "en",
        "-t",
        "de",
        "--train",
        tmp_path / "raw" / "train",
        "-o",
        out,
        "--vocab-size",
        60,
        "--workers",
        1,
    ]
    result = cli(args)
    assert result.exit_code == 1 and f"output directory {out} is not empty" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"
    result = cli([*args, "--force"])
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and load_manifest(out)["splits"]["train"]["pairs"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]
    # an empty existing dir is fine without --force
    empty = tmp_path / "empty_out"
    empty.mkdir()
    assert cli([*args[:-4], "-o", empty, "--vocab-size", 60]).exit_code == 0


def test_force_never_deletes_inputs(tmp_path):
    write_corpus(tmp_path / "work" / "train", make_pairs(100))
    with pytest.raises(MtkitError, match="would delete the input"):
        preprocess(
            "en", "de", tmp_path / "work" / "train", tmp_path / "work", vocab_size=60, force=True
        )
    assert (tmp_path / "work" / "train.en").exists()


def test_failure_keeps_previous_output(tmp_path):
    manifest, out = run(tmp_path, make_pairs(200))
    write_corpus(tmp_path / "raw" / "bad", make_pairs(10))
    (tmp_path / "raw" / "bad.de").write_text("x\n")
    with pytest.raises(MtkitError, match="line counts differ"):
        preprocess("en", "de", tmp_path / "raw" / "bad", out, vocab_size=60, force=True)
    assert load_manifest(out) == manifest
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# --- real data -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (MULTI30K / "train.en.gz").exists(), reason="multi30k not available")
def test_multi30k_joint_bpe_8k(tmp_path):
    start = time.monotonic()
    manifest = preprocess(
        "en",
        "de",
        MULTI30K / "train",
        tmp_path / "m30k",
        valid_prefix=MULTI30K / "val",
        test_prefixes=[MULTI30K / "test_2016_flickr"],
        vocab_size=8000,
        workers=2,
    )
    elapsed = time.monotonic() - start
    assert elapsed < 45
    dropped = sum(manifest["filters"]["dropped"].values())
    assert manifest["filters"]["input_pairs"] == 29000
    assert manifest["splits"]["train"]["pairs"] == 29000 - dropped and dropped < 100
    assert manifest["splits"]["valid"]["pairs"] == 1014
    assert manifest["splits"]["test_2016_flickr"]["pairs"] == 1000
    assert manifest["vocab"]["src_size"] == 8000
    src_spm, _ = load_spm(tmp_path / "m30k")
    ds = ParallelDataset(tmp_path / "m30k", "test_2016_flickr")
    refs = list(iter_lines(MULTI30K / "test_2016_flickr.de.gz"))
    assert src_spm.decode([ds[i][1] for i in range(len(ds))]) == normalized(src_spm, refs)

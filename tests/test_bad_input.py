"""Bad input through the command line: every failure is one ``error:`` line naming the file,
key or value, a non-zero exit, no traceback (unless ``--debug``) and no output that looks
complete; input that is merely unusual (BOM, CRLF, empty or huge lines) works correctly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    TINY,
    Workspace,
    cli,
    error_line,
    get_workspace,
    line_count,
    random_checkpoint,
    run_mtkit,
    sentences,
    sets,
    write_lines,
    write_pair,
)

from mtkit.checkpoint import load_checkpoint, save_checkpoint
from mtkit.data.dataset import ParallelDataset, load_manifest, load_spm

FAST_DECODE = ["--beam", "1", "--max-len-a", "0", "--max-len-b", "3", "--device", "cpu"]


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return get_workspace(tmp_path_factory)


def ok(args: list, input: str | bytes | None = None):
    res = cli(["-q", *args], input=input)
    assert res.exit_code == 0, res.stderr
    return res


def fails(args: list, *needles: str, input: str | bytes | None = None) -> str:
    res = cli(["-q", *args], input=input)
    return error_line(res.stderr, res.exit_code, *needles)


# --- preprocess ------------------------------------------------------------------------------
def preprocess_args(prefix: Path, out: Path, *extra: str) -> list:
    return ["preprocess", "-s", "en", "-t", "de", "--train", prefix, "-o", out, "--vocab-size", "60",
            "--workers", "1", *extra]


def no_data_dir(out: Path) -> None:
    assert not (out / "manifest.json").exists()
    assert not out.exists() or not any(out.iterdir())


def test_preprocess_mismatched_line_counts(tmp_path):
    write_pair(tmp_path / "c", sentences(20, 0), sentences(19, 0))
    fails(preprocess_args(tmp_path / "c", tmp_path / "out"), "c.en has 20", "c.de has 19")
    no_data_dir(tmp_path / "out")


def test_preprocess_empty_and_blank_files(tmp_path):
    write_pair(tmp_path / "e", [], [])
    fails(preprocess_args(tmp_path / "e", tmp_path / "o1"), "e.en", "empty")
    write_pair(tmp_path / "b", sentences(5, 0), ["", "  ", "", "", ""])
    fails(preprocess_args(tmp_path / "b", tmp_path / "o2"), "b.de", "only empty lines")
    no_data_dir(tmp_path / "o1")
    no_data_dir(tmp_path / "o2")


def test_preprocess_missing_file_and_directory(tmp_path):
    fails(preprocess_args(tmp_path / "nope", tmp_path / "o"), "nope.en")
    write_pair(tmp_path / "d", sentences(5, 0))
    (tmp_path / "d.de").unlink()
    (tmp_path / "d.de").mkdir()
    fails(preprocess_args(tmp_path / "d", tmp_path / "o"), "d.de", "directory")
    write_pair(tmp_path / "c", sentences(30, 0))
    (tmp_path / "file").write_text("x")
    fails(preprocess_args(tmp_path / "c", tmp_path / "file"), "file", "not a directory")
    fails(preprocess_args(tmp_path / "c", tmp_path / "file" / "sub"), "file", "not a directory")
    no_data_dir(tmp_path / "o")


def test_preprocess_invalid_utf8_names_file_and_line(tmp_path):
    write_pair(tmp_path / "c", sentences(30, 0))
    data = (tmp_path / "c.de").read_bytes().split(b"\n")
    data[6] = b"ein \xff\xfe Hund"
    (tmp_path / "c.de").write_bytes(b"\n".join(data))
    fails(preprocess_args(tmp_path / "c", tmp_path / "o"), "c.de", "line 7", "UTF-8")
    no_data_dir(tmp_path / "o")


@pytest.mark.parametrize("option,value", [("--vocab-size", "0"), ("--vocab-size", "-5"), ("--workers", "0")])
def test_preprocess_bad_numbers(tmp_path, option, value):
    write_pair(tmp_path / "c", sentences(30, 0))
    args = preprocess_args(tmp_path / "c", tmp_path / "o")
    args[args.index(option) + 1] = value
    fails(args, value)
    no_data_dir(tmp_path / "o")


def test_preprocess_failure_keeps_previous_output(tmp_path):
    """--force with a bad corpus must not destroy the existing data dir."""
    write_pair(tmp_path / "good", sentences(40, 0))
    out = tmp_path / "data"
    ok(preprocess_args(tmp_path / "good", out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_pair(tmp_path / "bad", sentences(40, 1), sentences(39, 1))
    fails(preprocess_args(tmp_path / "bad", out, "--force"), "line counts differ")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_preprocess_bom_crlf_equal_plain(tmp_path):
    src, tgt = sentences(60, 3), sentences(60, 4)
    write_pair(tmp_path / "plain", src, tgt)
    write_lines(tmp_path / "odd.en", src, newline="\r\n", bom=True)
    write_lines(tmp_path / "odd.de", tgt, newline="\r\n", bom=True)
    for name in ("plain", "odd"):
        ok(preprocess_args(tmp_path / name, tmp_path / f"d_{name}", "--test", tmp_path / name))
    assert (tmp_path / "d_plain" / "spm.model").read_bytes() == (tmp_path / "d_odd" / "spm.model").read_bytes()
    for lang in ("en", "de"):
        a = (tmp_path / "d_plain" / f"train.{lang}.bin").read_bytes()
        b = (tmp_path / "d_odd" / f"train.{lang}.bin").read_bytes()
        assert a == b, lang
    plain = ParallelDataset(tmp_path / "d_plain", "plain")
    odd = ParallelDataset(tmp_path / "d_odd", "odd")
    assert len(plain) == len(odd) == 60
    assert all(np.array_equal(plain[i][0], odd[i][0]) and np.array_equal(plain[i][1], odd[i][1]) for i in range(60))
    spm, _ = load_spm(tmp_path / "d_odd")
    assert spm.decode([odd[0][0]])[0] == src[0]  # no BOM or CR left in the first/any line
    assert "\r" not in "".join(spm.decode([odd[i][1] for i in range(60)]))


def test_preprocess_empty_and_huge_lines(tmp_path):
    """Empty training pairs and a 100k-character line are filtered and counted; test sets keep
    every line (an empty line stays an empty pair)."""
    src = sentences(60, 0)
    src[5] = ""
    src[9] = "a " * 50_000  # 100k characters
    tgt = [s.upper() for s in src]
    write_pair(tmp_path / "c", src, tgt)
    test = ["", "a man", "   ", "x" * 100_000, "the dog"]
    write_pair(tmp_path / "t", test)
    res = cli(["-q", *preprocess_args(tmp_path / "c", tmp_path / "d", "--test", tmp_path / "t")])
    assert res.exit_code == 0, res.stderr
    m = load_manifest(tmp_path / "d")
    assert m["filters"]["dropped"]["empty"] == 1 and m["filters"]["dropped"]["max_len"] == 1
    assert m["splits"]["train"]["pairs"] == 58
    ds = ParallelDataset(tmp_path / "d", "t")
    assert len(ds) == 5 and ds.src_lens[0] == 0 and ds.src_lens[2] == 0 and ds.src_lens[3] > 0


# --- train -----------------------------------------------------------------------------------
def train_args(ws: Workspace, save_dir: Path, *extra: str, config: str = "transformer_tiny") -> list:
    overrides = [o for o in TINY if config == "transformer_tiny" or not o.startswith("model.")]
    return ["train", ws.data, "-c", config, "--save-dir", save_dir, "--device", "cpu",
            *sets(overrides + ["train.max_updates=10"]), *extra]


@pytest.mark.parametrize("override,needles", [
    ("train.max_update=3", ("train.max_update", "did you mean 'train.max_updates'")),
    ("model.d_modle=8", ("model.d_modle", "did you mean 'model.d_model'")),
    ("trian.lr=0.1", ("trian", "did you mean 'train'")),
    ("train.lr=fast", ("train.lr", "fast")),
    ("train.max_updates=many", ("train.max_updates", "many")),
    ("model.arch=transfomer", ("transfomer", "did you mean 'transformer'")),
    ("train.max_tokens=0", ("train.max_tokens",)),
    ("train.max_tokens=-100", ("train.max_tokens",)),
    ("train.update_freq=0", ("train.update_freq",)),
    ("train_lr", ("train_lr",)),
])
def test_train_bad_config_key_or_value(workspace, tmp_path, override, needles):
    fails(train_args(workspace, tmp_path / "ck", "--set", override), *needles)
    assert not (tmp_path / "ck" / "checkpoint_last.pt").exists()


def test_train_missing_config_and_data(workspace, tmp_path):
    fails(train_args(workspace, tmp_path / "ck", config=str(tmp_path / "nope.yaml")), "nope.yaml")
    fails(train_args(workspace, tmp_path / "ck", config="transformer_tinny"), "transformer_tinny", "transformer_tiny")
    (tmp_path / "dir.yaml").mkdir()
    fails(train_args(workspace, tmp_path / "ck", config=str(tmp_path / "dir.yaml")), "dir.yaml", "directory")
    (tmp_path / "broken.yaml").write_text("train: [1, 2\n")
    fails(train_args(workspace, tmp_path / "ck", config=str(tmp_path / "broken.yaml")), "broken.yaml")
    args = train_args(workspace, tmp_path / "ck")
    args[1] = tmp_path / "no_data"
    fails(args, "no_data")
    args[1] = workspace.corpus  # a directory, but not a preprocessed one
    fails(args, str(workspace.corpus), "manifest.json")
    assert not (tmp_path / "ck" / "checkpoint_last.pt").exists()


def copy_run(ws: Workspace, dst: Path) -> Path:
    shutil.copytree(ws.ckpt_dir, dst)
    return dst


def test_train_refuses_to_overwrite_checkpoints(workspace, tmp_path):
    save = copy_run(workspace, tmp_path / "ck")
    before = (save / "checkpoint_last.pt").read_bytes()
    fails(train_args(workspace, save), str(save), "--resume")
    assert (save / "checkpoint_last.pt").read_bytes() == before


@pytest.mark.parametrize("damage", ["truncated", "flipped", "garbage", "empty", "directory"])
def test_train_resume_from_damaged_checkpoint(workspace, tmp_path, damage):
    save = copy_run(workspace, tmp_path / "ck")
    last = save / "checkpoint_last.pt"
    data = last.read_bytes()
    last.unlink()  # it may be a hard link to a numbered checkpoint: never write through it
    if damage == "truncated":
        last.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":
        last.write_bytes(data[:5000] + bytes([data[5000] ^ 1]) + data[5001:])
    elif damage == "garbage":
        last.write_bytes(b"PK\x03\x04 definitely not a checkpoint" * 10)
    elif damage == "empty":
        last.write_bytes(b"")
    else:
        last.mkdir()
    line = fails(train_args(workspace, save, "--resume"), "checkpoint_last.pt")
    if damage in ("truncated", "flipped"):
        assert "corrupt or truncated" in line


def test_train_resume_with_other_architecture_or_size(workspace, tmp_path):
    save = copy_run(workspace, tmp_path / "ck")
    before = (save / "checkpoint_last.pt").read_bytes()
    fails(train_args(workspace, save, "--resume", config="lstm_tiny"), "model.arch", "transformer", "lstm")
    fails(train_args(workspace, save, "--resume", "--set", "model.d_model=32", "--set", "model.ffn_dim=64"),
          "model.d_model", "16", "32")
    assert (save / "checkpoint_last.pt").read_bytes() == before


def test_train_resume_with_other_vocabulary(workspace, tmp_path):
    other_words = "ein mann frau hund ist sind reitet geht auf der im rad strasse park rot blau".split()
    write_pair(tmp_path / "c", sentences(200, 5, other_words), sentences(200, 6, other_words))
    out = tmp_path / "data2"
    ok(["preprocess", "-s", "en", "-t", "de", "--train", tmp_path / "c", "-o", out,
        "--vocab-size", "60", "--workers", "1"])
    save = copy_run(workspace, tmp_path / "ck")
    args = train_args(workspace, save, "--resume")
    args[1] = out
    fails(args, "checkpoint_last.pt", "vocabulary")


# --- translate -------------------------------------------------------------------------------
def translate_args(ckpt: Path, inp: Path, out: Path, *extra: str) -> list:
    return ["translate", "-m", ckpt, "-i", inp, "-o", out, *FAST_DECODE, *extra]


def no_complete_output(out: Path, n_input: int) -> None:
    assert line_count(out) < n_input


def test_translate_bad_checkpoints(workspace, tmp_path):
    inp = write_lines(tmp_path / "in.en", workspace.test_lines)
    out = tmp_path / "out.de"
    data = workspace.ckpt.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[:3000])
    fails(translate_args(tmp_path / "trunc.pt", inp, out), "trunc.pt", "truncated")
    fails(translate_args(tmp_path / "missing.pt", inp, out), "missing.pt", "not found")
    fails(translate_args(workspace.ckpt_dir, inp, out), str(workspace.ckpt_dir), "directory")
    fails(translate_args(inp, inp, out), "in.en", "not an mtkit checkpoint")
    # a valid file whose weights belong to another architecture than its config says
    payload = load_checkpoint(workspace.ckpt)
    lstm = load_checkpoint(random_checkpoint(tmp_path / "lstm.pt", load_spm(workspace.data)[0], arch="lstm"))
    payload["config"] = lstm["config"]
    save_checkpoint(tmp_path / "mixed.pt", payload)
    fails(translate_args(tmp_path / "mixed.pt", inp, out), "mixed.pt", "does not match")
    assert not out.exists()


def test_translate_ensemble_of_different_vocabularies(workspace, tmp_path):
    from mtkit.data.subword import train_sentencepiece

    other = train_sentencepiece(sentences(200, 9, "x y z w v u t s r q p o".split()), vocab_size=25)
    random_checkpoint(tmp_path / "other.pt", other)
    inp = write_lines(tmp_path / "in.en", workspace.test_lines)
    fails(translate_args(workspace.ckpt, inp, tmp_path / "o", "-m", tmp_path / "other.pt"),
          "other.pt", "vocabularies")
    assert not (tmp_path / "o").exists()


def test_translate_missing_or_directory_paths(workspace, tmp_path):
    inp = write_lines(tmp_path / "in.en", workspace.test_lines)
    fails(translate_args(workspace.ckpt, tmp_path / "nope.en", tmp_path / "o1"), "nope.en")
    fails(translate_args(workspace.ckpt, tmp_path, tmp_path / "o2"), str(tmp_path), "directory")
    (tmp_path / "outdir").mkdir()
    fails(translate_args(workspace.ckpt, inp, tmp_path / "outdir"), "outdir", "directory")
    fails(translate_args(workspace.ckpt, inp, tmp_path / "no" / "such" / "o3"), "no/such")
    for name in ("o1", "o2", "o3"):
        no_complete_output(tmp_path / name, len(workspace.test_lines))


def test_translate_unreadable_input_leaves_no_output(workspace, tmp_path):
    res = cli(["-q", *translate_args(workspace.ckpt, tmp_path / "nope.en", tmp_path / "o")])
    error_line(res.stderr, res.exit_code, "nope.en")
    assert res.stderr.strip().count("\n") == 0, res.stderr  # the error line only
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option,value", [
    ("--beam", "0"), ("--beam", "-2"), ("--batch-size", "0"), ("--batch-size", "-1"),
    ("--max-tokens", "0"), ("--max-tokens", "-64"), ("--nbest", "0"), ("--nbest", "-1"),
])
def test_translate_non_positive_sizes(workspace, tmp_path, option, value):
    inp = write_lines(tmp_path / "in.en", workspace.test_lines)
    args = translate_args(workspace.ckpt, inp, tmp_path / "o")
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    fails(args, value)
    assert not (tmp_path / "o").exists()


def test_translate_nbest_larger_than_beam(workspace, tmp_path):
    inp = write_lines(tmp_path / "in.en", workspace.test_lines)
    fails(translate_args(workspace.ckpt, inp, tmp_path / "o", "--nbest", "3"), "3")


def test_translate_invalid_utf8(workspace, tmp_path):
    lines = [s.encode() for s in workspace.test_lines]
    lines[12] = b"a \xc3\x28 man"
    inp = tmp_path / "in.en"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    fails(translate_args(workspace.ckpt, inp, tmp_path / "o"), "in.en", "line 13", "UTF-8")
    no_complete_output(tmp_path / "o", len(lines))
    res = cli(["-q", *translate_args(workspace.ckpt, inp, tmp_path / "r", "--errors", "replace")])
    assert res.exit_code == 0, res.stderr
    assert line_count(tmp_path / "r") == len(lines)
    # from stdin to stdout: the error names <stdin> and nothing looks like a finished output
    res = cli(["-q", "translate", "-m", workspace.ckpt, *FAST_DECODE], input=b"a man\n\xff dog\n")
    error_line(res.stderr, res.exit_code, "<stdin> line 2", "UTF-8")
    assert res.stdout.count("\n") < 2


def translate_ok(ckpt: Path, inp: Path, out: Path, *extra: str) -> list[str]:
    res = cli(["-q", *translate_args(ckpt, inp, out, *extra)])
    assert res.exit_code == 0, res.stderr
    return out.read_text(encoding="utf-8").split("\n")[:-1]


def test_translate_bom_crlf_equal_plain(workspace, tmp_path):
    lines = workspace.test_lines
    plain = translate_ok(workspace.ckpt, write_lines(tmp_path / "a", lines), tmp_path / "a.out")
    odd = translate_ok(workspace.ckpt, write_lines(tmp_path / "b", lines, "\r\n", bom=True), tmp_path / "b.out")
    assert odd == plain and len(plain) == len(lines)
    assert b"\r" not in (tmp_path / "b.out").read_bytes() and b"\xef\xbb\xbf" not in (tmp_path / "b.out").read_bytes()


def test_translate_empty_whitespace_and_huge_lines(workspace, tmp_path):
    lines = list(workspace.test_lines[:10])
    lines[0], lines[4], lines[9] = "", " \t ", "a " * 50_000
    inp = write_lines(tmp_path / "in.en", lines)
    res = cli(["translate", *translate_args(workspace.ckpt, inp, tmp_path / "o")[1:]])
    assert res.exit_code == 0, res.stderr
    assert "in.en line 10" in res.stderr and "truncated" in res.stderr  # said, not silent
    out = (tmp_path / "o").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(out) == 10 and out[0] == "" and out[4] == ""
    # the other lines are translated as they are alone
    alone = translate_ok(workspace.ckpt, write_lines(tmp_path / "one", [lines[3]]), tmp_path / "one.out")
    assert out[3] == alone[0]
    # an empty input file gives an empty output file
    assert translate_ok(workspace.ckpt, write_lines(tmp_path / "e", []), tmp_path / "e.out") == []


# --- score and average -----------------------------------------------------------------------
def test_score_bad_inputs(tmp_path):
    ref = write_lines(tmp_path / "ref", sentences(20, 0))
    fails(["score", "-r", ref, "-i", write_lines(tmp_path / "short", sentences(19, 0))], "short", "19", "20")
    fails(["score", "-r", ref, "-i", write_lines(tmp_path / "empty", [])], "empty")
    fails(["score", "-r", ref, "-i", tmp_path / "nope"], "nope")
    fails(["score", "-r", tmp_path, "-i", ref], str(tmp_path), "directory")
    (tmp_path / "bad").write_bytes(b"ok\n" * 4 + b"\x80 bad\n" + b"ok\n" * 15)
    fails(["score", "-r", ref, "-i", tmp_path / "bad"], "bad", "line 5")
    fails(["score", "-r", ref, "-i", ref, "-m", "blue"], "blue")


def test_score_bom_crlf_equal_plain(tmp_path):
    ref, hyp = sentences(30, 0), sentences(30, 0)
    hyp[3] = hyp[3].upper()
    write_lines(tmp_path / "ref", ref)
    write_lines(tmp_path / "hyp", hyp)
    write_lines(tmp_path / "ref2", ref, "\r\n", bom=True)
    write_lines(tmp_path / "hyp2", hyp, "\r\n", bom=True)
    a = cli(["score", "-r", tmp_path / "ref", "-i", tmp_path / "hyp", "-f", "json", "-m", "bleu", "chrf"])
    b = cli(["score", "-r", tmp_path / "ref2", "-i", tmp_path / "hyp2", "-f", "json", "-m", "bleu", "chrf"])
    assert a.exit_code == b.exit_code == 0, a.stderr + b.stderr
    scores_a, scores_b = json.loads(a.stdout), json.loads(b.stdout)
    for x, y in zip(scores_a, scores_b, strict=True):
        assert x.pop("system").endswith("hyp") and y.pop("system").endswith("hyp2")
        assert x == y
    assert 0 < scores_a[0]["score"] < 100


def test_average_bad_checkpoints(workspace, tmp_path):
    numbered = sorted(workspace.ckpt_dir.glob("checkpoint_[0-9]*.pt"))
    assert len(numbered) >= 2
    (tmp_path / "trunc.pt").write_bytes(numbered[0].read_bytes()[:-100])
    out = tmp_path / "avg.pt"
    fails(["average", tmp_path / "trunc.pt", numbered[1], "-o", out], "trunc.pt")
    lstm = random_checkpoint(tmp_path / "lstm.pt", load_spm(workspace.data)[0], arch="lstm")
    fails(["average", numbered[0], lstm, "-o", out], "lstm.pt")
    fails(["average", numbered[0], tmp_path / "gone.pt", "-o", out], "gone.pt")
    fails(["average", tmp_path, "-o", out], str(tmp_path))
    assert not out.exists()


# --- --debug and a real process ----------------------------------------------------------------
def test_real_process_error_and_debug_traceback(workspace, tmp_path):
    args = ["translate", "-m", tmp_path / "missing.pt", "-i", workspace.corpus / "test.en", "-o", tmp_path / "o"]
    plain = run_mtkit(args)
    assert plain.returncode == 1
    assert plain.stderr.strip() == f"error: checkpoint not found: {tmp_path / 'missing.pt'}"
    assert plain.stdout == ""
    debug = run_mtkit(["--debug", *args])
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "MtkitError" in debug.stderr and "missing.pt" in debug.stderr


def test_debug_reraises_in_process(workspace, tmp_path):
    from mtkit.errors import MtkitError

    res = cli(["--debug", "train", workspace.data, "-c", "transformer_tiny", "--save-dir", tmp_path,
               "--set", "train.max_update=3"])
    assert res.exit_code != 0 and isinstance(res.exception, MtkitError)
    assert "train.max_updates" in str(res.exception)

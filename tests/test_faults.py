"""Injected faults: a full disk while writing checkpoints, data or output; NaN/inf updates;
out-of-memory in beam search; an interrupt in the middle of a run. Each gives a clear one-line
error (or is handled) and leaves the previous good state in place."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    TINY,
    Workspace,
    cli,
    error_line,
    get_workspace,
    line_count,
    run_mtkit,
    sentences,
    sets,
    write_lines,
    write_pair,
)

from mtkit import checkpoint as C
from mtkit.checkpoint import load_checkpoint, save_checkpoint
from mtkit.training import step as update_step
from mtkit.training import trainer as T

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
DECODE = ["--beam", "2", "--max-len-a", "0", "--max-len-b", "3", "--device", "cpu"]


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return get_workspace(tmp_path_factory)


def train_args(ws: Workspace, save_dir: Path, *overrides: str) -> list:
    return ["-q", "train", ws.data, "-c", "transformer_tiny", "--save-dir", save_dir, "--device", "cpu",
            *sets(TINY + ["train.max_updates=12", "train.save_interval_updates=4",
                          "train.validate_interval_updates=4", *overrides])]


def stray_temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def finite(payload: dict) -> bool:
    return all(torch.isfinite(t).all() for t in payload["model"].values() if t.is_floating_point())


# --- disk full ---------------------------------------------------------------------------------
def test_disk_full_while_writing_checkpoint(workspace, tmp_path, monkeypatch):
    write = C._HashingWriter.write

    def full_at_update_8(self, b):
        if "checkpoint_8.pt" in self.f.name:
            write(self, bytes(b)[: len(b) // 2])  # part of it reached the disk
            raise ENOSPC
        return write(self, b)

    monkeypatch.setattr(C._HashingWriter, "write", full_at_update_8)
    save = tmp_path / "ck"
    res = cli(train_args(workspace, save))
    error_line(res.stderr, res.exit_code, "checkpoint_8.pt", "No space left on device")
    last = load_checkpoint(save / "checkpoint_last.pt")  # intact, checksum verified
    assert last["update"] == 4 and finite(last)
    assert stray_temp_files(save) == []
    assert not (save / "checkpoint_8.pt").exists()
    # space freed: the run resumes from the good checkpoint and finishes
    monkeypatch.setattr(C._HashingWriter, "write", write)
    res = cli(train_args(workspace, save) + ["--resume"])
    assert res.exit_code == 0, res.stderr
    assert load_checkpoint(save / "checkpoint_last.pt")["update"] == 12


def copies_of_checkpoint_8_fill_the_disk(monkeypatch) -> None:
    """No hard links (checkpoint_last.pt becomes a copy), and copying checkpoint_8.pt writes
    1000 bytes, then fails with ENOSPC."""
    def no_link(src, dst):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), str(dst))

    copy = shutil.copyfile

    def full_copy(src, dst, *a, **k):
        if "checkpoint_8.pt" in str(src):
            Path(dst).write_bytes(Path(src).read_bytes()[:1000])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return copy(src, dst, *a, **k)

    monkeypatch.setattr(C.os, "link", no_link)
    monkeypatch.setattr(C.shutil, "copyfile", full_copy)


def test_disk_full_while_copying_last_checkpoint(workspace, tmp_path, monkeypatch):
    """Where hard links are unavailable checkpoint_last.pt is a copy; a full disk during the
    copy must leave the previous checkpoint_last.pt in place."""
    copies_of_checkpoint_8_fill_the_disk(monkeypatch)
    save = tmp_path / "ck"
    res = cli(train_args(workspace, save))
    error_line(res.stderr, res.exit_code, "No space left on device", "checkpoint_last.pt")
    last = load_checkpoint(save / "checkpoint_last.pt")
    assert last["update"] == 4 and finite(last)


def test_disk_full_while_copying_leaves_no_temp_file(workspace, tmp_path, monkeypatch):
    copies_of_checkpoint_8_fill_the_disk(monkeypatch)
    save = tmp_path / "ck"
    res = cli(train_args(workspace, save))
    assert res.exit_code == 1
    assert stray_temp_files(save) == []


def test_disk_full_while_writing_translation(workspace, tmp_path):
    """/dev/full fails every write with ENOSPC: a real full disk, no injection."""
    inp = write_lines(tmp_path / "in.en", workspace.test_lines)
    res = run_mtkit(["-q", "translate", "-m", workspace.ckpt, "-i", inp, "-o", "/dev/full", *DECODE])
    error_line(res.stderr, res.returncode, "No space left on device")
    with open("/dev/full", "w") as full:
        res = run_mtkit(["-q", "score", "-r", inp, "-i", inp], stdout=full)
    error_line(res.stderr, res.returncode, "stdout", "No space left on device")


def test_disk_full_translation_error_names_output(workspace, tmp_path):
    inp = write_lines(tmp_path / "in.en", workspace.test_lines)
    res = cli(["-q", "translate", "-m", workspace.ckpt, "-i", inp, "-o", "/dev/full", *DECODE])
    error_line(res.stderr, res.exit_code, "/dev/full", "No space left on device")


def test_disk_full_while_preprocessing_keeps_previous_data(tmp_path, monkeypatch):
    from mtkit.data import binarize

    write_pair(tmp_path / "c", sentences(80, 0))
    out = tmp_path / "data"
    args = ["-q", "preprocess", "-s", "en", "-t", "de", "--train", tmp_path / "c", "--test", tmp_path / "c",
            "-o", out, "--vocab-size", "60", "--workers", "1"]
    assert cli(args).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    add = binarize._ShardWriter.add

    def full(self, flat, lens):
        if self.bin.name.endswith("c.de.bin"):  # the test split, after train succeeded
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.bin.name)
        return add(self, flat, lens)

    monkeypatch.setattr(binarize._ShardWriter, "add", full)
    res = cli([*args, "--force"])
    error_line(res.stderr, res.exit_code, "No space left on device", "c.de.bin")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.de", "c.en", "data"]  # no temp dir left


def test_disk_full_while_averaging(workspace, tmp_path, monkeypatch):
    def full(self, b):
        raise ENOSPC

    monkeypatch.setattr(C._HashingWriter, "write", full)
    out = tmp_path / "avg.pt"
    res = cli(["-q", "average", workspace.ckpt_dir, "--last", "2", "-o", out])
    error_line(res.stderr, res.exit_code, "avg.pt", "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_interrupt_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pt"
    save_checkpoint(path, {"config": {}, "model": {"w": torch.ones(3)}, "update": 1})

    def interrupted(self, b):
        raise KeyboardInterrupt

    monkeypatch.setattr(C._HashingWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"config": {}, "model": {"w": torch.zeros(3)}, "update": 2})
    assert load_checkpoint(path)["update"] == 1 and os.listdir(tmp_path) == ["checkpoint_last.pt"]


# --- NaN / inf -----------------------------------------------------------------------------------
def poison_loss(monkeypatch, bad_calls) -> list[int]:
    """Make the training loss of the listed training forward passes (1-based) NaN or inf."""
    loss_fn, calls = update_step.projected_nll, [0]

    def poisoned(*args):
        loss, nll, n = loss_fn(*args)
        if torch.is_grad_enabled():
            calls[0] += 1
            if bad_calls(calls[0]):
                loss = loss * (float("nan") if calls[0] % 2 else float("inf"))
        return loss, nll, n

    monkeypatch.setattr(update_step, "projected_nll", poisoned)
    return calls


def test_poisoned_batches_are_skipped_and_counted(workspace, tmp_path, monkeypatch):
    poison_loss(monkeypatch, lambda i: i in (3, 7, 8))  # one NaN, then an inf and a NaN in a row
    save = tmp_path / "ck"
    summary = T.train(workspace.data, _cfg(), save, device="cpu")
    assert summary["skipped_updates"] == 3
    assert summary["updates"] == 12  # skipped updates do not count: 12 real updates were made
    last = load_checkpoint(save / "checkpoint_last.pt")
    assert finite(last) and last["train_state"]["bad_total"] == 3
    events = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(e["loss"]) for e in events)


def _cfg(*overrides: str):
    from mtkit.config import load_config

    return load_config("transformer_tiny", TINY + ["train.max_updates=12", "train.save_interval_updates=4",
                                                   "train.validate_interval_updates=4", *overrides])


def test_too_many_bad_updates_in_a_row_stop_with_good_checkpoint(workspace, tmp_path, monkeypatch):
    poison_loss(monkeypatch, lambda i: i >= 7)  # update 7 onwards never succeeds
    save = tmp_path / "ck"
    res = cli(train_args(workspace, save, "train.max_bad_updates=3"))
    line = error_line(res.stderr, res.exit_code, "3 updates in a row", str(save))
    assert "non-finite" in line
    last = load_checkpoint(save / "checkpoint_last.pt")
    assert 4 <= last["update"] <= 6 and finite(last)
    assert "non-finite" in res.stderr.splitlines()[0]  # each skipped update was reported


def test_bad_updates_before_first_save_still_leave_a_checkpoint(workspace, tmp_path, monkeypatch):
    poison_loss(monkeypatch, lambda i: i >= 3)
    save = tmp_path / "ck"
    res = cli(train_args(workspace, save, "train.max_bad_updates=2", "train.save_interval_updates=100"))
    error_line(res.stderr, res.exit_code, "2 updates in a row")
    last = load_checkpoint(save / "checkpoint_last.pt")
    assert last["update"] == 2 and finite(last)


# --- out of memory in beam search ------------------------------------------------------------------
def oom_above(monkeypatch, rows: int, message: str | None = None) -> list[int]:
    """Every model step on more than ``rows`` (batch * beam) rows runs out of memory."""
    from mtkit.models.transformer import Transformer

    step, seen = Transformer.step, []

    def step_or_oom(self, prev, enc, state, need_attn=True):
        seen.append(prev.size(0))
        if prev.size(0) > rows:
            if message is None:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            raise RuntimeError(message)
        return step(self, prev, enc, state, need_attn)

    monkeypatch.setattr(Transformer, "step", step_or_oom)
    return seen


@pytest.mark.parametrize("message", [None, "CUDA error: out of memory"])
def test_oom_in_beam_search_splits_batches(workspace, tmp_path, monkeypatch, message):
    lines = sentences(40, 21)
    lines[5] = ""
    inp = write_lines(tmp_path / "in.en", lines)
    args = ["translate", "-m", workspace.ckpt, "-i", inp, *DECODE, "--batch-size", "16"]
    ref = cli(["-q", *args, "-o", tmp_path / "ref"])
    assert ref.exit_code == 0, ref.stderr
    seen = oom_above(monkeypatch, 6, message)  # beam 2: at most 3 sentences fit
    res = cli([*args, "-o", tmp_path / "out"])
    assert res.exit_code == 0, res.stderr
    assert "out of memory" in res.stderr and "retrying in halves" in res.stderr
    assert (tmp_path / "out").read_bytes() == (tmp_path / "ref").read_bytes()
    assert line_count(tmp_path / "out") == 40
    assert max(seen) > 6 and any(r <= 6 for r in seen)


def test_oom_on_a_single_sentence_is_a_clear_error(workspace, tmp_path, monkeypatch):
    inp = write_lines(tmp_path / "in.en", sentences(10, 3))
    oom_above(monkeypatch, 1)  # even one sentence with beam 2 does not fit
    res = cli(["-q", "translate", "-m", workspace.ckpt, "-i", inp, "-o", tmp_path / "o", *DECODE])
    error_line(res.stderr, res.exit_code, "out of memory", "single sentence")
    assert line_count(tmp_path / "o") < 10


def test_non_oom_runtime_error_is_not_swallowed(workspace, tmp_path, monkeypatch):
    from mtkit.models.transformer import Transformer

    def broken(self, prev, enc, state, need_attn=True):
        raise RuntimeError("some other kernel failure")

    monkeypatch.setattr(Transformer, "step", broken)
    inp = write_lines(tmp_path / "in.en", sentences(4, 3))
    res = cli(["-q", "translate", "-m", workspace.ckpt, "-i", inp, "-o", tmp_path / "o", *DECODE])
    assert res.exit_code != 0 and isinstance(res.exception, RuntimeError)
    assert "some other kernel failure" in str(res.exception)


# --- an interrupt (Ctrl-C) in the middle of a translation ------------------------------------------
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupted_translation_resumes_exactly(workspace, tmp_path, monkeypatch, how):
    """Ctrl-C, or the SIGTERM a scheduler sends: the written lines stay for --resume (exit 130 / 143)."""
    import os
    import signal

    from mtkit.decoding import search

    lines = sentences(300, 4)
    inp = write_lines(tmp_path / "in.en", lines)
    args = ["-q", "translate", "-m", workspace.ckpt, "-i", inp, *DECODE, "--batch-size", "8"]
    assert cli([*args, "-o", tmp_path / "ref"]).exit_code == 0
    generate, calls = search.generate, [0]

    def interrupted(*a, **k):
        calls[0] += 1
        if calls[0] == 30:
            if how == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
        return generate(*a, **k)

    monkeypatch.setattr(search, "generate", interrupted)
    out = tmp_path / "out"
    res = cli([*args, "-o", out, "--resume"])
    assert res.exit_code == (130 if how == "ctrl-c" else 143)
    error_line(res.stderr, res.exit_code, "interrupted" if how == "ctrl-c" else "SIGTERM")
    assert 0 < line_count(out) < 300 and "--resume" in res.stderr
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back
    monkeypatch.setattr(search, "generate", generate)
    res = cli([*args, "-o", out, "--resume"])
    assert res.exit_code == 0, res.stderr
    assert out.read_bytes() == (tmp_path / "ref").read_bytes()


# --- memory: scoring a large corpus in bounded chunks -----------------------------------------------
def test_score_in_chunks_equals_whole_corpus(tmp_path, monkeypatch):
    """`mtkit score` sums sentence statistics chunk by chunk (sacrebleu alone keeps every
    reference's n-grams: gigabytes for a million lines); the figures must not change."""
    from sacrebleu.metrics import BLEU, CHRF, TER

    from mtkit import scoring_metrics

    hyp = sentences(230, 1)
    hyp[7] = ""
    refs = [sentences(230, 2), sentences(230, 3)]
    write_lines(tmp_path / "hyp", hyp)
    for i, r in enumerate(refs):
        write_lines(tmp_path / f"ref{i}", r)
    monkeypatch.setattr(scoring_metrics, "CHUNK_LINES", 50)  # five chunks, the last one short
    from sacrebleu.metrics.base import Metric

    extract, chunks = Metric._extract_corpus_statistics, []

    def counted(self, hyps, refs):
        chunks.append(len(hyps))
        return extract(self, hyps, refs)

    monkeypatch.setattr(Metric, "_extract_corpus_statistics", counted)
    res = cli(["score", "-i", tmp_path / "hyp", "-r", tmp_path / "ref0", "-r", tmp_path / "ref1",
               "-m", "bleu", "chrf", "chrf++", "ter", "-f", "json", "-w", "4"])
    assert res.exit_code == 0, res.stderr
    got = {d["name"]: d["score"] for d in json.loads(res.stdout)}
    assert chunks == [50, 50, 50, 50, 30] * 4  # never more than a chunk of sentences at once
    whole = {m.corpus_score(hyp, refs).name: round(m.corpus_score(hyp, refs).score, 4)
             for m in (BLEU(), CHRF(), CHRF(word_order=2), TER())}
    assert got == whole and len(got) == 4

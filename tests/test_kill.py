"""SIGKILL at a random point never loses work: resumed training is bit-identical to an
uninterrupted run, an interrupted checkpoint write leaves the previous checkpoint in place, and
``translate --resume`` completes a file with every line exactly once, in order."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    TINY,
    Workspace,
    cli,
    get_workspace,
    line_count,
    popen_mtkit,
    sentences,
    sets,
    subprocess_env,
    write_lines,
)

from mtkit.checkpoint import load_checkpoint

UPDATES = 40
TRAIN_SETS = TINY + [f"train.max_updates={UPDATES}", "train.save_interval_updates=4",
                     "train.validate_interval_updates=6"]


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return get_workspace(tmp_path_factory)


def train_args(ws: Workspace, save_dir: Path, *extra: str) -> list:
    return ["train", ws.data, "-c", "transformer_tiny", "--save-dir", save_dir, "--device", "cpu",
            *sets(TRAIN_SETS), *extra]


def last_update(metrics: Path) -> int:
    """The highest update in a metrics.jsonl being written (complete lines only)."""
    try:
        text = metrics.read_text(encoding="utf-8")
    except FileNotFoundError:
        return 0
    best = 0
    for line in text.split("\n")[:-1]:
        try:
            best = max(best, json.loads(line)["update"])
        except (json.JSONDecodeError, KeyError):
            pass
    return best


def kill_when(proc: subprocess.Popen, ready, delay: float = 0.0, timeout: float = 240.0) -> None:
    """SIGKILL ``proc`` ``delay`` seconds after ``ready()`` holds; fail if it exits first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"process ended (exit {proc.returncode}) before the kill point: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("kill point not reached in time")
        time.sleep(0.002)
    time.sleep(delay)
    if proc.poll() is not None:
        pytest.fail(f"process ended (exit {proc.returncode}) before the kill")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def train_events(metrics: Path) -> list[tuple]:
    """(kind, update, loss, gnorm) of every logged event (timings left out)."""
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
    return [(r["kind"], r["update"], r["loss"], r.get("gnorm")) for r in rows]


@pytest.fixture(scope="module")
def straight(workspace, tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("straight")
    res = cli(["-q", *train_args(workspace, save)])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["updates"] == UPDATES
    return save


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(a / "checkpoint_last.pt"), load_checkpoint(b / "checkpoint_last.pt")
    assert wa["update"] == wb["update"] == UPDATES
    assert wa["model"].keys() == wb["model"].keys()
    for name, tensor in wa["model"].items():
        assert torch.equal(tensor, wb["model"][name]), name
    for (ka, sa), (kb, sb) in zip(wa["optimizer"]["state"].items(), wb["optimizer"]["state"].items()):
        assert ka == kb and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert train_events(a / "metrics.jsonl") == train_events(b / "metrics.jsonl")


@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
def test_train_sigkill_then_resume_is_bit_identical(workspace, straight, tmp_path, seed):
    rng = random.Random(seed)
    kill_at = rng.randint(5, UPDATES // 2)  # past the first checkpoint (update 4), far from the end
    delay = rng.uniform(0.0, 0.05)  # lands anywhere: mid-update, mid-validation, mid-write
    save = tmp_path / "run"
    proc = popen_mtkit(["-q", *train_args(workspace, save)])
    kill_when(proc, lambda: last_update(save / "metrics.jsonl") >= kill_at, delay)
    restart = load_checkpoint(save / "checkpoint_last.pt")["update"]  # readable after a kill
    assert 0 < restart < UPDATES
    res = cli(["-q", *train_args(workspace, save, "--resume")])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["updates"] == UPDATES
    assert_same_run(straight, save)


def test_train_killed_before_first_checkpoint_resumes_cleanly(workspace, straight, tmp_path):
    save = tmp_path / "run"
    proc = popen_mtkit(["-q", *train_args(workspace, save)])
    kill_when(proc, lambda: last_update(save / "metrics.jsonl") >= 2)
    assert not (save / "checkpoint_last.pt").exists() or load_checkpoint(save / "checkpoint_last.pt")
    (save / "checkpoint_last.pt").unlink(missing_ok=True)  # as if killed before the first save
    res = cli(["-q", *train_args(workspace, save, "--resume")])
    assert res.exit_code == 0, res.stderr
    assert_same_run(straight, save)


# --- an interrupted checkpoint write ------------------------------------------------------------
WRITER = textwrap.dedent("""
    import os, sys, time, torch
    from mtkit import checkpoint as C
    path, where = sys.argv[1], sys.argv[2]
    def payload(v):
        return {"config": {}, "model": {"w": torch.full((256, 1024), float(v))}, "update": v}
    C.save_checkpoint(path, payload(1))
    def hang(*a, **k):
        print("READY", flush=True)
        time.sleep(600)
    if where == "before-rename":  # everything written and hashed, about to fsync and rename
        C.os.fsync = hang
    else:  # in the middle of torch.save's stream
        write, calls = C._HashingWriter.write, []
        def slow_write(self, b):
            calls.append(len(b))
            if sum(calls) > 600_000:  # write part of the weights to disk, then stop
                write(self, bytes(b)[: len(b) // 2])
                self.f.flush()
                hang()
            return write(self, b)
        C._HashingWriter.write = slow_write
    C.save_checkpoint(path, payload(2))
    print("NOT KILLED", flush=True)
""")


@pytest.mark.parametrize("where", ["mid-stream", "before-rename"])
def test_interrupted_checkpoint_write_keeps_previous(tmp_path, where):
    path = tmp_path / "checkpoint_last.pt"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), where], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())
    assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
    temps = list(tmp_path.glob("checkpoint_last.pt.tmp-*"))
    assert len(temps) == 1 and temps[0].stat().st_size > 0  # the new one was being written
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    proc.stderr.close()
    payload = load_checkpoint(path)  # checksum verified
    assert payload["update"] == 1 and torch.equal(payload["model"]["w"], torch.full((256, 1024), 1.0))
    # the stray temp file is never mistaken for a checkpoint
    from mtkit.errors import MtkitError

    if where == "mid-stream":
        with pytest.raises(MtkitError, match="corrupt or truncated|not an mtkit checkpoint"):
            load_checkpoint(temps[0])


# --- translate --resume ------------------------------------------------------------------------
N_LINES = 12_000  # more than one 10k-line input buffer
DECODE = ["--beam", "1", "--max-len-a", "0", "--max-len-b", "2", "--batch-size", "250", "--device", "cpu"]


@pytest.mark.slow
def test_translate_resume_after_sigkill(workspace, tmp_path):
    lines = sentences(N_LINES, 11)
    for i in range(0, N_LINES, 97):
        lines[i] = ""  # empty lines give empty output lines, which resume must count too
    inp = write_lines(tmp_path / "in.en", lines)
    ref, out = tmp_path / "ref.de", tmp_path / "out.de"
    res = cli(["-q", "translate", "-m", workspace.ckpt, "-i", inp, "-o", ref, *DECODE])
    assert res.exit_code == 0, res.stderr
    assert line_count(ref) == N_LINES
    args = ["-q", "translate", "-m", workspace.ckpt, "-i", inp, "-o", out, *DECODE]
    rng = random.Random(7)
    done = 0
    for _ in range(2):  # killed twice: the second run is itself a resumed one
        k = rng.randint(done + 1, done + (N_LINES - done) * 3 // 4)
        proc = popen_mtkit([*args, "--resume"])
        kill_when(proc, lambda k=k: line_count(out) >= k)
        assert k <= line_count(out) < N_LINES  # killed part-way, possibly mid-line
        done = line_count(out)
    res = cli([*args, "--resume"])
    assert res.exit_code == 0, res.stderr
    assert out.read_bytes() == ref.read_bytes()

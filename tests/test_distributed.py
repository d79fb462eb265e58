"""Data-parallel training on torch.distributed: real Gloo processes on this CPU machine.

Two ranks with update_freq 1 must make the same updates as one process with update_freq 2 (the
same batches, the loss normalised by the same global token count); a killed 2-rank run resumes to
the same weights as an uninterrupted one; a checkpoint moves between 2 ranks and 1 with a warning.
The ranks are started the way torchrun starts them (RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT), all in one process group so a test can SIGKILL the whole run.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import sentences, sets, subprocess_env, write_pair

from mtkit.checkpoint import load_checkpoint
from mtkit.config import load_config
from mtkit.data.preprocess import preprocess
from mtkit.training import trainer as T

UPDATES = 8
BASE = [
    "model.d_model=16", "model.ffn_dim=32", "model.heads=2", "model.encoder_layers=1", "model.decoder_layers=1",
    "model.dropout=0.0", "train.num_threads=1", "train.max_tokens=128", "train.warmup_updates=4", "train.lr=0.003",
    "train.log_interval=1", "train.valid_bleu=false", "train.validate_interval_updates=4",
    "train.save_interval_updates=4", "train.keep_last=10", f"train.max_updates={UPDATES}",
]
TIMEOUT = 240  # seconds for one multi-process run before the test kills it and fails

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    write_pair(root / "train", sentences(200, 0))
    write_pair(root / "valid", sentences(12, 1))
    preprocess("en", "de", root / "train", root / "data", valid_prefix=root / "valid", vocab_size=60, workers=1)
    return root / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(argv: list[str], world: int = 2) -> list[subprocess.Popen]:
    """``python ARGV`` once per rank, with the environment torchrun gives its workers; every
    rank is in the first one's (new) process group."""
    port = free_port()
    procs: list[subprocess.Popen] = []
    for rank in range(world):
        env = subprocess_env()
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        group = procs[0].pid if procs else 0  # a new process group, joined by the other ranks
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, process_group=group))
    return procs


def kill_group(procs: list[subprocess.Popen]) -> None:
    try:
        os.killpg(procs[0].pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in procs:
        p.communicate()


def finish(procs: list[subprocess.Popen]) -> list[tuple[str, str]]:
    """Wait for every rank; all must exit 0. Returns each rank's (stdout, stderr)."""
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT))
    except subprocess.TimeoutExpired:
        kill_group(procs)
        pytest.fail("a data-parallel run did not finish in time (ranks disagreed on a collective?)")
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    return outs


def train_argv(data_dir: Path, save_dir: Path, *overrides: str, resume: bool = False) -> list[str]:
    return ["-m", "mtkit", "-q", "train", str(data_dir), "-c", "transformer_tiny", "--save-dir", str(save_dir),
            "--device", "cpu", *sets(BASE + list(overrides)), *(["--resume"] if resume else [])]


def run_ranks(data_dir: Path, save_dir: Path, *overrides: str, resume: bool = False) -> list[tuple[str, str]]:
    return finish(start_ranks(train_argv(data_dir, save_dir, *overrides, resume=resume)))


def run_single(data_dir: Path, save_dir: Path, *overrides: str, resume: bool = False) -> dict:
    cfg = load_config("transformer_tiny", BASE + list(overrides))
    return T.Trainer(T.load_data(data_dir), cfg, save_dir, device="cpu").fit(resume=resume)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def max_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def events(save_dir: Path, kind: str) -> list[dict]:
    lines = (save_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["kind"] == kind]


@pytest.fixture(scope="module")
def two_ranks(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, str]]]:
    """An uninterrupted 2-rank run, update_freq 1, dropout 0."""
    save = tmp_path_factory.mktemp("two_ranks")
    return save, run_ranks(data_dir, save)


@pytest.fixture(scope="module")
def one_rank_uf2(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The same training on one process with update_freq 2."""
    save = tmp_path_factory.mktemp("one_rank")
    return save, run_single(data_dir, save, "train.update_freq=2")


# --- 2 ranks == 1 process with update_freq 2 -----------------------------------------------------
def test_two_ranks_equal_one_process_with_update_freq_2(data_dir, two_ranks, one_rank_uf2, tmp_path):
    ddp_dir, outs = two_ranks
    one_dir, summary = one_rank_uf2
    assert summary["updates"] == UPDATES and summary["epochs"] < 1  # one epoch: no trimmed tail involved
    assert max_diff(ddp_dir / T.LAST, one_dir / T.LAST) < 1e-5
    for numbered in ("checkpoint_4.pt", "checkpoint_8.pt"):
        assert max_diff(ddp_dir / numbered, one_dir / numbered) < 1e-5
    # the logged loss is the global one: the same numbers as the single process logs
    ddp_train, one_train = events(ddp_dir, "train"), events(one_dir, "train")
    assert [e["update"] for e in ddp_train] == list(range(1, UPDATES + 1))  # rank 0 alone writes, once each
    for a, b in zip(ddp_train, one_train):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["gnorm"] == pytest.approx(b["gnorm"], rel=1e-4)
    ddp_valid, one_valid = events(ddp_dir, "valid"), events(one_dir, "valid")
    assert [e["update"] for e in ddp_valid] == [4, 8]
    assert [e["loss"] for e in ddp_valid] == pytest.approx([e["loss"] for e in one_valid], rel=1e-5)
    # the comparison can fail: one process with update_freq 1 trains differently
    run_single(data_dir, tmp_path / "uf1")
    assert max_diff(ddp_dir / T.LAST, tmp_path / "uf1" / T.LAST) > 1e-3


def test_only_rank_0_writes_and_every_rank_rng_is_saved(two_ranks):
    ddp_dir, outs = two_ranks
    (out0, err0), (out1, err1) = outs
    summary = json.loads(out0.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["updates"] == UPDATES
    assert out1.strip() == ""  # the summary comes from rank 0 only
    assert not [p.name for p in ddp_dir.iterdir() if ".tmp-" in p.name]
    ck = load_checkpoint(ddp_dir / T.LAST)
    assert ck["data_state"]["world_size"] == 2
    ranks = ck["rng"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    assert torch.equal(ck["rng"]["torch"], ranks[0]["torch"])


# --- kill and resume --------------------------------------------------------------------------------
KILLABLE = textwrap.dedent("""
    import sys, time
    from mtkit.training import trainer as T
    step = T.Trainer.train_step
    def train_step(self, batches):
        if self.is_main and self.update == int(sys.argv[1]):  # between two checkpoints
            print("STOPPED", flush=True)
            time.sleep(600)
        return step(self, batches)
    T.Trainer.train_step = train_step
    from mtkit.cli import main
    main(sys.argv[2:], prog_name="mtkit")
""")


def test_killed_two_rank_run_resumes_to_the_same_weights(data_dir, tmp_path):
    # dropout on: the resumed ranks must get back their own RNG streams; 16 updates cross an epoch
    extra = ["model.dropout=0.1", "train.max_tokens=256", "train.max_updates=16", "train.validate_interval_updates=6"]
    straight = tmp_path / "straight"
    run_ranks(data_dir, straight, *extra)
    assert load_checkpoint(straight / T.LAST)["epoch"] >= 2

    killed = tmp_path / "killed"
    script = tmp_path / "killable.py"
    script.write_text(KILLABLE)
    argv = train_argv(data_dir, killed, *extra)[2:]  # drop "-m mtkit"
    procs = start_ranks([str(script), "10", *argv])
    try:
        ready, _, _ = select.select([procs[0].stdout], [], [], TIMEOUT)
        line = procs[0].stdout.readline() if ready else ""
        assert line.strip() == "STOPPED", f"rank 0 did not reach update 10: {line!r}"
    finally:
        kill_group(procs)  # SIGKILL both ranks mid-update 11
    assert load_checkpoint(killed / T.LAST)["update"] == 8
    assert max(e["update"] for e in events(killed, "train")) == 10  # logged past the checkpoint

    run_ranks(data_dir, killed, *extra, resume=True)
    a, b = weights(straight / T.LAST), weights(killed / T.LAST)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [(e["update"], e["loss"]) for e in events(straight, "train")] == [
        (e["update"], e["loss"]) for e in events(killed, "train")
    ]


SIGNALLED = textwrap.dedent("""
    import os, signal, sys
    from mtkit.training import trainer as T
    step = T.Trainer.train_step
    def train_step(self, batches):
        if self.rank == 1 and self.update == int(sys.argv[1]) - 1:  # only rank 1 is told to stop
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batches)
    T.Trainer.train_step = train_step
    from mtkit.cli import main
    main(sys.argv[2:], prog_name="mtkit")
""")


def test_sigterm_on_one_rank_stops_both_at_one_update_and_resumes_bit_exactly(data_dir, tmp_path):
    """The scheduler's SIGTERM may reach one rank first: both finish the same update, rank 0 alone
    writes it, both exit 143 (no rank left waiting in a collective), and --resume is bit-exact."""
    extra = ["model.dropout=0.1", "train.max_tokens=256", "train.max_updates=12", "train.validate_interval_updates=6"]
    straight = tmp_path / "straight"
    run_ranks(data_dir, straight, *extra)

    stopped = tmp_path / "stopped"
    script = tmp_path / "signalled.py"
    script.write_text(SIGNALLED)
    at = 9  # between the checkpoints of updates 8 and 12
    procs = start_ranks([str(script), str(at), *train_argv(data_dir, stopped, *extra)[2:]])
    try:
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    except subprocess.TimeoutExpired:
        kill_group(procs)
        pytest.fail("a rank kept waiting after the other was signalled")
    assert [p.returncode for p in procs] == [143, 143], [err for _, err in outs]
    assert load_checkpoint(stopped / T.LAST)["update"] == at
    assert not list(stopped.glob("*.tmp*")), "a rank left a partial write"

    run_ranks(data_dir, stopped, *extra, resume=True)
    a, b = load_checkpoint(straight / T.LAST), load_checkpoint(stopped / T.LAST)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert [(e["update"], e["loss"]) for e in events(straight, "train")] == [
        (e["update"], e["loss"]) for e in events(stopped, "train")
    ]


# --- changing the number of ranks --------------------------------------------------------------------
def resume_dir(src: Path, dst: Path, update: int) -> Path:
    dst.mkdir()
    shutil.copyfile(src / f"checkpoint_{update}.pt", dst / T.LAST)
    return dst


def test_two_rank_checkpoint_resumes_on_one_rank_with_a_warning(data_dir, two_ranks, tmp_path, caplog):
    ddp_dir, _ = two_ranks
    # update_freq 2 on one process keeps the effective batch: the run ends where the 2-rank run did
    save = resume_dir(ddp_dir, tmp_path / "uf2", 4)
    with caplog.at_level(logging.WARNING, logger="mtkit"):
        summary = run_single(data_dir, save, "train.update_freq=2", resume=True)
    assert summary["updates"] == UPDATES
    warned = [r.getMessage() for r in caplog.records if "rank(s)" in r.getMessage()]
    assert len(warned) == 1 and "written by 2 rank(s), this run has 1" in warned[0]
    assert "stays the same" in warned[0]
    assert max_diff(ddp_dir / T.LAST, save / T.LAST) < 1e-5

    # update_freq 1: half the effective batch, said so; the data goes on after the 8 batches seen
    caplog.clear()
    save = resume_dir(ddp_dir, tmp_path / "uf1", 4)
    trainer = T.Trainer(T.load_data(data_dir), load_config("transformer_tiny", BASE), save, device="cpu")
    with caplog.at_level(logging.WARNING, logger="mtkit"):
        trainer.restore(save / T.LAST)
    assert "changes from 2 x 1 x 128 = 256 to 1 x 1 x 128 = 128 tokens" in caplog.text
    assert trainer.update == 4 and trainer.batches.position == 8


def test_one_rank_checkpoint_resumes_on_two_ranks_via_nproc(data_dir, two_ranks, one_rank_uf2, tmp_path):
    ddp_dir, _ = two_ranks
    one_dir, _ = one_rank_uf2
    save = resume_dir(one_dir, tmp_path / "up", 4)
    # `mtkit train --nproc 2`: torchrun (standalone) on this machine starts the two ranks
    argv = train_argv(data_dir, save, resume=True) + ["--nproc", "2"]
    res = subprocess.run([sys.executable, *argv], env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("written by 1 rank(s), this run has 2") == 1  # -q still shows warnings, once
    (line,) = res.stdout.strip().splitlines()  # one summary, from rank 0
    assert json.loads(line)["world_size"] == 2 and json.loads(line)["updates"] == UPDATES
    assert max_diff(ddp_dir / T.LAST, save / T.LAST) < 1e-5


# --- NaN on one rank ----------------------------------------------------------------------------------
POISON = textwrap.dedent("""
    import os, sys, torch
    from mtkit.training import step
    loss_fn, calls = step.projected_nll, [0]
    def poisoned(*args):
        loss, nll, n = loss_fn(*args)
        if torch.is_grad_enabled() and os.environ["RANK"] == "1":
            calls[0] += 1
            if calls[0] == int(sys.argv[1]):  # a NaN value with finite gradients: only this rank sees it
                loss = loss + torch.full_like(loss, float("nan")).detach()
        return loss, nll, n
    step.projected_nll = poisoned
    from mtkit.cli import main
    main(sys.argv[2:], prog_name="mtkit")
""")


def test_nan_on_one_rank_is_skipped_by_every_rank(data_dir, tmp_path):
    script = tmp_path / "poison.py"
    script.write_text(POISON)
    save = tmp_path / "nan"
    (out0, err0), _ = finish(start_ranks([str(script), "3", *train_argv(data_dir, save)[2:]]))
    summary = json.loads(out0.strip().splitlines()[-1])
    assert summary["updates"] == UPDATES and summary["skipped_updates"] == 1
    assert "non-finite loss" in err0  # rank 0 logs the skip it agreed to, though its own loss was finite
    assert all(torch.isfinite(t.float()).all() for t in weights(save / T.LAST).values())
    assert [e["update"] for e in events(save, "train")] == list(range(1, UPDATES + 1))

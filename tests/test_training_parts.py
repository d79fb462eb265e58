"""The trainer's parts on their own: the torchrun command line, the early-stopping record, the
stop conditions, the validation BLEU batches, the checkpoint rotation and the train events."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mtkit.checkpoint import LAST, link_or_copy, rotate
from mtkit.cli import main
from mtkit.config import DecodeConfig, TrainConfig
from mtkit.errors import MtkitError
from mtkit.training import distributed
from mtkit.training.distributed import RankGroup, rank_seed, rank_train_args, torchrun_argv
from mtkit.training.metrics import MetricsLog, TrainWindow, UpdateProgress
from mtkit.training.step import split_batch
from mtkit.training.validation import EarlyStopping, bleu_batches, stop_reason

ONE_PROCESS = RankGroup(0, 1, torch.device("cpu"))


# --- launching ranks ------------------------------------------------------------------------------
def test_rank_arguments_repeat_the_command_without_nproc():
    args = rank_train_args("data", "cfg.yaml", "ck", ["train.lr=1", "model.dropout=0"], True, "cpu", verbosity=-1,
                           debug=True)
    assert args == ["-q", "--debug", "train", "data", "-c", "cfg.yaml", "--save-dir", "ck", "--device", "cpu",
                    "--set", "train.lr=1", "--set", "model.dropout=0", "--resume"]
    assert rank_train_args("d", "c", "s", [], False, "auto", verbosity=1)[:2] == ["-v", "train"]
    assert rank_train_args("d", "c", "s", [], False, "auto")[-1] == "auto"  # no --resume, no flags


def test_torchrun_argv_runs_mtkit_as_local_ranks():
    argv = torchrun_argv(3, ["train", "d"])
    assert argv == ["--standalone", "--nproc-per-node=3", "-m", "mtkit", "train", "d"]
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(argv)  # what launch_local hands torchrun
    assert parsed.standalone and parsed.nproc_per_node == "3" and parsed.module
    assert parsed.training_script == "mtkit" and parsed.training_script_args == ["train", "d"]


def test_cli_nproc_launches_the_ranks_and_passes_their_exit_code(monkeypatch):
    calls = []

    def launch(nproc, args, device="auto"):
        calls.append((nproc, args, device))
        return 3

    monkeypatch.setattr(distributed, "launch_local", launch)
    res = CliRunner().invoke(main, ["-v", "train", "data", "-c", "transformer_tiny", "--save-dir", "ck", "--nproc", "2",
                                    "--set", "train.lr=0.01", "--resume", "--device", "cpu"])
    assert res.exit_code == 3 and res.stdout == ""
    assert calls == [(2, ["-v", "train", "data", "-c", "transformer_tiny", "--save-dir", "ck", "--device", "cpu",
                          "--set", "train.lr=0.01", "--resume"], "cpu")]
    res = CliRunner().invoke(main, ["train", "data", "-c", "transformer_tiny", "--save-dir", "ck", "--nproc", "-2"])
    assert res.exit_code == 1 and "--nproc must be positive, got -2" in res.stderr


def test_environment_parsing(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.distributed_env() == (0, 1, 0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.distributed_env() == (1, 2, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(MtkitError, match="bad torch.distributed environment"):
        distributed.distributed_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(MtkitError, match="RANK='x' is not an integer"):
        distributed.distributed_env()


def test_one_process_collectives_are_the_identity():
    assert ONE_PROCESS.sum([1.5, 2.0]) == [1.5, 2.0] and ONE_PROCESS.agree("a") == "a"
    assert ONE_PROCESS.any(True) and not ONE_PROCESS.any(False) and ONE_PROCESS.gather(7) == [7]
    assert rank_seed(1, 1) != rank_seed(1, 2) != rank_seed(2, 1)


# --- early stopping and the stop conditions ---------------------------------------------------------
def test_early_stopping_records_the_best_and_counts_stale_validations():
    stopping = EarlyStopping("loss", bleu_enabled=False)
    assert stopping.record({"loss": 3.0, "bleu": None}) and stopping.best == 3.0
    assert not stopping.is_better({"loss": 3.5, "bleu": None}) and stopping.stale == 0  # asking records nothing
    assert not stopping.record({"loss": 3.5, "bleu": None}) and stopping.stale == 1
    assert stopping.record({"loss": 2.0, "bleu": None}) and (stopping.best, stopping.stale) == (2.0, 0)
    assert not stopping.exhausted(1) and not stopping.exhausted(0)
    stopping.record({"loss": 2.5, "bleu": None})
    assert stopping.exhausted(1) and not stopping.exhausted(0)  # 0: never


def test_early_stopping_on_bleu_is_higher_better_and_falls_back_to_loss(caplog):
    bleu = EarlyStopping("bleu", bleu_enabled=True)
    assert bleu.record({"loss": 3.0, "bleu": 10.0}) and not bleu.record({"loss": 1.0, "bleu": 9.0})
    assert bleu.record({"loss": 4.0, "bleu": 11.0}) and bleu.metric == "bleu"
    with caplog.at_level(logging.WARNING, logger="mtkit.train"):
        no_bleu = EarlyStopping("bleu", bleu_enabled=True)
        no_bleu.record({"loss": 3.0, "bleu": None})
    assert no_bleu.metric == "loss" and any("no validation BLEU" in r.getMessage() for r in caplog.records)
    restored = EarlyStopping("bleu", bleu_enabled=True)
    restored.load_state_dict(bleu.state_dict())
    assert restored.state_dict() == {"best": 11.0, "best_metric": "bleu", "stale": 0}
    restored.load_state_dict({})
    assert restored.state_dict() == {"best": None, "best_metric": None, "stale": 0}


def test_stop_reasons_in_order():
    stopping = EarlyStopping("loss", bleu_enabled=False)
    cfg = TrainConfig(max_updates=10, max_epochs=2, max_time_minutes=1.0, patience=1)
    assert stop_reason(cfg, 9, 2, 59.0, stopping, ONE_PROCESS) is None
    assert stop_reason(cfg, 10, 1, 0.0, stopping, ONE_PROCESS) == "reached max_updates 10"
    assert stop_reason(cfg, 1, 3, 0.0, stopping, ONE_PROCESS) == "reached max_epochs 2"
    assert stop_reason(cfg, 1, 1, 60.0, stopping, ONE_PROCESS) == "reached max_time_minutes 1.0"
    stopping.record({"loss": 1.0})
    stopping.record({"loss": 2.0})
    assert "early stopping" in stop_reason(cfg, 1, 1, 0.0, stopping, ONE_PROCESS)
    with pytest.raises(MtkitError, match="set at least one of train.max_updates"):
        stop_reason(TrainConfig(), 0, 1, 0.0, stopping, ONE_PROCESS)


# --- batches ---------------------------------------------------------------------------------------
def test_bleu_batches_by_sentences_or_by_tokens_per_hypothesis():
    lens = np.array([5, 1, 4, 2, 3])
    by_sentences = bleu_batches(lens, DecodeConfig(batch_size=2))
    assert [b.tolist() for b in by_sentences] == [[1, 3], [4, 2], [0]]  # length-sorted
    by_tokens = bleu_batches(lens, DecodeConfig(beam=2, max_tokens=12))  # 6 source tokens per batch
    assert sorted(i for b in by_tokens for i in b.tolist()) == [0, 1, 2, 3, 4]
    assert all(len(b) * (lens[b].max() + 1) <= 6 or len(b) == 1 for b in by_tokens)


class _Lengths:
    def __init__(self, src: list[int], tgt: list[int]):
        self.src_lens, self.tgt_lens = np.array(src), np.array(tgt)


def test_split_batch_keeps_order_and_budget():
    data = _Lengths([3, 3, 3, 3], [1, 1, 1, 7])
    batch = np.arange(4)
    assert split_batch(data, batch, 0) == [batch]
    runs = split_batch(data, batch, 16)  # width 8: 32 padded tokens -> 2 runs
    assert [r.tolist() for r in runs] == [[0, 1], [2, 3]]
    assert split_batch(data, np.array([2]), 1)[0].tolist() == [2]  # one sentence: never cut


# --- records ---------------------------------------------------------------------------------------
def test_rotation_keeps_the_newest_numbered_checkpoints(tmp_path):
    for update in (4, 8, 12, 16):
        (tmp_path / f"checkpoint_{update}.pt").write_bytes(b"x")
    (tmp_path / LAST).write_bytes(b"x")
    rotate(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_12.pt", "checkpoint_16.pt", LAST]
    rotate(tmp_path, 0)
    assert [p.name for p in tmp_path.iterdir()] == [LAST]


def test_link_or_copy_replaces_the_target(tmp_path):
    (tmp_path / "a").write_bytes(b"new")
    (tmp_path / "b").write_bytes(b"old")
    link_or_copy(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_train_events_every_log_interval(tmp_path, monkeypatch):
    monkeypatch.setattr("mtkit.training.metrics.progress_enabled", lambda: False)
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    progress = UpdateProgress(log, log_interval=2, max_updates=0, update=0, is_main=True)
    for update in (1, 2, 3):
        stats = {"loss": 4.0 * update, "nll": 2.0, "ntok": 2, "gnorm": 1.0, "lr": 0.1}
        progress.add(stats, 0.5, update, 1, float(update))
    progress.close()
    events = [json.loads(x) for x in log.path.read_text().splitlines()]
    assert len(events) == 1
    assert events[0] == {"kind": "train", "update": 2, "epoch": 1, "loss": 3.0, "ppl": pytest.approx(np.e),
                         "lr": 0.1, "gnorm": 1.0, "tgt_tokens_per_s": 4.0, "elapsed": 2.0}
    assert progress.window == TrainWindow(loss=12.0, nll=2.0, ntok=2, gnorm=1.0, updates=1, seconds=0.5)
    log.truncate(1)
    assert log.path.read_text() == ""
    MetricsLog(log.path, enabled=False).write({"kind": "train", "update": 5})
    assert log.path.read_text() == ""  # only rank 0 writes

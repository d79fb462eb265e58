"""The shared trainer: exact resume, NaN handling, refusals, schedules, loss, CLI."""

from __future__ import annotations

import json
import logging
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from mtkit.checkpoint import load_checkpoint, load_model
from mtkit.cli import main
from mtkit.config import load_config
from mtkit.data.batching import BatchIterator
from mtkit.data.dataset import ListDataset
from mtkit.data.subword import train_sentencepiece
from mtkit.errors import MtkitError
from mtkit.training import builders
from mtkit.training import step as update_step
from mtkit.training import trainer as T
from mtkit.training.step import projected_nll

V = 32


@pytest.fixture(scope="module")
def spm():
    words = ["a b c", "d e f g", "h i j", "k l m n o", "p q r", "s t u v"]
    return train_sentencepiece((words[i % 6] for i in range(200)), vocab_size=V)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_pairs(n: int, seed: int, reverse: bool = False) -> ListDataset:
    rng = np.random.default_rng(seed)
    src = [rng.integers(4, V, rng.integers(2, 9)) for _ in range(n)]
    return ListDataset(src, [s[::-1] if reverse else s for s in src])


def data(spm, n_train: int = 60, n_valid: int = 8) -> T.TrainData:
    return T.TrainData(random_pairs(n_train, 0), random_pairs(n_valid, 1), spm, spm)


def tiny_cfg(*overrides: str):
    base = [
        "model.d_model=16", "model.ffn_dim=32", "model.heads=2", "model.encoder_layers=1", "model.decoder_layers=1",
        "train.max_tokens=64", "train.update_freq=2", "train.warmup_updates=4", "train.lr=0.002",
        "train.log_interval=2", "train.validate_interval_updates=4", "train.save_interval_updates=4",
        "train.valid_bleu=false", "decode.beam=1",
    ]
    return load_config("transformer_tiny", base + list(overrides))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


# --- resume ------------------------------------------------------------------------------------
def test_resume_is_bit_exact(spm, tmp_path):
    straight = T.Trainer(data(spm), tiny_cfg("train.max_updates=12"), tmp_path / "a", device="cpu").fit()
    first = T.Trainer(data(spm), tiny_cfg("train.max_updates=6"), tmp_path / "b", device="cpu").fit()
    assert first["updates"] == 6
    resumed = T.Trainer(data(spm), tiny_cfg("train.max_updates=12"), tmp_path / "b", device="cpu").fit(resume=True)
    assert straight["updates"] == resumed["updates"] == 12
    assert straight["epochs"] > 1  # the runs crossed an epoch boundary
    a, b = weights(tmp_path / "a" / T.LAST), weights(tmp_path / "b" / T.LAST)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the same valid metrics and the same training log (the interrupted run also validated
    # when it stopped at update 6)
    assert straight["valid"] == resumed["valid"]

    def train_events(run: str) -> list[tuple[int, float]]:
        events = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(e["update"], e["loss"]) for e in events if e["kind"] == "train"]

    assert train_events("a") == train_events("b") and len(train_events("a")) == 6


def same_tensors(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors and numbers are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("signame,seed", [("SIGTERM", 0), ("SIGINT", 1), ("SIGTERM", 2), ("SIGINT", 3)])
def test_a_stop_signal_saves_the_update_and_resume_is_bit_exact(spm, tmp_path, signame, seed):
    import os
    import random
    import signal

    from mtkit.signals import Interrupted

    signum = getattr(signal, signame)
    at = random.Random(seed).randint(1, 11)  # the signal arrives during this update
    T.Trainer(data(spm), tiny_cfg("train.max_updates=12"), tmp_path / "a", device="cpu").fit()
    trainer = T.Trainer(data(spm), tiny_cfg("train.max_updates=12"), tmp_path / "b", device="cpu")
    real_step = trainer.train_step

    def step(chunk):
        if trainer.update == at - 1:
            os.kill(os.getpid(), signum)  # handled at once: the update still completes
        return real_step(chunk)

    trainer.train_step = step
    handler_before = signal.getsignal(signum)
    with pytest.raises(Interrupted) as err:
        trainer.fit()
    assert err.value.exit_code == 128 + signum and f"at update {at}" in err.value.message
    assert signal.getsignal(signum) == handler_before and trainer.update == at  # the handler is put back
    assert load_checkpoint(tmp_path / "b" / T.LAST)["update"] == at
    T.Trainer(data(spm), tiny_cfg("train.max_updates=12"), tmp_path / "b", device="cpu").fit(resume=True)
    a, b = load_checkpoint(tmp_path / "a" / T.LAST), load_checkpoint(tmp_path / "b" / T.LAST)
    same_tensors(a["model"], b["model"], "model")
    same_tensors(a["optimizer"], b["optimizer"], "optimizer")


def test_a_second_stop_signal_ends_the_process_at_once():
    import subprocess
    import sys

    code = (
        "import os, signal, time\n"
        "from mtkit.signals import stop_requests\n"
        "with stop_requests() as request:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.2)\n"
        "    print('first: requested' if request.requested else 'first: missed', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(2)\n"
        "    print('still running', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout == "first: requested\n" and proc.returncode == -15, (proc.stdout, proc.stderr)


def test_different_seed_differs(spm, tmp_path):
    T.Trainer(data(spm), tiny_cfg("train.max_updates=3"), tmp_path / "a", device="cpu").fit()
    T.Trainer(data(spm), tiny_cfg("train.max_updates=3", "train.seed=2"), tmp_path / "b", device="cpu").fit()
    a, b = weights(tmp_path / "a" / T.LAST), weights(tmp_path / "b" / T.LAST)
    assert not torch.equal(a["tgt_embed.weight"], b["tgt_embed.weight"])


def test_resume_other_architecture_refused(spm, tmp_path):
    T.Trainer(data(spm), tiny_cfg("train.max_updates=2"), tmp_path, device="cpu").fit()
    with pytest.raises(MtkitError, match="model.d_model"):
        T.Trainer(data(spm), tiny_cfg("train.max_updates=4", "model.d_model=32"), tmp_path, device="cpu").fit(resume=True)
    other = load_config("lstm_tiny", ["train.max_updates=4"])
    with pytest.raises(MtkitError, match="model.arch 'transformer'"):
        T.Trainer(data(spm), other, tmp_path, device="cpu").fit(resume=True)


def test_resume_other_vocab_refused(spm, tmp_path):
    T.Trainer(data(spm), tiny_cfg("train.max_updates=2"), tmp_path, device="cpu").fit()
    other = train_sentencepiece((w for w in ["xa yb zc wd", "ve uf tg sh", "ri qj pk ol"] * 100), vocab_size=V)
    d = T.TrainData(random_pairs(60, 0), None, other, other)
    with pytest.raises(MtkitError, match="another vocabulary"):
        T.Trainer(d, tiny_cfg("train.max_updates=4"), tmp_path, device="cpu").fit(resume=True)


def test_existing_checkpoints_need_resume(spm, tmp_path):
    T.Trainer(data(spm), tiny_cfg("train.max_updates=2"), tmp_path, device="cpu").fit()
    with pytest.raises(MtkitError, match="--resume"):
        T.Trainer(data(spm), tiny_cfg("train.max_updates=2"), tmp_path, device="cpu").fit()


def test_final_update_is_numbered_after_the_final_validation(spm, tmp_path):
    """Training ending between save intervals validates once more and still writes checkpoint_<update>."""
    T.Trainer(data(spm), tiny_cfg("train.max_updates=14", "train.keep_last=2"), tmp_path, device="cpu").fit()
    numbered = sorted(p.name for p in tmp_path.glob("checkpoint_[0-9]*.pt"))
    assert numbered == ["checkpoint_12.pt", "checkpoint_14.pt"]
    assert load_checkpoint(tmp_path / T.LAST)["update"] == 14
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["update"] for e in events if e["kind"] == "valid"] == [4, 8, 12, 14]


def test_checkpoints_rotation_and_best(spm, tmp_path):
    s = T.Trainer(data(spm), tiny_cfg("train.max_updates=16", "train.keep_last=2"), tmp_path, device="cpu").fit()
    numbered = sorted(p.name for p in tmp_path.glob("checkpoint_[0-9]*.pt"))
    assert numbered == ["checkpoint_12.pt", "checkpoint_16.pt"]
    best = load_checkpoint(tmp_path / T.BEST)
    assert best["metrics"]["loss"] == pytest.approx(s["best"]["value"])
    last = load_checkpoint(tmp_path / T.LAST)
    assert last["update"] == 16 and last["metrics"]["update"] == 16
    for key in ("optimizer", "scheduler", "data_state", "rng", "spm", "vocab", "train_state"):
        assert key in last
    model, cfg, src_spm, _ = load_model(tmp_path / T.LAST)
    assert cfg.model.d_model == 16 and src_spm.model_bytes == spm.model_bytes
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_ev = [e for e in events if e["kind"] == "train"]
    valid_ev = [e for e in events if e["kind"] == "valid"]
    assert [e["update"] for e in valid_ev] == [4, 8, 12, 16]
    for e in train_ev:
        assert {"loss", "ppl", "lr", "gnorm", "tgt_tokens_per_s", "elapsed"} <= e.keys()
        assert e["tgt_tokens_per_s"] > 0 and math.isfinite(e["loss"])


def test_early_stopping(spm, tmp_path):
    # lr 0 after warmup: the valid loss cannot improve, so patience 2 stops after 3 validations
    cfg = tiny_cfg("train.max_updates=100", "train.lr_scheduler=constant", "train.lr=0.0",
                   "train.warmup_updates=0", "train.patience=2", "train.early_stop_metric=loss")
    s = T.Trainer(data(spm), cfg, tmp_path, device="cpu").fit()
    assert s["updates"] == 12 and "early stopping" in s["stop_reason"]


# --- NaN / inf ---------------------------------------------------------------------------------
def test_nan_updates_skipped_then_training_goes_on(spm, tmp_path, monkeypatch):
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        loss, nll, n = projected_nll(*args)
        return (loss * float("nan") if calls["n"] in (3, 4, 5) else loss), nll, n

    monkeypatch.setattr(update_step, "projected_nll", flaky)
    s = T.Trainer(data(spm), tiny_cfg("train.max_updates=6", "train.max_bad_updates=3"), tmp_path, device="cpu").fit()
    assert s["updates"] == 6 and s["skipped_updates"] == 2  # calls 3-4 = update 2, call 5 = update 3
    for t in weights(tmp_path / T.LAST).values():
        assert torch.isfinite(t.float()).all()


def test_nan_in_a_row_stops_and_keeps_last_good(spm, tmp_path, monkeypatch):
    T.Trainer(data(spm), tiny_cfg("train.max_updates=4"), tmp_path, device="cpu").fit()
    good = weights(tmp_path / T.LAST)

    def broken(*args):
        loss, nll, n = projected_nll(*args)
        return loss + float("inf"), nll, n

    monkeypatch.setattr(update_step, "projected_nll", broken)
    with pytest.raises(MtkitError, match="3 updates in a row"):
        T.Trainer(data(spm), tiny_cfg("train.max_updates=8", "train.max_bad_updates=3"), tmp_path, device="cpu").fit(resume=True)
    assert load_checkpoint(tmp_path / T.LAST)["update"] == 4
    after = weights(tmp_path / T.LAST)
    assert all(torch.equal(good[k], after[k]) for k in good)


# --- batching ----------------------------------------------------------------------------------
def test_batches_respect_budget_and_cover_epoch():
    rng = np.random.default_rng(0)
    s, t = rng.integers(1, 30, 500), rng.integers(1, 30, 500)
    it = BatchIterator(s, t, max_tokens=200, seed=3)
    batches = it.epoch_batches(1)
    cost = np.maximum(s, t) + 1
    assert all(len(b) * cost[b].max() <= 200 for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))
    padded = sum(len(b) * cost[b].max() for b in batches)
    assert cost.sum() / padded > 0.9  # bucketing: little padding
    again = BatchIterator(s, t, max_tokens=200, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again.epoch_batches(1)))
    assert not all(np.array_equal(a, b) for a, b in zip(batches, it.epoch_batches(2)))


def test_batch_iterator_resumes_position_and_shards():
    rng = np.random.default_rng(1)
    s, t = rng.integers(1, 20, 300), rng.integers(1, 20, 300)
    it = BatchIterator(s, t, max_tokens=100, seed=5)
    for _ in range(7):
        it.next_batch()
    state = it.state_dict()
    other = BatchIterator(s, t, max_tokens=100, seed=5)
    other.load_state_dict(state)
    assert np.array_equal(it.next_batch(), other.next_batch())
    shards = [BatchIterator(s, t, max_tokens=100, seed=5, rank=r, world_size=2).epoch_batches(1) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1])
    assert not set(np.concatenate(shards[0]).tolist()) & set(np.concatenate(shards[1]).tolist())


def test_length_limits_skip_pairs():
    it = BatchIterator(np.array([3, 50, 4]), np.array([3, 4, 60]), max_tokens=100, max_src_len=20, max_tgt_len=20)
    assert it.skipped == 2 and np.concatenate(it.epoch_batches(1)).tolist() == [0]


# --- time decay and loss ---------------------------------------------------------------------------
def test_trainer_decays_the_lr_by_training_time(spm, tmp_path, monkeypatch):
    """With time_decay the trainer hands the scheduler its elapsed training time: the logged lr
    falls below the constant schedule's as the (fake) clock runs towards the budget."""
    clock = iter(range(10_000))
    fake_time = types.SimpleNamespace(perf_counter=lambda: float(next(clock)) * 3.0)  # each call: 3 s later
    monkeypatch.setattr(T, "time", fake_time)
    cfg = tiny_cfg("train.lr_scheduler=constant", "train.warmup_updates=0", "train.max_updates=0",
                   "train.max_time_minutes=1", "train.time_decay=linear")
    out = T.Trainer(data(spm), cfg, tmp_path / "ck").fit()
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "ck" / "metrics.jsonl").read_text().splitlines()
           if json.loads(x)["kind"] == "train"]
    assert out["stop_reason"].startswith("reached max_time_minutes") and len(lrs) >= 3
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 0.002 and lrs[-1] < 0.002 * 0.5


def smoothed_ce(logits, target, pad, eps):
    """Reference: torch's label-smoothed cross entropy and nll, summed over non-pad tokens."""
    flat, tgt = logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1)
    loss = F.cross_entropy(flat, tgt, ignore_index=pad, label_smoothing=eps, reduction="sum")
    nll = F.cross_entropy(flat, tgt, ignore_index=pad, reduction="sum")
    return loss, nll, int((tgt != pad).sum())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_projected_nll_equals_projection_then_loss(bias, eps):
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 37, bias=bias)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    target = torch.randint(1, 37, (3, 7))
    target[0, 5:] = 0  # pad
    ref_loss, ref_nll, ref_n = smoothed_ce(layer(hidden), target, pad=0, eps=eps)
    ref_loss.backward()
    ref_grads = [t.grad.clone() for t in (hidden, *layer.parameters())]
    for t in (hidden, *layer.parameters()):
        t.grad = None
    loss, nll, n = projected_nll(hidden, layer, target, pad=0, eps=eps, chunk=4)  # 21 rows: 6 passes
    (2.0 * loss).backward()
    assert n == ref_n == 19
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    assert float(nll) == pytest.approx(float(ref_nll.detach()), rel=1e-5)
    for ref, t in zip(ref_grads, (hidden, *layer.parameters())):
        torch.testing.assert_close(t.grad, 2.0 * ref, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # validation: the same numbers, no gradients made
        loss2, nll2, _ = projected_nll(hidden, layer, target, pad=0, eps=eps)
    assert float(loss2) == pytest.approx(float(loss.detach()), rel=1e-5) and float(nll2) == pytest.approx(float(nll), rel=1e-5)


def test_projected_nll_in_bfloat16_is_as_close_as_autocast():
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 50, bias=False)
    hidden = torch.randn(40, 32, requires_grad=True)
    target = torch.randint(1, 50, (40,))

    def grad_of(run) -> tuple[float, torch.Tensor]:
        layer.weight.grad = None
        loss = run()
        loss.backward()
        return float(loss.detach()), layer.weight.grad.clone()

    exact_loss, exact = grad_of(lambda: smoothed_ce(layer(hidden), target, 0, 0.1)[0])

    def autocast_loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = layer(hidden)
        return smoothed_ce(logits, target, 0, 0.1)[0]

    amp_loss, amp = grad_of(autocast_loss)
    ours_loss, ours = grad_of(lambda: projected_nll(hidden, layer, target, 0, 0.1, dtype=torch.bfloat16, chunk=16)[0])
    assert hidden.grad.dtype == ours.dtype == torch.float32
    assert ours_loss == pytest.approx(amp_loss, rel=1e-4) and ours_loss == pytest.approx(exact_loss, rel=1e-2)
    assert 0 < (ours - exact).abs().max() <= 2 * (amp - exact).abs().max()  # bf16 matmuls, no worse than autocast


def test_label_smoothing_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0], [5.0, 1.0, 1.0, 1.0]]])
    target = torch.tensor([[1, 2, 0]])  # last position is pad (0)
    eps = 0.1
    identity = torch.nn.Linear(4, 4, bias=False)  # the features are the logits
    with torch.no_grad():
        identity.weight.copy_(torch.eye(4))
        loss, nll, n = projected_nll(logits, identity, target, pad=0, eps=eps)
    expect_loss = expect_nll = 0.0
    for row, y in ((logits[0, 0], 1), (logits[0, 1], 2)):
        logp = [x - math.log(sum(math.exp(v) for v in row.tolist())) for x in row.tolist()]
        q = [eps / 4 + (1 - eps if i == y else 0.0) for i in range(4)]
        expect_loss += -sum(qi * li for qi, li in zip(q, logp))
        expect_nll += -logp[y]
    assert n == 2
    assert float(loss) == pytest.approx(expect_loss, rel=1e-6)
    assert float(nll) == pytest.approx(expect_nll, rel=1e-6)
    ref = F.cross_entropy(logits[0], target[0], ignore_index=0, label_smoothing=eps, reduction="sum")
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)


# --- the command line --------------------------------------------------------------------------
def test_cli_train_on_preprocessed_dir(tmp_path, monkeypatch):
    import mtkit.utils
    from mtkit.data.preprocess import preprocess

    limited = []
    monkeypatch.setattr(mtkit.utils, "limit_onednn_caches", lambda: limited.append(1))

    rng = np.random.default_rng(0)
    words = ["house", "tree", "dog", "cat", "red", "blue", "small", "big"]
    for split, n in (("train", 200), ("val", 20)):
        lines = [" ".join(rng.choice(words, rng.integers(2, 6))) for _ in range(n)]
        (tmp_path / f"{split}.en").write_text("\n".join(lines) + "\n")
        (tmp_path / f"{split}.de").write_text("\n".join(x.upper() for x in lines) + "\n")
    preprocess("en", "de", str(tmp_path / "train"), str(tmp_path / "data"), valid_prefix=str(tmp_path / "val"), vocab_size=40, workers=1)
    args = ["-q", "train", str(tmp_path / "data"), "-c", "transformer_tiny", "--save-dir", str(tmp_path / "ck"),
            "--device", "cpu", "--set", "train.max_updates=3", "--set", "train.num_threads=1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["updates"] == 3 and Path(summary["best_checkpoint"]).exists()
    assert 0.0 <= summary["valid"]["bleu"] <= 100.0  # BLEU through the shared decoder
    assert limited == [1]  # training caps oneDNN's shape caches
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "error:" in res.stderr and "--resume" in res.stderr
    res = CliRunner().invoke(main, args[:2] + [str(tmp_path / "missing")] + args[3:])
    assert res.exit_code == 1 and "data directory not found" in res.stderr


def test_bf16_autocast_on_cpu_and_fp16_refused(spm, tmp_path, monkeypatch):
    monkeypatch.setattr(builders, "cpu_has_native_bf16", lambda: True)
    t = T.Trainer(data(spm), tiny_cfg("train.max_updates=2", "train.amp=bf16"), tmp_path / "a", device="cpu")
    assert t.autocast_dtype == torch.bfloat16
    s = t.fit()
    assert s["updates"] == 2 and math.isfinite(s["valid"]["loss"])
    assert all(v.dtype == torch.float32 for v in weights(tmp_path / "a" / T.LAST).values() if v.is_floating_point())
    assert T.Trainer(data(spm), tiny_cfg(), tmp_path / "b", device="cpu").autocast_dtype is None  # auto: fp32 on CPU
    with pytest.raises(MtkitError, match="fp16"):
        T.Trainer(data(spm), tiny_cfg("train.amp=fp16"), tmp_path / "c", device="cpu")


def test_bf16_on_a_cpu_without_bf16_instructions_trains_in_float32(spm, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(builders, "cpu_has_native_bf16", lambda: False)  # bf16 emulated: several times slower
    with caplog.at_level(logging.WARNING, logger="mtkit.train"):
        t = T.Trainer(data(spm), tiny_cfg("train.max_updates=1", "train.amp=bf16"), tmp_path, device="cpu")
    assert t.autocast_dtype is None
    assert any("no bf16 matmul instructions" in r.getMessage() and "float32" in r.getMessage() for r in caplog.records)
    said: list[str] = []  # the warning goes through the trainer's rank-0-only warn
    assert builders.autocast_dtype("bf16", torch.device("cpu"), said.append) is None and len(said) == 1
    passed = []
    real = builders.autocast_dtype
    monkeypatch.setattr(builders, "autocast_dtype", lambda amp, device, warn: passed.append(warn) or real(amp, device, warn))
    t = T.Trainer(data(spm), tiny_cfg("train.max_updates=1", "train.amp=bf16"), tmp_path / "b", device="cpu")
    assert passed == [t._warn]


def test_cpu_has_native_bf16_reads_torch_or_the_cpu_flags(monkeypatch, tmp_path):
    from mtkit import utils

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert utils.cpu_has_native_bf16()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not utils.cpu_has_native_bf16()
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # an older torch: the CPU flags decide
    real_cpu_info, info = utils.cpu_info, tmp_path / "cpuinfo"
    monkeypatch.setattr(utils, "cpu_info", lambda: real_cpu_info(info))
    for flags, native in (("fpu avx2 avx512f", False), ("fpu avx2 avx512f avx512_bf16", True), ("amx_bf16", True)):
        info.write_text(f"model name\t: Some CPU\nflags\t\t: {flags}\n")
        assert utils.cpu_has_native_bf16() == native, flags


def test_trim_memory_releases_free_memory_above_the_limit(spm, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(T, "release_free_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(T, "rss_gib", lambda: 3.0)  # as if the process held 3 GiB after each update
    T.Trainer(data(spm), tiny_cfg("train.max_updates=3", "train.trim_memory_gib=4"), tmp_path / "a", device="cpu").fit()
    assert calls == []  # under the limit
    T.Trainer(data(spm), tiny_cfg("train.max_updates=3", "train.trim_memory_gib=2.5"), tmp_path / "b", device="cpu").fit()
    assert len(calls) == 3  # over it: after every update
    T.Trainer(data(spm), tiny_cfg("train.max_updates=3"), tmp_path / "c", device="cpu").fit()
    assert len(calls) == 3  # 0: never


def test_rss_gib_follows_resident_memory():
    from mtkit.utils import rss_gib

    before = rss_gib()
    assert 0.01 < before < 64  # this process, in GiB
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert rss_gib() - before > 0.05
    del block


def test_passes_give_the_same_update_as_whole_batches(spm, tmp_path):
    def trained(path, *overrides):
        trainer = T.Trainer(data(spm), tiny_cfg("model.dropout=0.0", *overrides), path, device="cpu")
        trainer.train_step([trainer.batches.next_batch() for _ in range(2)])
        return trainer

    whole = trained(tmp_path / "a")
    split = trained(tmp_path / "b", "train.pass_tokens=16")
    batch = split.batches.next_batch()
    passes = update_step.split_batch(split.data.train, batch, split.train_cfg.pass_tokens)
    assert len(passes) > 1 and np.array_equal(np.concatenate(passes), batch)
    for p in passes:
        width = max(split.data.train.src_lens[p].max(), split.data.train.tgt_lens[p].max()) + 1
        assert len(p) == 1 or len(p) * width <= 16 + width  # within one sentence of the budget
    assert update_step.split_batch(whole.data.train, batch, whole.train_cfg.pass_tokens) == [batch]
    # the gradients of the update (the step's gradients stay in .grad until the next update)
    for (name, a), b in zip(whole.model.named_parameters(), split.model.parameters()):
        assert a.grad is not None and a.grad.abs().max() > 0, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=name)
    with pytest.raises(MtkitError, match="pass_tokens"):
        T.Trainer(data(spm), tiny_cfg("train.pass_tokens=-1"), tmp_path / "c", device="cpu")

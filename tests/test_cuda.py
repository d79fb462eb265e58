"""What only a CUDA device shows: autocast in training (every family) and in validation decoding,
the fp16 grad scaler (an overflow is skipped, the scale is saved and restored), the CUDA random
stream on resume, decoding in the weight dtype with float32 scores, CUDA search scores against CPU
re-scoring, a real CUDA out-of-memory error split away in translate, batches copied to the GPU
without waiting, the attention kernels torch picks against its reference kernel, and train /
translate on CUDA from the command line.

Every test is marked ``cuda`` and skipped without a CUDA device; ``bash benchmarks/gpu_check.sh``
runs them on a GPU (``pytest -m cuda tests/test_cuda.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY, Workspace, cli, get_workspace, line_count, sentences, sets, write_lines

from mtkit.checkpoint import load_checkpoint
from mtkit.config import load_config
from mtkit.data.batching import collate_source, collate_target
from mtkit.decoding import search, search_base
from mtkit.decoding.translate import DTYPES, Translator, translate_file
from mtkit.training import step as update_step
from mtkit.training import trainer as T

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TRAIN_ONLY = [o for o in TINY if not o.startswith("model.")]  # the tiny settings every family takes
FAMILIES = ["transformer_tiny", "lstm_tiny", "bahdanau_tiny", "luong_tiny", "gnmt_tiny"]
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
MiB = 2**20


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return get_workspace(tmp_path_factory)


def tiny_cfg(preset: str = "transformer_tiny", *extra: str):
    return load_config(preset, [*(TINY if preset == "transformer_tiny" else TRAIN_ONLY), *extra])


def cuda_trainer(workspace: Workspace, save_dir: Path, preset: str = "transformer_tiny", *extra: str) -> T.Trainer:
    return T.Trainer(T.load_data(workspace.data), tiny_cfg(preset, *extra), save_dir, device="cuda")


def next_batches(t: T.Trainer) -> list:
    b = t.batches.next_batch()
    if b is None:
        t.batches.next_epoch()
        b = t.batches.next_batch()
    return [b]


def float_weights(t: T.Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.model.state_dict().items() if v.is_floating_point()}


def train_losses(save_dir: Path) -> dict[int, float]:
    events = [json.loads(x) for x in (save_dir / "metrics.jsonl").read_text().splitlines()]
    return {e["update"]: e["loss"] for e in events if e["kind"] == "train"}


# --- training: autocast and the grad scaler -------------------------------------------------------
def test_amp_modes_choose_the_autocast_dtype_and_the_grad_scaler(workspace, tmp_path):
    auto = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    for amp, dtype in (("auto", auto), ("bf16", torch.bfloat16), ("fp16", torch.float16), ("none", None)):
        t = cuda_trainer(workspace, tmp_path / amp, "transformer_tiny", f"train.amp={amp}")
        assert t.autocast_dtype == dtype, amp
        assert (t.scaler is not None) == (dtype == torch.float16), amp
        assert all(p.is_cuda for p in t.model.parameters())


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("preset", FAMILIES)
def test_training_steps_run_under_autocast_with_float32_weights(workspace, tmp_path, monkeypatch, preset, amp):
    t = cuda_trainer(workspace, tmp_path, preset, f"train.amp={amp}")
    forward_autocast, loss_dtypes = [], []
    t.model.register_forward_pre_hook(
        lambda module, args: forward_autocast.append((torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")))
    )
    loss_fn = update_step.projected_nll

    def spy(hidden, layer, target, pad, eps, dtype=None, chunk=None):
        loss_dtypes.append(dtype)
        return loss_fn(hidden, layer, target, pad, eps, dtype, chunk)

    monkeypatch.setattr(update_step, "projected_nll", spy)
    before = float_weights(t)
    results = [t.train_step(next_batches(t)) for _ in range(3)]
    applied = [r for r in results if r is not None]
    assert applied and all(math.isfinite(r["loss"]) for r in applied)
    assert forward_autocast and all(on and dtype == LOW[amp] for on, dtype in forward_autocast)
    assert loss_dtypes and all(d == LOW[amp] for d in loss_dtypes)  # the output projection's matmul
    after = t.model.state_dict()
    assert all(after[k].dtype == torch.float32 for k in before)  # master weights stay float32
    assert any(not torch.equal(before[k], after[k]) for k in before)  # and the updates reached them


def test_fp16_overflow_skips_the_step_and_halves_the_loss_scale(workspace, tmp_path):
    t = cuda_trainer(workspace, tmp_path, "transformer_tiny", "train.amp=fp16")
    assert t.train_step(next_batches(t)) is not None
    t.scaler.update(2.0**60)  # the scaled gradients cannot fit in float16
    before = float_weights(t)
    stats = t.train_step(next_batches(t))
    assert stats is not None and math.isfinite(stats["loss"]) and not math.isfinite(stats["gnorm"])
    after = t.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the optimizer step was skipped
    assert t.scaler.get_scale() == 2.0**59


def test_fp16_loss_scale_is_saved_and_restored(workspace, tmp_path):
    t = cuda_trainer(workspace, tmp_path, "transformer_tiny", "train.amp=fp16")
    t.train_step(next_batches(t))
    t.scaler.update(1024.0)  # not the initial scale, so that restoring has something to do
    t.save(numbered=False)
    saved = load_checkpoint(tmp_path / T.LAST)["scaler"]
    assert saved["scale"] == 1024.0
    fresh = cuda_trainer(workspace, tmp_path, "transformer_tiny", "train.amp=fp16")
    assert fresh.scaler.get_scale() != 1024.0
    fresh.restore(tmp_path / T.LAST)
    assert fresh.scaler.get_scale() == 1024.0


def test_validation_decodes_under_the_training_autocast(workspace, tmp_path, monkeypatch):
    t = cuda_trainer(workspace, tmp_path, "transformer_tiny", "train.amp=bf16", "train.valid_bleu=true",
                     "train.valid_bleu_max_sentences=8")
    seen = []
    step = search_base.Ensemble.step

    def spy(self, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(search_base.Ensemble, "step", spy)
    metrics = t.validate()
    assert seen and all(on and dtype == torch.bfloat16 for on, dtype in seen)
    assert metrics["bleu"] is not None and math.isfinite(metrics["bleu"]) and math.isfinite(metrics["loss"])


def test_resume_on_cuda_continues_the_cuda_random_stream(workspace, tmp_path, monkeypatch):
    """Dropout draws from the CUDA generator: a resumed run logs the losses of the straight run
    only if the checkpoint's CUDA random state is put back (compared by loss, which float noise
    of the kernels does not move the way different dropout masks do)."""
    cfg = tiny_cfg("transformer_tiny", "model.dropout=0.3", "train.amp=none", "train.max_updates=8",
                   "train.save_interval_updates=4", "train.validate_interval_updates=4", "train.keep_last=5")
    data = T.load_data(workspace.data)
    T.Trainer(data, cfg, tmp_path / "straight", device="cuda").fit()
    straight = train_losses(tmp_path / "straight")

    def resumed(name: str) -> dict[int, float]:
        (tmp_path / name).mkdir()
        shutil.copyfile(tmp_path / "straight" / "checkpoint_4.pt", tmp_path / name / T.LAST)
        shutil.copyfile(tmp_path / "straight" / "metrics.jsonl", tmp_path / name / "metrics.jsonl")
        T.Trainer(data, cfg, tmp_path / name, device="cuda").fit(resume=True)
        return train_losses(tmp_path / name)

    def worst(losses: dict[int, float]) -> float:
        return max(abs(losses[u] - straight[u]) / abs(straight[u]) for u in range(5, 9))

    assert worst(resumed("resumed")) < 1e-4
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: None)
    assert worst(resumed("without_cuda_rng")) > 1e-3  # the comparison can fail


# --- decoding ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_decoding_runs_in_the_weight_dtype_with_float32_scores(workspace, monkeypatch, dtype):
    tr = Translator.load(workspace.ckpt, device="cuda", dtype=dtype)
    assert all(p.is_cuda and p.dtype == DTYPES[dtype] for p in tr.models[0].parameters())
    cls = type(tr.models[0])
    step, seen = cls.step, []

    def spy(self, prev, enc, state, need_attn=True):
        log_probs, new_state, attn = step(self, prev, enc, state, need_attn)
        seen.append((log_probs.dtype, log_probs.device.type, {t.dtype for t in new_state.values() if t.is_floating_point()}))
        return log_probs, new_state, attn

    monkeypatch.setattr(cls, "step", spy)
    out = tr.translate(workspace.test_lines, beam=2, nbest=2)
    assert len(out) == len(workspace.test_lines)
    assert seen and all(d == torch.float32 and dev == "cuda" for d, dev, _ in seen)
    assert all(kinds <= {DTYPES[dtype]} for _, _, kinds in seen)  # the decoder caches keep the weight dtype
    assert all(math.isfinite(score) for nbest in out for _, score in nbest)


def test_cuda_beam_search_scores_equal_cpu_rescoring(workspace):
    gpu = Translator.load(workspace.ckpt, device="cuda")
    model = Translator.load(workspace.ckpt, device="cpu").models[0]
    cfg = dataclasses.replace(gpu.cfg, beam=3, nbest=1, max_len_a=0.0, max_len_b=6)
    ids = gpu.src_spm.encode(workspace.test_lines)
    src, src_len = collate_source(ids, gpu.src_spm.pad, gpu.src_spm.eos, gpu.max_src_len)
    bos, eos = gpu.tgt_spm.bos, gpu.tgt_spm.eos
    hyps = search.generate(gpu.models, src.cuda(), src_len.cuda(), cfg, bos, eos)
    assert len(hyps) == len(ids)
    with torch.no_grad():
        for i, nbest in enumerate(hyps):
            h = nbest[0]
            tgt_in, tgt_out = torch.tensor([[bos, *h.tokens]]), torch.tensor([[*h.tokens, eos]])
            log_probs = model(src[i : i + 1], src_len[i : i + 1], tgt_in).float().log_softmax(-1)
            rescored = float(log_probs.gather(2, tgt_out.unsqueeze(2)).sum())
            assert rescored == pytest.approx(h.log_prob, abs=1e-3), i


def test_real_cuda_out_of_memory_is_split_away_and_its_memory_freed(workspace, tmp_path, monkeypatch):
    """A step on more than 8 rows needs more GPU memory than the process may use: the allocator
    raises a real CUDA out-of-memory error while the failed step still holds memory. Translate
    must retry in halves with that memory given back, and finish every line."""
    from mtkit.models.transformer import Transformer

    lines = sentences(24, 5)
    inp = write_lines(tmp_path / "in.en", lines)
    opts = {"device": "cuda", "batch_size": 24, "buffer_lines": 100, "decode_overrides": {"beam": 2, "nbest": 1}}
    assert translate_file([workspace.ckpt], inp, tmp_path / "ref.de", **opts)["oom_splits"] == 0
    chunk, step, rows = 64 * MiB, Transformer.step, []

    def step_needing_memory(self, prev, enc, state, need_attn=True):
        rows.append(prev.size(0))
        held = torch.empty(3 * chunk, dtype=torch.uint8, device=prev.device)  # what a step of any size holds
        if prev.size(0) > 8:
            more = torch.empty(3 * chunk, dtype=torch.uint8, device=prev.device)  # past the limit
            del more
        out = step(self, prev, enc, state, need_attn)
        del held
        return out

    monkeypatch.setattr(Transformer, "step", step_needing_memory)
    torch.cuda.empty_cache()
    limit = torch.cuda.memory_reserved() + 5 * chunk + 32 * MiB  # one `held` fits, two do not
    torch.cuda.set_per_process_memory_fraction(limit / torch.cuda.get_device_properties(0).total_memory)
    try:
        stats = translate_file([workspace.ckpt], inp, tmp_path / "out.de", **opts)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert stats["oom_splits"] > 0 and max(rows) > 8 and min(rows) <= 8
    out = (tmp_path / "out.de").read_text().splitlines()
    ref = (tmp_path / "ref.de").read_text().splitlines()
    assert len(out) == len(ref) == len(lines)
    assert sum(a == b for a, b in zip(out, ref)) >= 0.9 * len(lines)  # in order (batches differ, so a tie may flip)


def test_the_attention_kernels_torch_picks_match_its_reference_kernel(workspace):
    """mtkit calls scaled_dot_product_attention with padding masks and leaves the kernel to torch;
    the fused kernel it picks on CUDA must give the logits of the plain math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tr = Translator.load(workspace.ckpt, device="cuda")
    model = tr.models[0]
    src, src_len = collate_source(tr.src_spm.encode(workspace.test_lines), tr.src_spm.pad, tr.src_spm.eos, tr.max_src_len)
    tgt_in, _ = collate_target(tr.tgt_spm.encode([s.upper() for s in workspace.test_lines]), tr.tgt_spm.pad,
                               tr.tgt_spm.bos, tr.tgt_spm.eos)
    assert int(src_len.min()) < src.size(1)  # some sources are padded: the masks matter
    src, src_len, tgt_in = src.cuda(), src_len.cuda(), tgt_in.cuda()
    for dtype, tol in ((None, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)):
        amp = torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext()
        with torch.no_grad(), amp:
            picked = model(src, src_len, tgt_in).float()
            with sdpa_kernel(SDPBackend.MATH):
                reference = model(src, src_len, tgt_in).float()
        assert torch.isfinite(picked).all(), dtype
        torch.testing.assert_close(picked, reference, atol=tol, rtol=tol, msg=lambda m, d=dtype: f"{d}: {m}")


# --- data to the device, the command line ---------------------------------------------------------
def test_batches_copied_without_waiting_arrive_intact(workspace, tmp_path):
    """The trainer copies batches with non_blocking=True from temporaries it drops at once; many
    copies queued before any synchronisation must still hold the data."""
    gpu = cuda_trainer(workspace, tmp_path / "gpu")
    cpu = T.Trainer(T.load_data(workspace.data), tiny_cfg(), tmp_path / "cpu", device="cpu")
    batches = [next_batches(gpu)[0] for _ in range(20)]
    copied = [gpu.collate(gpu.data.train, b) for b in batches]  # no synchronisation in between
    torch.cuda.synchronize()
    for b, tensors in zip(batches, copied):
        for g, c in zip(tensors, cpu.collate(cpu.data.train, b)):
            assert g.is_cuda and not c.is_cuda and torch.equal(g.cpu(), c)


def test_train_and_translate_on_cuda_from_the_command_line(workspace, tmp_path):
    save = tmp_path / "ck"
    res = cli(["-q", "train", workspace.data, "-c", "transformer_tiny", "--save-dir", save, "--device", "cuda",
               *sets(TINY + ["train.max_updates=4", "train.amp=bf16"])])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["updates"] == 4
    ck = load_checkpoint(save / T.LAST)
    assert ck["provenance"]["gpus"] and ck["config"]["train"]["amp"] == "bf16"
    inp = write_lines(tmp_path / "in.en", workspace.test_lines)
    res = cli(["-q", "translate", "-m", save / T.LAST, "-i", inp, "-o", tmp_path / "out.de", "--device", "cuda",
               "--dtype", "bfloat16", "--beam", "2"])
    assert res.exit_code == 0, res.stderr
    assert line_count(tmp_path / "out.de") == len(workspace.test_lines)

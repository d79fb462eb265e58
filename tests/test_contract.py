"""The Seq2Seq contract, checked for every family through its shipped tiny preset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtkit.checkpoint import build_from_checkpoint, build_payload, load_checkpoint, save_checkpoint
from mtkit.config import PRESET_DIR, load_config
from mtkit.data.subword import train_sentencepiece
from mtkit.models import MODELS, build_model
from mtkit.models.base import expand_state, reorder_state
from mtkit.models.lstm import decoding_input_gates

TINY = sorted(PRESET_DIR.glob("*_tiny.yaml"))
V, PAD = 40, 0


@pytest.fixture(scope="module")
def spm():
    words = ["the cat", "a dog runs", "two men sit", "ein hund", "die katze", "zwei manner"]
    return train_sentencepiece((words[i % 6] + f" {i % 7}" for i in range(300)), vocab_size=V)


def make_model(preset: Path, seed: int = 0):
    torch.manual_seed(seed)
    cfg = load_config(preset)
    return build_model(cfg.model, V, V, PAD).eval(), cfg


def batch(seed: int = 0):
    """A padded batch with different source lengths and different target lengths."""
    g = torch.Generator().manual_seed(seed)
    src_len = torch.tensor([7, 3, 5])
    src = torch.randint(4, V, (3, 7), generator=g)
    src[torch.arange(7)[None, :] >= src_len[:, None]] = PAD
    src[torch.arange(3), src_len - 1] = 3  # EOS last
    tgt = torch.randint(4, V, (3, 6), generator=g)
    tgt[:, 0] = 2  # BOS
    tgt[1, 4:] = PAD
    return src, src_len, tgt


def incremental(model, src, src_len, tgt):
    enc = model.encode(src, src_len)
    state = model.init_state(enc)
    out = []
    for t in range(tgt.size(1)):
        lp, state, _ = model.step(tgt[:, t], enc, state)
        out.append(lp)
    return torch.stack(out, 1)


def test_presets_found():
    assert any(p.stem == "transformer_tiny" for p in TINY)


@pytest.mark.parametrize("preset", TINY, ids=lambda p: p.stem)
def test_registered(preset):
    cfg = load_config(preset)
    assert cfg.model.arch in MODELS
    assert MODELS[cfg.model.arch].Config is type(cfg.model)


@pytest.mark.parametrize("grad_off", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("preset", TINY, ids=lambda p: p.stem)
def test_step_equals_forward(preset, grad_off):
    """Under ``torch.inference_mode`` (decoding) the recurrent decoders read their bottom layer's
    embedding gates from a table and multiply by prepacked weights: the same log-probs."""
    model, _ = make_model(preset)
    src, src_len, tgt = batch()
    with torch.no_grad():
        full = model(src, src_len, tgt).log_softmax(-1)
    with grad_off():
        inc = incremental(model, src, src_len, tgt).clone()
    if grad_off is torch.inference_mode and hasattr(model.decoder, "bottom_input"):
        with torch.inference_mode():  # the table path applies
            assert decoding_input_gates(tgt[:, 0], model.tgt_embed, *model.decoder.bottom_input()) is not None
    assert inc.shape == full.shape == (3, 6, V)
    keep = tgt != PAD
    assert torch.allclose(inc[keep], full[keep], atol=1e-5), (inc - full)[keep].abs().max()


@pytest.mark.parametrize("preset", TINY, ids=lambda p: p.stem)
@torch.no_grad()
def test_expand_reorder_round_trip(preset):
    model, _ = make_model(preset)
    src, src_len, tgt = batch()
    enc = model.encode(src, src_len)
    state = model.init_state(enc)
    _, state, _ = model.step(tgt[:, 0], enc, state)
    k = 3
    big_enc, big_state = expand_state(enc, k), expand_state(state, k)
    for name, t in big_state.items():
        assert t.size(0) == 3 * k, name
    back = reorder_state(big_state, torch.arange(3) * k + 1)
    for name in state:
        assert torch.equal(back[name], state[name]), name
    # stepping the expanded state gives each sentence's result k times
    lp, _, attn = model.step(tgt[:, 1].repeat_interleave(k), big_enc, big_state)
    ref, _, ref_attn = model.step(tgt[:, 1], enc, state)
    assert torch.allclose(lp, ref.repeat_interleave(k, 0), atol=1e-5)
    if model.beam_shares_enc:  # the k rows of a sentence may also share its enc rows
        shared_lp, _, shared_attn = model.step(tgt[:, 1].repeat_interleave(k), enc, big_state)
        assert torch.allclose(shared_lp, lp, atol=1e-5)
        assert shared_attn is not None and torch.allclose(shared_attn, attn, atol=1e-6)
        assert torch.allclose(shared_attn, ref_attn.repeat_interleave(k, 0), atol=1e-6)
    # a reversed order picks the rows in reverse
    rev = reorder_state(state, torch.tensor([2, 1, 0]))
    for name in state:
        assert torch.equal(rev[name], state[name].flip(0)), name


@pytest.mark.parametrize("preset", TINY, ids=lambda p: p.stem)
@torch.no_grad()
def test_padding_invariance(preset):
    model, _ = make_model(preset)
    src, src_len, tgt = batch()
    full = model(src, src_len, tgt).log_softmax(-1)
    for i in range(3):
        s, t = int(src_len[i]), int((tgt[i] != PAD).sum())
        alone = model(src[i : i + 1, :s], src_len[i : i + 1], tgt[i : i + 1, :t]).log_softmax(-1)
        assert torch.allclose(alone[0], full[i, :t], atol=1e-5), (i, (alone[0] - full[i, :t]).abs().max())


@pytest.mark.parametrize("preset", TINY, ids=lambda p: p.stem)
@torch.no_grad()
def test_checkpoint_round_trip(preset, spm, tmp_path):
    model, cfg = make_model(preset, seed=3)
    payload = build_payload(
        cfg.to_dict(),
        model.state_dict(),
        spm={"src": spm.model_bytes, "tgt": spm.model_bytes},
        vocab={"src_size": V, "tgt_size": V, "pad": PAD, "bos": 2, "eos": 3, "unk": 1, "joint": True},
    )
    save_checkpoint(tmp_path / "c.pt", payload)
    rebuilt, cfg2, src_spm, _ = build_from_checkpoint(load_checkpoint(tmp_path / "c.pt"))
    assert cfg2.to_dict() == cfg.to_dict()
    assert src_spm.model_bytes == spm.model_bytes
    a, b = model.state_dict(), rebuilt.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    src, src_len, tgt = batch(1)
    assert torch.equal(model(src, src_len, tgt), rebuilt(src, src_len, tgt))
    assert not rebuilt.training

"""Transformer specifics: every position variant decodes incrementally as it trains, and a
tiny model learns to copy (>95% exact match) through the shared trainer in a few CPU seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtkit.config import load_config
from mtkit.data.batching import collate_source
from mtkit.data.dataset import ListDataset
from mtkit.data.subword import train_sentencepiece
from mtkit.errors import MtkitError
from mtkit.models import build_model
from mtkit.training import trainer as T

V, PAD, BOS, EOS = 32, 0, 2, 3


def model_for(*overrides: str, vocab: tuple[int, int] = (V, V), seed: int = 0):
    torch.manual_seed(seed)
    cfg = load_config("transformer_tiny", list(overrides))
    return build_model(cfg.model, vocab[0], vocab[1], PAD)


def padded_batch():
    g = torch.Generator().manual_seed(0)
    src_len = torch.tensor([9, 4, 6, 1])
    src = torch.randint(4, V, (4, 9), generator=g)
    src[torch.arange(9)[None, :] >= src_len[:, None]] = PAD
    tgt = torch.randint(4, V, (4, 7), generator=g)
    tgt[:, 0] = BOS
    return src, src_len, tgt


@pytest.mark.parametrize("positions", ["sinusoidal", "learned", "rope", "alibi"])
@pytest.mark.parametrize("pre_norm", [True, False])
@torch.no_grad()
def test_step_equals_forward_every_variant(positions, pre_norm):
    model = model_for(f"model.positions={positions}", f"model.pre_norm={pre_norm}", "model.activation=gelu").eval()
    src, src_len, tgt = padded_batch()
    full = model(src, src_len, tgt).log_softmax(-1)
    enc = model.encode(src, src_len)
    state = model.init_state(enc)
    for t in range(tgt.size(1)):
        lp, state, attn = model.step(tgt[:, t], enc, state)
        assert torch.allclose(lp, full[:, t], atol=1e-5), (t, (lp - full[:, t]).abs().max())
        # attention: a distribution over the real source tokens only
        assert attn.shape == src.shape
        assert torch.allclose(attn.sum(-1), torch.ones(4), atol=1e-5)
        assert float(attn[src == PAD].abs().sum()) == 0.0
        assert state["self_k0"].shape == (4, 4, t + 1, 8)  # (B, H, t, Dh)
        assert torch.equal(state["pos"], torch.full((4,), t + 1))


@torch.no_grad()
def test_step_without_attention_weights_gives_the_same_log_probs():
    model = model_for().eval()
    src, src_len, tgt = padded_batch()
    enc = model.encode(src, src_len)
    with_w, without = model.init_state(enc), model.init_state(enc)
    for t in range(tgt.size(1)):
        lp_w, with_w, attn = model.step(tgt[:, t], enc, with_w)
        lp, without, none = model.step(tgt[:, t], enc, without, need_attn=False)
        assert attn is not None and none is None
        assert torch.allclose(lp, lp_w, atol=1e-6)


def test_tied_and_untied_embeddings():
    tied = model_for()
    assert tied.src_embed.weight is tied.tgt_embed.weight is tied.output.weight
    separate_vocab = model_for(vocab=(40, V))
    assert separate_vocab.src_embed.weight is not separate_vocab.tgt_embed.weight
    assert separate_vocab.output.weight is separate_vocab.tgt_embed.weight
    untied = model_for("model.tie_embeddings=false")
    assert untied.output.weight is not untied.tgt_embed.weight
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(untied) == n(tied) + 2 * V * 32


def test_grad_checkpointing_same_gradients():
    src, src_len, tgt = padded_batch()
    grads = []
    for ckpt in (False, True):
        model = model_for(f"model.grad_checkpointing={ckpt}", "model.dropout=0.0").train()
        model(src, src_len, tgt).logsumexp(-1).sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-5), k


def test_bad_model_config():
    with pytest.raises(MtkitError, match="divisible"):
        model_for("model.heads=5")
    with pytest.raises(MtkitError, match="model.positions"):
        model_for("model.positions=relative")
    src, src_len, tgt = padded_batch()
    with pytest.raises(MtkitError, match="max_positions"):
        model_for("model.max_positions=8")(src, src_len, tgt)


@torch.no_grad()
def greedy(model, src_seqs: list[np.ndarray], max_len: int) -> list[list[int]]:
    """Greedy decoding written against the contract (encode / init_state / step)."""
    model.eval()
    src, src_len = collate_source(src_seqs, PAD, EOS)
    enc = model.encode(src, src_len)
    state = model.init_state(enc)
    prev = torch.full((len(src_seqs),), BOS)
    out = torch.zeros(len(src_seqs), 0, dtype=torch.long)
    for _ in range(max_len):
        lp, state, _ = model.step(prev, enc, state)
        prev = lp.argmax(-1)
        out = torch.cat([out, prev[:, None]], 1)
    hyps = []
    for row in out.tolist():
        hyps.append(row[: row.index(EOS)] if EOS in row else row)
    return hyps


def test_tiny_transformer_learns_to_copy(tmp_path):
    torch.set_num_threads(1)
    spm = train_sentencepiece((w for w in ["a b c d", "e f g h i", "j k l m", "n o p q r"] * 50), vocab_size=V)
    rng = np.random.default_rng(0)

    def pairs(n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        src = [rng.integers(4, V, rng.integers(3, 9)) for _ in range(n)]
        return src, [s.copy() for s in src]

    cfg = load_config("transformer_tiny", [
        "model.d_model=64", "model.ffn_dim=128", "model.dropout=0.0", "train.max_updates=300",
        "train.lr=0.003", "train.warmup_updates=50", "train.max_tokens=1024", "train.label_smoothing=0.0",
        "train.validate_interval_updates=0", "train.save_interval_updates=0", "train.log_interval=50",
    ])
    data = T.TrainData(ListDataset(*pairs(6000)), None, spm, spm)
    summary = T.Trainer(data, cfg, tmp_path, device="cpu").fit()
    assert summary["updates"] == 300
    from mtkit.checkpoint import load_model

    model, _, _, _ = load_model(tmp_path / T.LAST)
    src, ref = pairs(300)
    hyps = greedy(model, src, max_len=12)
    exact = np.mean([h == r.tolist() for h, r in zip(hyps, ref)])
    assert exact > 0.95, exact

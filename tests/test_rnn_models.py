"""The recurrent families (lstm, rnn_attention, gnmt): contract, attention, structure, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtkit.checkpoint import load_checkpoint, save_checkpoint
from mtkit.config import PRESET_DIR, config_from_dict, load_config
from mtkit.errors import MtkitError
from mtkit.models import MODELS, build_model
from mtkit.models.base import expand_state, reorder_state
from mtkit.models.lstm import layers_state, reverse_padded, rnn_step, state_layers

torch.set_num_threads(1)

PAD, UNK, BOS, EOS = 0, 1, 2, 3
V = 17
RNN_ARCHS = ("lstm", "rnn_attention", "gnmt")
TINY = sorted(
    p.stem for p in PRESET_DIR.glob("*_tiny.yaml") if load_config(p.stem).model.arch in RNN_ARCHS
)


def make_model(preset: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = load_config(preset, [f"model.{k}={v}" for k, v in overrides.items()])
    return build_model(cfg.model, V, V, PAD).eval(), cfg


def batch(lengths: list[int], tgt_lengths: list[int], seed: int = 1):
    """Padded random source (ending in EOS) and decoder input (BOS + ids)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths)), PAD)
    tgt = torch.full((len(lengths), max(tgt_lengths) + 1), PAD)
    for i, (n, m) in enumerate(zip(lengths, tgt_lengths)):
        src[i, : n - 1] = torch.randint(4, V, (n - 1,), generator=g)
        src[i, n - 1] = EOS
        tgt[i, 0] = BOS
        tgt[i, 1 : m + 1] = torch.randint(4, V, (m,), generator=g)
    return src, torch.tensor(lengths), tgt


def test_every_family_has_tiny_presets():
    archs = {load_config(p).model.arch for p in TINY}
    assert archs == set(RNN_ARCHS)
    assert {"lstm", "rnn_attention", "gnmt"} <= set(MODELS)


# --- the Seq2Seq contract ---------------------------------------------------------------------
@pytest.mark.parametrize("preset", TINY)
def test_step_equals_forward(preset):
    model, _ = make_model(preset)
    src, src_len, tgt = batch([7, 3, 5], [6, 2, 4])
    with torch.no_grad():
        ref = torch.log_softmax(model(src, src_len, tgt), dim=-1)  # (B, T, V)
        enc = model.encode(src, src_len)
        state = model.init_state(enc)
        for t in range(tgt.size(1)):
            log_probs, state, attn = model.step(tgt[:, t], enc, state)
            assert log_probs.shape == (3, V)
            torch.testing.assert_close(log_probs, ref[:, t], atol=1e-5, rtol=0)
            for name, value in state.items():
                assert value.size(0) == 3, name  # batch-first
            if attn is not None:
                assert attn.shape == src.shape


VARIANTS = [
    ("luong_tiny", {"attention": attention, "window": window, "input_feed": feed, "tie_embeddings": tie,
                    "hidden_dim": 16})
    for attention in ("dot", "general", "concat")
    for window in ("global", "local-m", "local-p")
    for feed, tie in ((False, False), (True, True))
] + [
    ("bahdanau_tiny", {"tie_embeddings": True, "embed_dim": 24, "readout_dim": 24}),
    ("bahdanau_gru_tiny", {"decoder_layers": 2}),
    ("gnmt_tiny", {"tie_embeddings": True, "decoder_layers": 4}),
    ("gnmt_tiny", {"bridge": True, "encoder_layers": 1}),
    ("gnmt_gru_tiny", {"decoder_layers": 4, "bridge": True}),
]


@pytest.mark.parametrize("preset, overrides", VARIANTS, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={x}" for k, x in v.items()))
def test_whole_sequence_teacher_forcing_equals_steps(preset, overrides):
    """Teacher forcing computes what it can over whole sequences; each variant's log-probs and
    gradients equal stepping through the positions one at a time."""
    model, _ = make_model(preset, dropout=0.0, **overrides)
    src, src_len, tgt = batch([7, 3, 5], [6, 2, 4])
    full = torch.log_softmax(model(src, src_len, tgt), dim=-1)
    enc = model.encode(src, src_len)
    state = model.init_state(enc)
    steps = []
    for t in range(tgt.size(1)):
        log_probs, state, _ = model.step(tgt[:, t], enc, state)
        steps.append(log_probs)
    steps = torch.stack(steps, dim=1)
    keep = tgt != PAD
    torch.testing.assert_close(full[keep], steps[keep], atol=1e-5, rtol=0)
    weights = torch.randn_like(full)
    (g_full,) = torch.autograd.grad((full[keep] * weights[keep]).sum(), model.out.weight)
    (g_step,) = torch.autograd.grad((steps[keep] * weights[keep]).sum(), model.out.weight)
    torch.testing.assert_close(g_full, g_step, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset, overrides", [
    ("luong_tiny", {"hidden_dim": 16}),
    ("bahdanau_tiny", {"readout_dim": 16}),
    ("gnmt_tiny", {}),
])
def test_tied_embeddings_share_one_parameter_and_learn_through_both_paths(preset, overrides):
    model, _ = make_model(preset, tie_embeddings=True, **overrides)
    assert model.out.weight is model.tgt_embed.weight is model.encoder.embed.weight  # joint vocabulary
    untied, _ = make_model(preset, tie_embeddings=False, **overrides)
    saved = 2 * V * model.tgt_embed.embedding_dim
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in model.parameters()) == saved
    model.train()
    src, src_len, tgt = batch([5, 4], [4, 3])
    src[0, 0] = 16  # a token seen only by the encoder ...
    tgt[tgt == 16] = 15
    model(src, src_len, tgt)[:, :, :15].logsumexp(-1).sum().backward()  # ... and one only the output sees
    grad = model.out.weight.grad
    assert grad[16].abs().sum() > 0  # through the source embedding alone
    assert grad[:15].abs().sum(-1).gt(0).all()  # every output row the loss reached


def test_tied_embeddings_keep_the_source_apart_with_separate_vocabularies():
    torch.manual_seed(0)
    cfg = load_config("gnmt_tiny", ["model.tie_embeddings=true"])
    model = build_model(cfg.model, V + 5, V, PAD)
    assert model.out.weight is model.tgt_embed.weight
    assert model.encoder.embed.weight is not model.tgt_embed.weight


def test_tying_needs_matching_sizes():
    with pytest.raises(MtkitError, match="model.hidden_dim"):  # refused on load: hidden 24, embed 16
        load_config("luong_tiny", ["model.tie_embeddings=true"])


def test_lstm_forget_gates_start_open():
    model, _ = make_model("gnmt_tiny", forget_bias=1.0)
    h = model.cfg.hidden_dim
    cell = model.decoder.cells[1]
    assert (cell.bias_ih[h : 2 * h] == 1).all() and (cell.bias_hh[h : 2 * h] == 0).all()
    assert (model.encoder.layers[0].bias_ih_l0_reverse[h : 2 * h] == 1).all()


def test_gnmt_residual_path_is_never_dropped():
    """x + f(dropout(x)): with dropout 1.0 every layer's input is zero, yet a residual layer whose
    branch outputs zero still passes its input on (dropout(f(x) + x) would zero it)."""
    deep, _ = make_model("gnmt_tiny", encoder_layers=3, dropout=1.0)
    shallow, _ = make_model("gnmt_tiny", encoder_layers=2, dropout=1.0)
    shallow.encoder.load_state_dict(
        {k: v for k, v in deep.encoder.state_dict().items() if not k.startswith("layers.2.")}
    )
    with torch.no_grad():
        H = deep.encoder.layers[2].hidden_size
        deep.encoder.layers[2].bias_ih_l0[3 * H :] = -1e4  # output gate closed: the branch gives 0
    deep.train()
    shallow.train()
    src, src_len, _ = batch([6, 3], [1, 1])
    with torch.no_grad():
        memory, _ = deep.encoder(src, src_len)
        torch.testing.assert_close(memory, shallow.encoder(src, src_len)[0])
    assert memory[0, :6].abs().min() > 0  # the second layer's output, carried by the residual


@pytest.mark.parametrize("preset", TINY)
def test_state_layout_is_batch_first(preset):
    model, cfg = make_model(preset)
    src, src_len, _ = batch([4, 6], [1, 1])
    state = model.init_state(model.encode(src, src_len))
    layers = getattr(cfg.model, "decoder_layers", getattr(cfg.model, "layers", None))
    assert state["h"].shape == (2, layers, cfg.model.hidden_dim)
    assert ("c" in state) == (cfg.model.cell == "lstm")
    if "c" in state:
        assert state["c"].shape == state["h"].shape


@pytest.mark.parametrize("preset", TINY)
def test_expand_reorder_round_trip(preset):
    model, _ = make_model(preset)
    k = 3
    src, src_len, _ = batch([6, 4], [1, 1])
    g = torch.Generator().manual_seed(5)
    tok1 = torch.randint(4, V, (2 * k,), generator=g)
    tok2 = torch.randint(4, V, (2 * k,), generator=g)
    # beam backpointers: each row picks a row of its own sentence
    order = torch.tensor([2, 0, 0, 4, 5, 3])
    with torch.no_grad():
        enc = expand_state(model.encode(src, src_len), k)
        state = model.init_state(enc)
        lp0, state, _ = model.step(torch.full((2 * k,), BOS), enc, state)
        lp1, state, _ = model.step(tok1, enc, state)
        state = reorder_state(state, order)
        lp2, _, _ = model.step(tok2, enc, state)
        for r in range(2 * k):
            i = r // k
            prefix = torch.tensor([[BOS, int(tok1[order[r]]), int(tok2[r])]])
            ref = torch.log_softmax(model(src[i : i + 1], src_len[i : i + 1], prefix), dim=-1)[0]
            torch.testing.assert_close(lp0[r], ref[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(lp1[order[r]], ref[1], atol=1e-5, rtol=0)
            torch.testing.assert_close(lp2[r], ref[2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", TINY)
def test_padding_invariance(preset):
    model, _ = make_model(preset)
    src, src_len, tgt = batch([8, 3, 5], [7, 2, 4], seed=3)
    with torch.no_grad():
        together = torch.log_softmax(model(src, src_len, tgt), dim=-1)
        enc = model.encode(src, src_len)
        _, _, attn_batch = model.step(tgt[:, 0], enc, model.init_state(enc))
        for i, (n, m) in enumerate(zip([8, 3, 5], [7, 2, 4])):
            s, t = src[i : i + 1, :n], tgt[i : i + 1, : m + 1]
            alone = torch.log_softmax(model(s, src_len[i : i + 1], t), dim=-1)
            torch.testing.assert_close(alone[0], together[i, : m + 1], atol=1e-5, rtol=0)
            enc1 = model.encode(s, src_len[i : i + 1])
            _, _, attn_alone = model.step(t[:, 0], enc1, model.init_state(enc1))
            if attn_batch is not None:
                torch.testing.assert_close(attn_alone[0], attn_batch[i, :n], atol=1e-6, rtol=0)
                if n < src.size(1):
                    assert (attn_batch[i, n:] == 0).all()


@pytest.mark.parametrize("preset", TINY)
def test_checkpoint_round_trip(preset, tmp_path):
    model, cfg = make_model(preset)
    path = tmp_path / "model.pt"
    save_checkpoint(path, {"config": cfg.to_dict(), "model": model.state_dict()})
    payload = load_checkpoint(path)
    cfg2 = config_from_dict(payload["config"])
    assert cfg2.model == cfg.model
    torch.manual_seed(123)  # different init: the weights must come from the file
    model2 = build_model(cfg2.model, V, V, PAD).eval()
    model2.load_state_dict(payload["model"], strict=True)
    src, src_len, tgt = batch([5, 4], [3, 3])
    with torch.no_grad():
        torch.testing.assert_close(model2(src, src_len, tgt), model(src, src_len, tgt), atol=0, rtol=0)


# --- family-specific structure -------------------------------------------------------------------
def test_reverse_padded_keeps_padding_in_place():
    src = torch.tensor([[5, 6, 7, 3], [8, 3, 0, 0]])
    out = reverse_padded(src, torch.tensor([4, 2]))
    assert out.tolist() == [[3, 7, 6, 5], [3, 8, 0, 0]]


def test_lstm_source_reversal_changes_the_encoding_only():
    fwd, _ = make_model("lstm_tiny", reverse_source=False)
    rev, _ = make_model("lstm_tiny", reverse_source=True)
    src, src_len, tgt = batch([6, 4], [3, 3])
    with torch.no_grad():
        flipped = reverse_padded(src, src_len)
        torch.testing.assert_close(rev(src, src_len, tgt), fwd(flipped, src_len, tgt))
        assert not torch.allclose(rev(src, src_len, tgt), fwd(src, src_len, tgt))


def test_lstm_encoder_final_states_seed_the_decoder():
    model, _ = make_model("lstm_tiny")
    src, src_len, _ = batch([6, 4], [1, 1])
    with torch.no_grad():
        state = model.init_state(model.encode(src, src_len))
        emb = model.encoder.embed(reverse_padded(src, src_len))
        out, (h, c) = model.encoder.rnn(emb[1:2, :4])  # the short row alone, no padding
    torch.testing.assert_close(state["h"][1], h[:, 0])
    torch.testing.assert_close(state["c"][1], c[:, 0])


@pytest.mark.parametrize("rnn_class", [torch.nn.LSTM, torch.nn.GRU])
def test_rnn_step_equals_the_stacked_module(rnn_class):
    torch.manual_seed(0)
    rnn = rnn_class(5, 7, num_layers=3, batch_first=True, dropout=0.5).eval()
    x = torch.randn(4, 6, 5)
    h0 = torch.randn(3, 4, 7)
    hidden = (h0, torch.randn(3, 4, 7)) if rnn_class is torch.nn.LSTM else h0
    expected, expected_hidden = rnn(x, hidden)
    state = {"h": hidden[0].transpose(0, 1), "c": hidden[1].transpose(0, 1)} if isinstance(hidden, tuple) else {
        "h": hidden.transpose(0, 1)}
    layers = state_layers(state)
    for t in range(x.size(1)):
        out, layers = rnn_step(rnn, x[:, t], layers)
        torch.testing.assert_close(out, expected[:, t])
    final = layers_state(layers)
    torch.testing.assert_close(final["h"], (expected_hidden[0] if isinstance(hidden, tuple) else expected_hidden
                                            ).transpose(0, 1))
    if isinstance(hidden, tuple):
        torch.testing.assert_close(final["c"], expected_hidden[1].transpose(0, 1))
    rnn.train()  # dropout between layers, drawn afresh at every call
    outs = [rnn_step(rnn, x[:, 0], state_layers(state))[0] for _ in range(3)]
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 3  # three different masks
    rnn.dropout = 0.0
    torch.testing.assert_close(rnn_step(rnn, x[:, 0], state_layers(state))[0], expected[:, 0])


def test_encoder_hidden_dim_sizes_the_encoder_alone():
    model, cfg = make_model("luong_tiny", bidirectional="true", encoder_hidden_dim=5)
    assert model.encoder.rnn.hidden_size == 5 and model.encoder.out_dim == 10
    assert model.decoder.rnn.hidden_size == cfg.model.hidden_dim != 5
    src, src_len, tgt = batch([6, 4], [3, 2])
    with torch.no_grad():
        assert model.encode(src, src_len)["memory"].shape == (2, 6, 10)
        assert model(src, src_len, tgt).shape == (2, tgt.size(1), V)


@pytest.mark.parametrize("preset", ["gnmt_tiny", "gnmt_gru_tiny"])
def test_gnmt_bridge_seeds_every_decoder_layer_from_the_top_encoder_layer(preset):
    model, _ = make_model(preset, bridge=True)
    src, src_len, _ = batch([7, 3, 5], [6, 2, 4])
    enc = model.encode(src, src_len)
    state = model.init_state(enc)
    top = model.encoder.layers[-1]
    x = model.encoder.embed(src)
    for layer, residual in zip(model.encoder.layers, model.encoder.residual):  # eval: no dropout
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, src_len, batch_first=True, enforce_sorted=False)
        out, final = layer(packed)
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=src.size(1))
        x = out + x if residual else out
    assert layer is top
    h_last = (final[0] if isinstance(final, tuple) else final)[-1]  # (B, H), each row's own last position
    expected = torch.tanh(model.bridge.h(h_last))
    for i in range(len(model.decoder.cells)):
        torch.testing.assert_close(state["h"][:, i], expected)
    assert state["h"].abs().sum() > 0
    zero, _ = make_model(preset, bridge=False)
    assert zero.init_state(zero.encode(src, src_len))["h"].abs().sum() == 0
    assert not hasattr(zero, "bridge")


def test_gnmt_structure():
    model, cfg = make_model("gnmt_tiny", encoder_layers=4, decoder_layers=4)
    enc, dec = model.encoder, model.decoder
    assert [layer.bidirectional for layer in enc.layers] == [True, False, False, False]
    assert enc.layers[1].input_size == 2 * cfg.model.hidden_dim
    assert enc.residual == [False, False, True, True] == dec.residual
    memory_dim = enc.out_dim
    assert [c.input_size for c in dec.cells] == [cfg.model.embed_dim + memory_dim] + [
        cfg.model.hidden_dim + memory_dim
    ] * 3  # the context goes into every decoder layer


def test_gnmt_residual_layer_adds_its_input():
    """A residual layer whose LSTM outputs zero is the identity: 3 layers == the first 2."""
    deep, _ = make_model("gnmt_tiny", encoder_layers=3, dropout=0.0)
    shallow, _ = make_model("gnmt_tiny", encoder_layers=2, dropout=0.0)
    shallow.encoder.load_state_dict(
        {k: v for k, v in deep.encoder.state_dict().items() if not k.startswith("layers.2.")}
    )
    third = deep.encoder.layers[2]
    with torch.no_grad():
        H = third.hidden_size
        third.bias_ih_l0[3 * H :] = -1e4  # output gate closed: h = 0
    src, src_len, _ = batch([6, 3], [1, 1])
    with torch.no_grad():
        torch.testing.assert_close(deep.encoder(src, src_len)[0], shallow.encoder(src, src_len)[0])


def test_bidirectional_encoders_see_the_whole_source():
    src, src_len, _ = batch([6], [1])
    changed = src.clone()
    changed[0, 4] = (src[0, 4] - 4 + 1) % (V - 4) + 4  # another token at the last word
    for preset, sees_right in [("gnmt_tiny", True), ("bahdanau_tiny", True), ("luong_tiny", False)]:
        model, _ = make_model(preset)
        with torch.no_grad():
            a = model.encode(src, src_len)["memory"][0, 0]
            b = model.encode(changed, src_len)["memory"][0, 0]
        assert (not torch.allclose(a, b)) == sees_right, preset


@pytest.mark.parametrize(
    "preset, override, message",
    [
        ("lstm_tiny", "model.cell=rnn", "model.cell"),
        ("luong_tiny", "model.attention=mlp", "model.attention"),
        ("luong_tiny", "model.window=local", "model.window"),
        ("luong_dot_tiny", "model.bidirectional=true", "dot attention"),
        ("bahdanau_tiny", "model.window=local-p", "model.window"),
        ("gnmt_tiny", "model.residual_start=2", "model.residual_start"),
        ("gnmt_tiny", "model.hidden_dim=0", "model.hidden_dim"),
        ("luong_tiny", "model.encoder_hidden_dim=-1", "model.encoder_hidden_dim"),
    ],
)
def test_bad_config_values_are_one_line_errors(preset, override, message):
    with pytest.raises(MtkitError, match=message):  # on load, or (dot sizes) when the model is built
        build_model(load_config(preset, [override]).model, V, V, PAD)


# --- learning a copy task ----------------------------------------------------------------------
def copy_data(n: int, seed: int, min_len: int = 2, max_len: int = 6, symbols: int = 8):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(4, 4 + symbols, (int(torch.randint(min_len, max_len + 1, (1,), generator=g)),), generator=g)
            for _ in range(n)]
    return seqs


def collate(seqs):
    src = torch.full((len(seqs), max(len(s) for s in seqs) + 1), PAD)
    tgt_in = torch.full_like(src, PAD)
    tgt_out = torch.full_like(src, PAD)
    for i, s in enumerate(seqs):
        n = len(s)
        src[i, :n], src[i, n] = s, EOS
        tgt_in[i, 0], tgt_in[i, 1 : n + 1] = BOS, s
        tgt_out[i, :n], tgt_out[i, n] = s, EOS
    return src, torch.tensor([len(s) + 1 for s in seqs]), tgt_in, tgt_out


def greedy(model, src, src_len, max_len: int):
    enc = model.encode(src, src_len)
    state = model.init_state(enc)
    prev = torch.full((src.size(0),), BOS)
    out = []
    for _ in range(max_len):
        log_probs, state, _ = model.step(prev, enc, state)
        prev = log_probs.argmax(-1)
        out.append(prev)
    return torch.stack(out, 1)


@pytest.mark.parametrize(
    "preset, overrides, steps",
    [
        ("lstm_tiny", {"hidden_dim": 64, "embed_dim": 32}, 200),
        ("bahdanau_tiny", {"hidden_dim": 32}, 200),
        ("luong_local_p_tiny", {"hidden_dim": 32, "encoder_layers": 1, "decoder_layers": 1}, 200),
        ("gnmt_tiny", {"hidden_dim": 32}, 400),
    ],
)
def test_learns_to_copy(preset, overrides, steps):
    model, _ = make_model(preset, seed=0, dropout=0.0, **overrides)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train = copy_data(64 * steps, seed=1)
    for i in range(steps):
        src, src_len, tgt_in, tgt_out = collate(train[i * 64 : (i + 1) * 64])
        logits = model(src, src_len, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, V), tgt_out.reshape(-1), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    test = copy_data(200, seed=99)
    src, src_len, _, tgt_out = collate(test)
    with torch.no_grad():
        hyp = greedy(model, src, src_len, tgt_out.size(1))
    exact = sum(bool((hyp[i, : len(s) + 1] == tgt_out[i, : len(s) + 1]).all()) for i, s in enumerate(test))
    assert exact / len(test) >= 0.9, f"{preset}: {exact}/{len(test)} copied exactly (loss {loss.item():.3f})"

"""Attention scores, windows and the masked softmax against hand-written formulas on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from mtkit.errors import MtkitError
from mtkit.models.attention import (
    SCORES,
    WINDOWS,
    AdditiveScore,
    AttentionLoop,
    ConcatScore,
    DotScore,
    GeneralScore,
    build_attention,
    masked_softmax,
)
from mtkit.models.lstm import padding_mask


def set_weight(layer: torch.nn.Module, rows: list[list[float]], bias: list[float] | None = None) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(rows))
        if bias is not None:
            layer.bias.copy_(torch.tensor(bias))


# Memory (B=1, S=3, H=2) and one query (B=1, T=1, H=2) used by the hand-computed scores.
MEMORY = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
QUERY = torch.tensor([[[1.0, 2.0]]])


# --- scores ------------------------------------------------------------------------------------
def test_dot_score_is_the_inner_product():
    score = DotScore(2, 2, 2)
    scores = score(QUERY, score.precompute(MEMORY))
    assert scores.shape == (1, 1, 3)
    assert scores.flatten().tolist() == [1.0, 2.0, 3.0]  # q . h_s for h_s = (1,0), (0,1), (1,1)


def test_general_score_multiplies_the_memory_by_w_first():
    score = GeneralScore(2, 2, 2)
    set_weight(score.key_proj, [[2.0, 0.0], [0.0, 3.0]])  # W_a h_s = (2,0), (0,3), (2,3)
    scores = score(QUERY, score.precompute(MEMORY))
    assert scores.flatten().tolist() == [2.0, 6.0, 8.0]


def test_general_score_maps_the_memory_size_to_the_query_size():
    score = GeneralScore(2, 3, 2)  # encoder outputs of 3, decoder states of 2
    set_weight(score.key_proj, [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    memory = torch.tensor([[[1.0, 2.0, 3.0]]])  # W_a h = (4, 2)
    assert score(QUERY, score.precompute(memory)).item() == 1.0 * 4 + 2.0 * 2


def test_additive_score_is_v_tanh_of_wq_plus_uh():
    score = AdditiveScore(2, 2, 1)  # one hidden unit: v * tanh(w . q + b + u . h_s)
    set_weight(score.query_proj, [[0.0, 1.0]], bias=[0.5])
    set_weight(score.key_proj, [[1.0, -1.0]])
    set_weight(score.v, [[2.0]])
    scores = score(QUERY, score.precompute(MEMORY)).flatten().tolist()
    expected = [2 * math.tanh(2.0 + 0.5 + h1 - h2) for h1, h2 in ((1, 0), (0, 1), (1, 1))]
    assert scores == pytest.approx(expected, rel=1e-6)


def test_concat_score_is_v_tanh_of_w_times_the_concatenation():
    torch.manual_seed(0)
    B, T, S, Hq, Hm, A = 2, 3, 4, 5, 6, 7
    score = ConcatScore(Hq, Hm, A)
    query, memory = torch.randn(B, T, Hq), torch.randn(B, S, Hm)
    w_a = torch.cat([score.query_proj.weight, score.key_proj.weight], dim=1)  # (A, Hq + Hm)
    v = score.v.weight.flatten()
    expected = torch.empty(B, T, S)
    for b in range(B):
        for t in range(T):
            for s in range(S):
                pair = torch.cat([query[b, t], memory[b, s]])
                expected[b, t, s] = v @ torch.tanh(w_a @ pair + score.query_proj.bias)
    with torch.no_grad():
        torch.testing.assert_close(score(query, score.precompute(memory)), expected)


def test_dot_needs_equal_query_and_memory_sizes():
    with pytest.raises(MtkitError, match=r"dot attention needs .*\(4\).*\(6\)"):
        DotScore(4, 6, 4)
    with pytest.raises(MtkitError, match="model.attention=general"):
        build_attention("dot", 4, 8, 4)
    build_attention("general", 4, 8, 4)  # general maps the sizes


def test_unknown_names_and_bad_window_sizes_are_config_errors():
    with pytest.raises(MtkitError, match="'model.attention': unknown value 'mlp'"):
        build_attention("mlp", 4, 4, 4)
    with pytest.raises(MtkitError, match="'model.window': unknown value 'local'"):
        build_attention("dot", 4, 4, 4, "local")
    for window in ("local-m", "local-p"):
        with pytest.raises(MtkitError, match="model.window_size"):
            build_attention("dot", 4, 4, 4, window, window_size=0)


# --- masked softmax ----------------------------------------------------------------------------
def test_masked_softmax_values_by_hand():
    scores = torch.tensor([[0.0, math.log(3.0), 100.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    w = masked_softmax(scores, mask)
    torch.testing.assert_close(w, torch.tensor([[0.25, 0.75, 0.0], [1 / 3, 1 / 3, 1 / 3]]))
    assert w[0, 2].item() == 0.0  # exactly zero on padding, whatever its score


def test_masked_softmax_broadcasts_the_mask_and_returns_float32():
    scores = torch.randn(2, 4, 5).to(torch.bfloat16)  # (B, T, S)
    mask = padding_mask(torch.tensor([5, 2]), 5).unsqueeze(1)  # (B, 1, S)
    w = masked_softmax(scores, mask)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4))
    assert (w[1, :, 2:] == 0).all()


# --- windows -----------------------------------------------------------------------------------
def ramp_memory(S: int) -> torch.Tensor:
    """(1, S, 1) memory h_s = s: with a dot score and query 1, the score at s is s."""
    return torch.arange(S, dtype=torch.float).view(1, S, 1)


def test_local_m_weights_are_the_softmax_inside_the_window_only():
    S, D = 8, 1
    attn = build_attention("dot", 1, 1, 1, "local-m", window_size=D)
    memory = ramp_memory(S)
    src_len = torch.tensor([S])
    _, w = attn(torch.ones(1, 1), memory, memory, padding_mask(src_len, S), src_len, torch.tensor([3]))
    inside = [2.0, 3.0, 4.0]  # [p - D, p + D] with p = t = 3; scores = positions
    total = sum(math.exp(s) for s in inside)
    expected = [math.exp(s) / total if s in inside else 0.0 for s in range(S)]
    assert w.flatten().tolist() == pytest.approx(expected, rel=1e-6)
    assert all(w[0, s].item() == 0.0 for s in range(S) if s not in inside)


def test_local_m_window_clamps_at_the_sentence_end():
    S, D = 8, 2
    attn = build_attention("dot", 1, 1, 1, "local-m", window_size=D)
    memory = ramp_memory(S).expand(2, S, 1)
    src_len = torch.tensor([8, 5])
    mask = padding_mask(src_len, S)
    _, w = attn(torch.ones(2, 1), memory, memory, mask, src_len, torch.tensor([20, 20]))
    # row 0: p = min(20, 7) = 7 -> positions 5..7; row 1: p = min(20, 4) = 4 -> 2..4 (5+ is padding)
    assert w[0].nonzero().flatten().tolist() == [5, 6, 7]
    assert w[1].nonzero().flatten().tolist() == [2, 3, 4]
    torch.testing.assert_close(w.sum(-1), torch.ones(2))


def test_local_p_weights_sum_to_one_inside_a_window_around_the_predicted_position():
    torch.manual_seed(1)
    B, S, H, D = 3, 10, 4, 2
    attn = build_attention("general", H, H, H, "local-p", window_size=D)
    memory = torch.randn(B, S, H)
    src_len = torch.tensor([10, 6, 3])
    mask = padding_mask(src_len, S)
    query = torch.randn(B, H)
    with torch.no_grad():
        _, w = attn(query, memory, attn.precompute(memory), mask, src_len)
        p = attn.window.center(query, src_len, torch.zeros(B))
    torch.testing.assert_close(w.sum(-1), torch.ones(B))
    assert ((p >= 0) & (p <= src_len)).all()  # S * sigmoid(...) stays within the sentence
    pos = torch.arange(S, dtype=torch.float)
    outside = (pos.unsqueeze(0) - p.unsqueeze(1)).abs() > D
    assert (w[outside | ~mask] == 0).all()


@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize("score", list(SCORES))
def test_one_step_and_all_positions_queries_agree(score, window):
    torch.manual_seed(2)
    B, T, S, H = 2, 4, 7, 6
    attn = build_attention(score, H, H, 5, window, window_size=2)
    memory = torch.randn(B, S, H)
    src_len = torch.tensor([7, 4])
    mask = padding_mask(src_len, S)
    queries = torch.randn(B, T, H)
    t = torch.arange(T).expand(B, T)
    with torch.no_grad():
        keys = attn.precompute(memory)
        ctx_all, w_all = attn(queries, memory, keys, mask, src_len, t)
        assert ctx_all.shape == (B, T, H) and w_all.shape == (B, T, S)
        for i in range(T):
            ctx, w = attn(queries[:, i], memory, keys, mask, src_len, t[:, i])
            assert ctx.shape == (B, H) and w.shape == (B, S)
            torch.testing.assert_close(w, w_all[:, i])
            torch.testing.assert_close(ctx, ctx_all[:, i])


@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize("score", list(SCORES))
def test_a_loop_of_steps_gets_the_same_values_and_gradients_with_its_memory_gradients_deferred(score, window):
    torch.manual_seed(3)
    B, T, S, H = 3, 5, 6, 4
    attn = build_attention(score, H, H, 5, window, window_size=2)
    src_len = torch.tensor([6, 3, 1])
    mask = padding_mask(src_len, S)
    memory0, queries0 = torch.randn(B, S, H), torch.randn(B, T, H)

    def run(loop: AttentionLoop | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        attn.zero_grad()
        memory, queries = memory0.clone().requires_grad_(), queries0.clone().requires_grad_()
        enc = {"memory": memory, "keys": attn.precompute(memory)}
        if loop is not None:
            enc = loop.wrap(enc)
        feed, outs = torch.zeros(B, H), []
        for i in range(T):  # each query depends on the previous context, as with input feeding
            ctx, _ = attn(queries[:, i] + feed, enc["memory"], enc["keys"], mask, src_len, torch.full((B,), i), loop)
            feed = torch.tanh(ctx)
            outs.append(feed)
        out = torch.stack(outs, 1)
        (out * torch.linspace(-1, 2, out.numel()).view_as(out)).sum().backward()
        return out.detach(), [memory.grad, queries.grad] + [p.grad for p in attn.parameters()]

    out_plain, grads_plain = run(None)
    loop = AttentionLoop()
    out_loop, grads_loop = run(loop)
    assert loop.wrapped and len(loop.steps["memory"]) == T  # the deferred path was taken
    assert len(loop.steps["keys"]) == (T if score in ("dot", "general") else 0)
    torch.testing.assert_close(out_loop, out_plain)
    assert len(grads_loop) == len(grads_plain)
    for got, want in zip(grads_loop, grads_plain):
        torch.testing.assert_close(got, want)
    with torch.no_grad():  # no gradients: nothing to defer, the plain path runs
        assert AttentionLoop().wrap({"memory": memory0, "keys": memory0})["memory"] is memory0


# --- every score and window: weights, padding, gradients -------------------------------------
@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize("score", list(SCORES))
def test_attention_weights_sum_to_one_and_skip_padding(score, window):
    torch.manual_seed(0)
    B, S, H = 4, 9, 12
    attn = build_attention(score, H, H, 10, window, window_size=2)
    memory = torch.randn(B, S, H)
    src_len = torch.tensor([9, 5, 1, 3])
    mask = padding_mask(src_len, S)
    memory = memory * mask.unsqueeze(-1)
    query = torch.randn(B, H, requires_grad=True)
    for t in (0, 2, 7, 20):
        ctx, w = attn(query, memory, attn.precompute(memory), mask, src_len, torch.full((B,), t))
        assert w.shape == (B, S) and ctx.shape == (B, H)
        torch.testing.assert_close(w.sum(-1), torch.ones(B))
        assert (w[~mask] == 0).all()
        assert (w >= 0).all()
        torch.testing.assert_close(ctx, torch.einsum("bs,bsh->bh", w, memory))
        ctx.sum().backward()
        assert torch.isfinite(query.grad).all()


def test_local_m_window_is_centered_on_the_target_position():
    B, S, H = 2, 12, 8
    attn = build_attention("dot", H, H, H, "local-m", window_size=2)
    memory = torch.randn(B, S, H)
    src_len = torch.tensor([12, 6])
    mask = padding_mask(src_len, S)
    _, w = attn(torch.randn(B, H), memory, memory, mask, src_len, torch.tensor([5, 9]))
    # row 0: p = 5 -> positions 3..7; row 1: p = min(9, 5) = 5 -> positions 3..5 (6+ is padding)
    assert w[0].nonzero().flatten().tolist() == [3, 4, 5, 6, 7]
    assert w[1].nonzero().flatten().tolist() == [3, 4, 5]


def test_local_p_follows_the_predicted_position_and_gaussian():
    torch.manual_seed(0)
    B, S, H, D = 1, 30, 8, 4
    attn = build_attention("dot", H, H, H, "local-p", window_size=D)
    window = attn.window
    query = torch.randn(B, H)
    src_len = torch.tensor([S])
    p = float(window.center(query, src_len, torch.zeros(1)).detach())
    assert p == pytest.approx(S * torch.sigmoid(window.v(torch.tanh(window.proj(query)))).item(), rel=1e-6)
    memory = torch.zeros(B, S, H)  # equal scores: the weights are the Gaussian alone
    _, w = attn(query, memory, memory, torch.ones(B, S, dtype=torch.bool), src_len)
    pos = torch.arange(S, dtype=torch.float)
    inside = (pos - p).abs() <= D
    gauss = torch.exp(-((pos - p) ** 2) / (2 * (D / 2) ** 2)) * inside
    torch.testing.assert_close(w[0], gauss / gauss.sum())


def test_masked_softmax_zero_on_padding():
    scores = torch.tensor([[1.0, 2.0, 50.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    w = masked_softmax(scores, mask)
    assert w[0, 2] == 0
    torch.testing.assert_close(w[1], torch.full((3,), 1 / 3))

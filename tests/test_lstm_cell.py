"""The CPU LSTM cell's hand-written forward and backward against the plain formulas."""

from __future__ import annotations

import torch

from mtkit.kernels.lstm_cell import lstm_pointwise


def plain(gx: torch.Tensor, gh: torch.Tensor, c_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    i, f, g, o = (gx + gh).chunk(4, 1)
    c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def test_values_and_gradients_equal_the_plain_lstm_formulas():
    torch.manual_seed(0)
    B, H = 5, 3
    inputs = [torch.randn(B, 4 * H, dtype=torch.float64) * 3, torch.randn(B, 4 * H, dtype=torch.float64),
              torch.randn(B, H, dtype=torch.float64) * 2]
    weights = torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    results = []
    for fn in (plain, lstm_pointwise):
        leaves = [x.clone().requires_grad_() for x in inputs]
        h, c = fn(*leaves)
        ((h * weights[0]).sum() + (c * weights[1]).sum()).backward()
        results.append([h, c] + [x.grad for x in leaves])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lstm_pointwise, [x.clone().requires_grad_() for x in inputs])
    with torch.no_grad():  # decoding takes the same formulas without the autograd node
        for got, want in zip(lstm_pointwise(*inputs), results[0][:2]):
            torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)


def test_only_h_or_only_c_used_downstream():
    torch.manual_seed(1)
    gx, gh, c_prev = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 2)
    for pick in (0, 1):
        grads = []
        for fn in (plain, lstm_pointwise):
            leaves = [x.clone().requires_grad_() for x in (gx, gh, c_prev)]
            fn(*leaves)[pick].sum().backward()
            grads.append([x.grad for x in leaves])
        for got, want in zip(grads[1], grads[0]):
            torch.testing.assert_close(got, want)

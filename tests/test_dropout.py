"""`mtkit.kernels.dropout`: the cheaper CPU mask drops with probability p and keeps the expectation."""

from __future__ import annotations

import pytest
import torch

from mtkit.kernels.dropout import Dropout, add_dropout, dropout


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_drops_about_p_and_keeps_the_mean(p):
    torch.manual_seed(0)
    x = torch.ones(200_001)  # odd size: the last draw is split too
    y = dropout(x, p)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.005
    assert torch.allclose(y[kept], torch.full_like(y[kept], y[kept][0].item()))
    assert abs(y[kept][0].item() - 1 / (1 - p)) < 1e-3
    assert abs(y.mean().item() - 1.0) < 0.01


def test_neighbouring_elements_are_independent():
    torch.manual_seed(0)
    keep = dropout(torch.ones(400_000), 0.5) != 0
    pairs = keep.view(-1, 2)
    both = (pairs[:, 0] & pairs[:, 1]).float().mean().item()
    assert abs(both - 0.25) < 0.005  # the two halves of one draw
    assert abs((keep[1:] & keep[:-1]).float().mean().item() - 0.25) < 0.005


def test_seeded_and_reproducible():
    x = torch.randn(3, 5, 7)
    torch.manual_seed(3)
    a = dropout(x, 0.2)
    torch.manual_seed(3)
    b = dropout(x, 0.2)
    assert torch.equal(a, b)
    assert not torch.equal(a, dropout(x, 0.2))


def test_identity_when_off_and_zero_at_one():
    x = torch.randn(4, 6)
    assert dropout(x, 0.3, training=False) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    with pytest.raises(ValueError):
        dropout(x, 1.5)


def test_gradient_is_the_mask():
    torch.manual_seed(1)
    x = torch.randn(50, 40, requires_grad=True)
    y = dropout(x, 0.25)
    y.sum().backward()
    mask = y.detach() / torch.where(x.detach() == 0, torch.ones_like(x), x.detach())
    torch.testing.assert_close(x.grad, mask)
    assert (x.grad == 0).any()


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16)])
def test_add_dropout_is_residual_plus_dropout(dtypes):
    x = torch.randn(6, 9, 16, dtype=dtypes[0])
    y = torch.randn(6, 9, 16, dtype=dtypes[1])
    torch.manual_seed(5)
    got = add_dropout(x, y, 0.3)
    torch.manual_seed(5)
    want = x + dropout(y.to(got.dtype), 0.3)
    assert got.dtype == torch.promote_types(*dtypes)
    torch.testing.assert_close(got, want)
    assert torch.equal(add_dropout(x, y, 0.3, training=False), x + y)


def test_module_follows_train_and_eval():
    layer = Dropout(0.5)
    x = torch.ones(1000)
    assert (layer(x) == 0).any()
    assert torch.equal(layer.eval()(x), x)

"""`mtkit.models.linear`: the oneDNN float32 path computes what `F.linear` does, gradients too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtkit.models import linear as L


@pytest.mark.parametrize("shape", [(37, 64), (3, 11, 64), (0, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_torch_forward_and_backward(shape, bias):
    torch.manual_seed(0)
    layer = L.Linear(64, 96, bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    weights = torch.randn(*shape[:-1], 96)
    params = [x, *layer.parameters()]

    def grads(forward):
        for p in params:
            p.grad = None
        y = forward()
        (y * weights).sum().backward()
        return y.detach(), [p.grad.clone() for p in params]

    y, g = grads(lambda: layer(x))
    ref_y, ref_g = grads(lambda: F.linear(x, layer.weight, layer.bias))
    assert y.shape == ref_y.shape
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fast_path_only_for_float32_cpu_outside_autocast():
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    assert L.fast_path(x, w) == L.ONEDNN
    assert not L.fast_path(x.bfloat16(), w.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not L.fast_path(x, w)
        assert L.linear(x, w).dtype == torch.bfloat16  # autocast still applies
    torch.testing.assert_close(L.matmul_nt(x, w), x @ w.T)
    torch.testing.assert_close(L.matmul_nt(x.t().contiguous().t(), w), x @ w.T)  # strided input


def test_state_dict_is_nn_linear():
    a, b = L.Linear(3, 4), torch.nn.Linear(3, 4)
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3)
    torch.testing.assert_close(a(x), b(x))

"""`mtkit.kernels.linear`: the oneDNN float32 path computes what `F.linear` does, gradients too."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from mtkit.kernels import linear as L


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "blas"])
@pytest.mark.parametrize("shape", [(37, 64), (3, 11, 64), (0, 64)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out_dim", [96, 40])  # weight gradient: either operand is the one laid out again
@pytest.mark.parametrize("relu", [False, True])
def test_linear_equals_torch_forward_and_backward(shape, bias, out_dim, relu, onednn, monkeypatch):
    if onednn and not L.ONEDNN:
        pytest.skip("no oneDNN in this torch build")
    monkeypatch.setattr(L, "_TRAINS", [onednn])  # whichever library this CPU's timing would pick
    torch.manual_seed(0)
    layer = L.Linear(64, out_dim, bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    weights = torch.randn(*shape[:-1], out_dim)
    params = [x, *layer.parameters()]

    def grads(forward):
        for p in params:
            p.grad = None
        y = forward()
        (y * weights).sum().backward()
        return y.detach(), [p.grad.clone() for p in params]

    y, g = grads(lambda: layer.relu(x) if relu else layer(x))
    ref_y, ref_g = grads(lambda: (F.relu if relu else torch.nn.Identity())(F.linear(x, layer.weight, layer.bias)))
    assert y.shape == ref_y.shape
    if relu and y.numel():
        assert (y == 0).any() and (y > 0).any()
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dim", [96, 40])
def test_grad_weight_is_grad_t_at_x(dtype, out_dim):
    g, x = torch.randn(50, out_dim, dtype=dtype), torch.randn(50, 64, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(L.grad_weight(g, x).float(), g.float().t() @ x.float(), rtol=tol, atol=tol * 10)


def test_training_library_follows_the_environment_and_auto_times_both(monkeypatch):
    timing = L._onednn_is_faster
    for setting, want in (("1", L.ONEDNN), ("0", False), (None, L.ONEDNN)):  # None: unset, the default
        if setting is None:
            monkeypatch.delenv("MTKIT_ONEDNN", raising=False)
        else:
            monkeypatch.setenv("MTKIT_ONEDNN", setting)
        monkeypatch.setattr(L, "_TRAINS", [])
        monkeypatch.setattr(L, "_onednn_is_faster", lambda: pytest.fail("timed without MTKIT_ONEDNN=auto"))
        assert L.onednn_trains() is want
    monkeypatch.setenv("MTKIT_ONEDNN", "auto")
    for faster in (True, False):
        monkeypatch.setattr(L, "_TRAINS", [])
        monkeypatch.setattr(L, "_onednn_is_faster", lambda faster=faster: faster)
        assert L.onednn_trains() is (faster and L.ONEDNN)
        assert L.onednn_trains() is (faster and L.ONEDNN)  # decided once
    if L.ONEDNN:  # the timing compares the two libraries: a oneDNN made slower loses
        monkeypatch.undo()
        real_nt = L._nt

        def slow_nt(*args, **kwargs):
            time.sleep(0.02)
            return real_nt(*args, **kwargs)

        monkeypatch.setattr(L, "_nt", slow_nt)
        assert timing() is False


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


@pytest.mark.skipif(not L.ONEDNN, reason="no oneDNN in this torch build")
@pytest.mark.parametrize("shape", [(1, 64), (37, 64), (3, 11, 64)])
def test_inference_uses_a_packed_weight_that_follows_weight_updates(shape):
    import copy

    torch.manual_seed(0)
    layer = L.Linear(64, 96).eval()
    x = torch.randn(*shape)
    with torch.inference_mode():
        y = layer(x)
        assert layer.packed_weight() is not None and layer.packed_weight().is_mkldnn
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.weight.mul_(-2.0)  # an optimizer step, a load_state_dict, an averaging ...
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    layer.load_state_dict(torch.nn.Linear(64, 96).state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    clone = copy.deepcopy(layer)  # the packed copy is not part of the module
    torch.testing.assert_close(clone(x), layer(x))


def test_training_mode_does_not_pack():
    layer = L.Linear(8, 4).train()
    with torch.inference_mode():
        layer(torch.randn(2, 8))
    assert layer not in L._PACKED


@pytest.mark.skipif(not L.ONEDNN, reason="no oneDNN in this torch build")
def test_bfloat16_inference_packs_too():
    torch.manual_seed(0)
    layer = L.Linear(64, 96).eval().bfloat16()
    x = torch.randn(37, 64).bfloat16()
    with torch.inference_mode():
        y = layer(x)
    assert y.dtype == torch.bfloat16 and layer in L._PACKED
    torch.testing.assert_close(y.float(), F.linear(x, layer.weight, layer.bias).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("inference", [True, False])
def test_relu_is_relu_of_the_layer(inference):
    torch.manual_seed(0)
    layer = L.Linear(64, 96).eval()
    x = torch.randn(5, 7, 64)
    with torch.inference_mode(inference):
        y = layer.relu(x)
    torch.testing.assert_close(y, F.relu(F.linear(x, layer.weight, layer.bias)), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not L.ONEDNN, reason="no oneDNN in this torch build")
def test_release_packed_drops_the_copies():
    model = torch.nn.Sequential(L.Linear(8, 8), L.Linear(8, 4)).eval()
    with torch.inference_mode():
        model(torch.randn(3, 8))
    assert all(m in L._PACKED for m in model)
    L.release_packed(model)
    assert not any(m in L._PACKED for m in model)


def test_layer_built_under_inference_mode_works_unpacked():
    with torch.inference_mode():
        layer = L.Linear(8, 4).eval()  # its weight is an inference tensor: no version counter
        x = torch.randn(2, 8)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        torch.testing.assert_close(layer.relu(x), F.relu(F.linear(x, layer.weight, layer.bias)))
    assert layer.packed_weight() is None


_CACHE_PROBE = """
import ctypes
import sys
from mtkit.utils import limit_onednn_caches
if sys.argv[1] == "limit":
    limit_onednn_caches()  # before oneDNN's first matmul, as `mtkit train` does
import torch
from mtkit.kernels.linear import Linear

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
torch.set_num_threads(1)
layer = Linear(256, 512)

def step(rows):
    x = torch.randn(rows, 256, requires_grad=True)
    layer(x).sum().backward()

step(64)
before = libc.mallinfo2().uordblks
for rows in range(100, 400):  # 300 batch shapes, as training sees
    step(rows)
print((libc.mallinfo2().uordblks - before) / 2**20)
"""


@pytest.mark.skipif(not L.ONEDNN or not sys.platform.startswith("linux"), reason="oneDNN and glibc's mallinfo2")
def test_onednn_shape_caches_stay_small():
    from mtkit.utils import ONEDNN_CACHES

    env = {k: v for k, v in os.environ.items() if k not in ONEDNN_CACHES}  # as a fresh shell has it
    env["MTKIT_ONEDNN"] = "1"  # training's products through oneDNN, whose caches are the point

    def held_mib(mode: str, **extra: str) -> float:
        run = subprocess.run([sys.executable, "-c", _CACHE_PROBE, mode], env={**env, **extra}, capture_output=True,
                             text=True, check=True)
        return float(run.stdout)

    assert held_mib("limit") < 60  # 64-entry caches, as in training
    assert held_mib("default") > 200  # oneDNN's 1024 entries, as in decoding
    assert held_mib("limit", LRU_CACHE_CAPACITY="1024", ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024") > 200  # the user's choice wins


@pytest.mark.skipif(not L.ONEDNN, reason="no oneDNN in this torch build")
def test_step_linear_packs_each_recurrent_weight_when_decoding_only():
    torch.manual_seed(0)
    rnn = torch.nn.LSTM(16, 8, num_layers=2)
    x = torch.randn(5, 16)
    expected = F.linear(x, rnn.weight_ih_l0, rnn.bias_ih_l0)
    y = L.step_linear(x, rnn, "weight_ih_l0", rnn.bias_ih_l0)  # training: plain F.linear, with autograd
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert rnn.weight_ih_l0.grad is not None and rnn not in L._PACKED
    rnn.eval()
    with torch.inference_mode():
        torch.testing.assert_close(L.step_linear(x, rnn, "weight_ih_l0", rnn.bias_ih_l0), expected,
                                   rtol=1e-5, atol=1e-5)
        h = torch.randn(5, 8)
        torch.testing.assert_close(L.step_linear(h, rnn, "weight_hh_l1", None), h @ rnn.weight_hh_l1.T,
                                   rtol=1e-5, atol=1e-5)
    assert set(L._PACKED[rnn]) == {"weight_ih_l0", "weight_hh_l1"}
    with torch.no_grad():
        rnn.weight_ih_l0.mul_(-1.0)  # a changed weight is packed again
    with torch.inference_mode():
        torch.testing.assert_close(L.step_linear(x, rnn, "weight_ih_l0", rnn.bias_ih_l0),
                                   F.linear(x, rnn.weight_ih_l0, rnn.bias_ih_l0), rtol=1e-5, atol=1e-5)
    L.release_packed(rnn)
    assert rnn not in L._PACKED


@pytest.mark.parametrize("activation", [F.relu, F.gelu])
def test_activated_applies_the_activation(activation):
    torch.manual_seed(0)
    layer, x = L.Linear(8, 16), torch.randn(5, 8)
    torch.testing.assert_close(layer.activated(x, activation), activation(F.linear(x, layer.weight, layer.bias)),
                               rtol=1e-5, atol=1e-5)


def test_prepacked_weight_gives_the_same_products_and_only_where_onednn_applies():
    torch.manual_seed(0)
    w, x, b = torch.randn(37, 16), torch.randn(5, 16), torch.randn(37)
    packed = L.prepacked(w)
    if L.ONEDNN:
        assert packed is not w and packed.is_mkldnn
    else:
        assert packed is w
    torch.testing.assert_close(L.matmul_nt(x, packed, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    bf16 = w.to(torch.bfloat16)
    assert L.prepacked(bf16) is bf16  # oneDNN's float32 layout only

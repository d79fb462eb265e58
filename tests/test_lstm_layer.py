"""The CPU LSTM layer kernel and the length-sorted batch against torch's LSTM over packed sequences."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from mtkit.kernels.lstm_layer import lstm_layer
from mtkit.models.lstm import SortedBatch


def packed_reference(rnn: nn.RNNBase, x: torch.Tensor, lens: torch.Tensor):
    out, hidden = rnn(pack_padded_sequence(x, lens, batch_first=True, enforce_sorted=False))
    return pad_packed_sequence(out, batch_first=True, total_length=x.size(1))[0], hidden


def through_sorted_batch(rnn: nn.RNNBase, x: torch.Tensor, lens: torch.Tensor):
    rows = SortedBatch(lens, x.size(1), x.device)
    out, hidden = rows.run(rnn, rows.enter(x))
    return rows.leave(out), rows.final(hidden)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (1, True), (2, True), (3, False)])
def test_sorted_batch_equals_a_packed_sequence_values_and_gradients(cell, layers, bidirectional):
    torch.manual_seed(0)
    rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(6, 5, layers, batch_first=True, bidirectional=bidirectional)
    lens = torch.tensor([4, 9, 1, 3, 9, 6, 2])  # unsorted, with ties and a one-token row
    x0 = torch.randn(len(lens), 10, 6)  # one padding column more than the longest row
    results = []
    for run in (packed_reference, through_sorted_batch):
        rnn.zero_grad()
        x = x0.clone().requires_grad_()
        out, hidden = run(rnn, x, lens)
        hidden = hidden if isinstance(hidden, tuple) else (hidden,)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        loss = loss + sum((h * torch.linspace(2, -1, h.numel()).view_as(h)).sum() for h in hidden)
        loss.backward()
        results.append([out, *hidden, x.grad] + [p.grad for p in rnn.parameters()])
    assert len(results[0]) == len(results[1])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert results[1][0][lens.unsqueeze(1) <= torch.arange(10)].abs().max() == 0  # zero on padding


def test_layer_kernel_gradcheck_with_rows_ending_at_different_steps():
    torch.manual_seed(1)
    d, steps, b, h = 2, 4, 3, 2
    batch_sizes = [3, 2, 2, 1]
    inputs = [torch.randn(d, steps, b, 4 * h, dtype=torch.float64), torch.randn(d, 4 * h, h, dtype=torch.float64),
              torch.randn(d, b, h, dtype=torch.float64), torch.randn(d, b, h, dtype=torch.float64)]
    leaves = [x.requires_grad_() for x in inputs]
    assert torch.autograd.gradcheck(lambda *a: lstm_layer(*a, batch_sizes), leaves)
    out, h_last, c_last = lstm_layer(*leaves, batch_sizes)
    assert out[:, 1:, 2].abs().max() == 0 and out[:, 3:, 1].abs().max() == 0  # ended rows output zeros
    torch.testing.assert_close(h_last[:, 2], out[:, 0, 2])  # a row's final state is its last step's
    with torch.no_grad():  # without gradients the same loop runs without the node
        for got, want in zip(lstm_layer(*inputs, batch_sizes), (out, h_last, c_last)):
            torch.testing.assert_close(got, want)

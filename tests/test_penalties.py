"""The search's penalties and constraints on their own, against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from mtkit.decoding import penalties
from mtkit.decoding.penalties import (
    COVERAGE_FLOOR,
    NEG_INF,
    average_length_penalty,
    ban_tokens_,
    block_repeated_ngrams,
    coverage_penalty,
    enforce_length_,
    filter_for_sampling,
    final_score,
    gnmt_length_penalty,
    length_penalty_fn,
    no_length_penalty,
)
from mtkit.errors import MtkitError

LENGTHS = torch.tensor([0, 1, 2, 7, 13])


# --- length normalisation ----------------------------------------------------------------------
def test_no_length_penalty_is_one_for_every_length_and_alpha():
    for alpha in (0.0, 0.6, 2.0):
        out = no_length_penalty(LENGTHS, alpha)
        assert out.dtype == torch.float32
        assert out.tolist() == [1.0] * 5


def test_average_length_penalty_is_the_length_at_least_one():
    out = average_length_penalty(LENGTHS, 0.6)  # alpha plays no part
    assert out.dtype == torch.float32
    assert out.tolist() == [1.0, 1.0, 2.0, 7.0, 13.0]  # length 0 divides by 1, not 0


def test_gnmt_length_penalty_by_hand():
    # ((5 + |Y|) / 6) ** alpha: |Y| = 1 -> 1 for any alpha; 7 -> 2; 13 -> 3
    assert gnmt_length_penalty(LENGTHS, 1.0).tolist() == pytest.approx([5 / 6, 1.0, 7 / 6, 2.0, 3.0])
    assert gnmt_length_penalty(LENGTHS, 2.0).tolist() == pytest.approx([25 / 36, 1.0, 49 / 36, 4.0, 9.0])
    assert gnmt_length_penalty(LENGTHS, 0.5).tolist() == pytest.approx(
        [math.sqrt(5 / 6), 1.0, math.sqrt(7 / 6), math.sqrt(2), math.sqrt(3)]
    )
    assert gnmt_length_penalty(LENGTHS, 0.6)[3].item() == pytest.approx(2 ** 0.6)
    assert gnmt_length_penalty(LENGTHS, 1.0).dtype == torch.float32


def test_gnmt_with_alpha_zero_is_no_penalty():
    assert gnmt_length_penalty(LENGTHS, 0.0).tolist() == [1.0] * 5


def test_length_penalties_by_name():
    assert length_penalty_fn("none") is no_length_penalty
    assert length_penalty_fn("average") is average_length_penalty
    assert length_penalty_fn("gnmt") is gnmt_length_penalty
    assert set(penalties.LENGTH_PENALTIES) == {"none", "average", "gnmt"}
    with pytest.raises(MtkitError, match="unknown length penalty 'wu'.*decode.length_penalty.*none, average, gnmt"):
        length_penalty_fn("wu")


# --- coverage ----------------------------------------------------------------------------------
def test_coverage_penalty_by_hand():
    # sum_i log(min(c_i, 1)): 0.5 -> log 0.5; 1.0 and 2.0 (over-attended) -> 0
    coverage = torch.tensor([[0.5, 1.0, 2.0], [0.25, 0.5, 1.0]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = coverage_penalty(coverage, mask, 1.0)
    assert out.tolist() == pytest.approx([math.log(0.5), math.log(0.25) + math.log(0.5)])
    assert coverage_penalty(coverage, mask, 0.2).tolist() == pytest.approx(
        [0.2 * math.log(0.5), 0.2 * (math.log(0.25) + math.log(0.5))]
    )


def test_coverage_penalty_of_unattended_positions_is_floored_not_infinite():
    out = coverage_penalty(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), 1.0)
    assert COVERAGE_FLOOR == 1e-6
    assert out.item() == pytest.approx(3 * math.log(1e-6), rel=1e-6)  # about -41.4
    assert math.isfinite(out.item())


def test_coverage_penalty_ignores_padding():
    coverage = torch.tensor([[0.5, 0.0, 0.0]])  # positions 1 and 2 are padding, never attended
    mask = torch.tensor([[True, False, False]])
    assert coverage_penalty(coverage, mask, 1.0).item() == pytest.approx(math.log(0.5))
    # the mask broadcasts: (B, 1, S) against a (B, k, S) beam of candidates
    beams = torch.tensor([[[0.5, 0.0, 9.0], [1.0, 0.0, 0.1]]])
    out = coverage_penalty(beams, mask.unsqueeze(1), 1.0)
    assert out.shape == (1, 2)
    assert out[0].tolist() == pytest.approx([math.log(0.5), 0.0])


def test_coverage_penalty_with_beta_zero_is_zero():
    out = coverage_penalty(torch.tensor([[0.0, 0.3]]), torch.ones(1, 2, dtype=torch.bool), 0.0)
    assert out.tolist() == [0.0]


# --- final score -------------------------------------------------------------------------------
def test_final_score_by_hand():
    log_prob = torch.tensor([-6.0, -6.0, -6.0])
    length = torch.tensor([2, 7, 7])
    assert final_score(log_prob, length, no_length_penalty, 1.0).tolist() == [-6.0, -6.0, -6.0]
    assert final_score(log_prob, length, average_length_penalty, 1.0).tolist() == pytest.approx([-3.0, -6 / 7, -6 / 7])
    # gnmt alpha 1: |Y| = 7 -> lp 2
    assert final_score(log_prob, length, gnmt_length_penalty, 1.0).tolist()[1:] == pytest.approx([-3.0, -3.0])
    cov = torch.tensor([0.0, -0.5, -1.0])
    assert final_score(log_prob, length, gnmt_length_penalty, 1.0, cov).tolist()[1:] == pytest.approx([-3.5, -4.0])


def test_final_score_keeps_impossible_hypotheses_impossible():
    out = final_score(torch.tensor([NEG_INF]), torch.tensor([3]), average_length_penalty, 1.0)
    assert out.item() == NEG_INF


# --- constraints on log-probs --------------------------------------------------------------------
def test_ban_tokens_in_place():
    lp = torch.zeros(2, 5)
    assert ban_tokens_(lp, [0, 2]) is lp
    assert lp[:, [0, 2]].eq(NEG_INF).all() and lp[:, [1, 3, 4]].eq(0.0).all()
    lp = torch.zeros(1, 3)
    ban_tokens_(lp, [])
    assert lp.eq(0.0).all()


def test_enforce_length_bans_eos_before_min_len_and_forces_it_at_max_len():
    eos = 1
    max_len = torch.tensor([5, 0, 2])  # row 1 is already at its maximum at step 0
    lp = enforce_length_(torch.zeros(3, 4), 0, eos, 2, max_len)
    assert lp[0].tolist() == [0.0, NEG_INF, 0.0, 0.0]  # EOS banned before min_len
    assert lp[1].tolist() == [NEG_INF, 0.0, NEG_INF, NEG_INF]  # ... unless only EOS is left
    lp = enforce_length_(torch.zeros(3, 4), 2, eos, 2, max_len)
    assert lp[0].tolist() == [0.0] * 4
    assert lp[2].tolist() == [NEG_INF, 0.0, NEG_INF, NEG_INF]


def test_repeated_ngrams_are_blocked():
    a, b, c = 2, 3, 4
    history = torch.tensor([[a, b, c, a]])  # the bigram (a, b) exists and the row ends in a
    lp = block_repeated_ngrams(torch.zeros(1, 6), history, 2)
    assert lp[0].tolist() == [0.0, 0.0, 0.0, NEG_INF, 0.0, 0.0]
    lp = block_repeated_ngrams(torch.zeros(1, 6), history, 1)  # every token seen is banned
    assert lp[0].tolist() == [0.0, 0.0, NEG_INF, NEG_INF, NEG_INF, 0.0]
    short = block_repeated_ngrams(torch.zeros(1, 6), history[:, :1], 2)  # fewer tokens than n
    assert short.eq(0.0).all()


def test_sampling_filters():
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    halved = [math.log(p) / 2 for p in (0.5, 0.3, 0.15, 0.05)]  # temperature 2
    assert filter_for_sampling(lp, 2.0, 0, 1.0)[0].tolist() == pytest.approx(halved)
    top2 = filter_for_sampling(lp, 1.0, 2, 1.0)
    assert torch.isinf(top2[0, 2:]).all() and torch.isfinite(top2[0, :2]).all()
    # nucleus 0.7: 0.5 alone is short of it, 0.5 + 0.3 reaches it -> two tokens stay
    nucleus = filter_for_sampling(lp, 1.0, 0, 0.7)
    assert torch.isfinite(nucleus[0]).tolist() == [True, True, False, False]

"""Search invariants: a scripted model with hand-written distributions, exhaustive search on a
tiny vocabulary, beam 1 == greedy, batch == alone, scores == teacher-forced rescoring."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import pytest
import torch
from torch import nn

from mtkit.config import DecodeConfig
from mtkit.config_fields import ModelConfig
from mtkit.decoding.beam import beam_search
from mtkit.decoding.search import SamplingOptions, generate
from mtkit.decoding.search_base import Ensemble
from mtkit.errors import MtkitError
from mtkit.models.base import Seq2Seq

torch.set_num_threads(1)
PAD, UNK, BOS, EOS, A, B = 0, 1, 2, 3, 4, 5
V = 6


# ----------------------------------------------------------------------------------------------
class Scripted(Seq2Seq):
    """Step distributions looked up by target prefix: ``table[prefix] = {token: prob}``.

    Unlisted prefixes use ``default``. Tokens missing from a distribution get probability 0.
    The state carries the prefix so far, so reordering is tested as well.
    """

    def __init__(self, table: dict[tuple[int, ...], dict[int, float]], default: dict[int, float]):
        super().__init__(ModelConfig(arch="scripted"), V, V, PAD)
        self.table, self.default = table, default

    def _dist(self, prefix: tuple[int, ...]) -> torch.Tensor:
        probs = torch.zeros(V)
        for tok, p in self.table.get(prefix, self.default).items():
            probs[tok] = p
        return probs.log()

    def encode(self, src, src_len):
        return {"src_len": src_len}

    def init_state(self, enc):
        return {"prefix": torch.zeros(enc["src_len"].size(0), 0, dtype=torch.long)}

    def step(self, prev, enc, state, need_attn=True):
        prefix = state["prefix"]
        if prefix.size(1) or not bool((prev == BOS).all()):
            prefix = torch.cat([prefix, prev.unsqueeze(1)], 1)
        lp = torch.stack([self._dist(tuple(row.tolist())) for row in prefix])
        return lp, {"prefix": prefix}, None

    def forward(self, src, src_len, tgt_in):
        rows = []
        for seq in tgt_in.tolist():
            rows.append(torch.stack([self._dist(tuple(seq[1:i])) for i in range(1, len(seq) + 1)]))
        return torch.stack(rows)


# prefix () -> a .5, b .4, eos .1; (a,) -> a .7 ...; (b,) -> eos .9; default -> eos .9
TABLE = {
    (): {EOS: 0.1, A: 0.5, B: 0.4},
    (A,): {EOS: 0.2, A: 0.7, B: 0.1},
    (B,): {EOS: 0.9, A: 0.05, B: 0.05},
}
DEFAULT = {EOS: 0.9, A: 0.05, B: 0.05}
SRC = torch.tensor([[A, EOS]])
SRC_LEN = torch.tensor([2])


def cfg_(**kw) -> DecodeConfig:
    base = dict(beam=2, nbest=2, max_len_a=0.0, max_len_b=10, min_len=1, length_penalty="none", alpha=1.0)
    base.update(kw)
    return DecodeConfig(**base)


def run(model, **kw):
    return generate([model], SRC, SRC_LEN, cfg_(**kw), BOS, EOS)[0]


def test_scripted_beam_no_penalty():
    # step 0 (EOS banned by min_len): a .5, b .4. Step 1: b+eos .36 finishes (top-k), aa .35 and
    # ab .05 continue. Step 2: aa+eos .315, ab+eos .045 -> store {b .36, aa .315}: done.
    hyps = run(Scripted(TABLE, DEFAULT))
    assert [h.tokens for h in hyps] == [[B], [A, A]]
    assert hyps[0].log_prob == pytest.approx(math.log(0.36), abs=1e-6)
    assert hyps[1].log_prob == pytest.approx(math.log(0.315), abs=1e-6)
    assert [h.score for h in hyps] == pytest.approx([h.log_prob for h in hyps], abs=1e-6)


def test_scripted_beam_average_penalty_prefers_longer():
    hyps = run(Scripted(TABLE, DEFAULT), length_penalty="average")
    assert [h.tokens for h in hyps] == [[A, A], [B]]  # |Y| counts EOS: 3 and 2
    assert hyps[0].score == pytest.approx(math.log(0.315) / 3, abs=1e-6)
    assert hyps[1].score == pytest.approx(math.log(0.36) / 2, abs=1e-6)
    assert hyps[0].log_prob == pytest.approx(math.log(0.315), abs=1e-6)


@pytest.mark.parametrize("alpha", [0.6, 1.0])
def test_scripted_beam_gnmt_penalty(alpha):
    hyps = run(Scripted(TABLE, DEFAULT), length_penalty="gnmt", alpha=alpha)
    s_b = math.log(0.36) / ((5 + 2) / 6) ** alpha
    s_aa = math.log(0.315) / ((5 + 3) / 6) ** alpha
    expect = sorted([([B], s_b), ([A, A], s_aa)], key=lambda x: -x[1])
    assert [h.tokens for h in hyps] == [e[0] for e in expect]
    assert [h.score for h in hyps] == pytest.approx([e[1] for e in expect], abs=1e-6)


def test_scripted_greedy_and_constraints():
    model = Scripted(TABLE, DEFAULT)
    (g,) = run(model, beam=1, nbest=1)
    assert g.tokens == [A, A] and g.log_prob == pytest.approx(math.log(0.5 * 0.7 * 0.9), abs=1e-6)
    # max length 1 token: EOS forced at step 1
    hyps = run(model, max_len_b=1)
    assert [h.tokens for h in hyps] == [[B], [A]]
    assert hyps[1].log_prob == pytest.approx(math.log(0.5 * 0.2), abs=1e-6)
    # min length 0 lets the empty hypothesis compete: eos .1 at step 0 is in the top 2
    hyps = run(model, min_len=0, beam=2)
    assert [h.tokens for h in hyps] == [[B], [A, A]]
    (e,) = run(model, min_len=0, beam=1, nbest=1, max_len_b=0)
    assert e.tokens == [] and e.log_prob == pytest.approx(math.log(0.1), abs=1e-6)
    # min length 2 bans b+eos: greedy and beam must produce >= 2 tokens
    for h in run(model, min_len=2):
        assert len(h.tokens) >= 2
    # no-repeat unigrams: aa is banned; greedy goes a -> eos .2 (beats b .1)
    (g,) = run(model, beam=1, nbest=1, no_repeat_ngram=1)
    assert g.tokens == [A] and g.log_prob == pytest.approx(math.log(0.1), abs=1e-6)
    for h in run(model, no_repeat_ngram=1, beam=2):
        assert len(set(h.tokens)) == len(h.tokens)


def test_no_repeat_bigram_blocks_repeats():
    loop = {(): {A: 0.9, EOS: 0.1}}
    # a model that loves "a b a b ...": the bigram (a, b) may occur once only
    table = {p: ({B: 0.9, EOS: 0.05, A: 0.05} if p[-1:] == (A,) else {A: 0.9, EOS: 0.05, B: 0.05})
             for n in range(6) for p in itertools.product([A, B], repeat=n)}
    table.update(loop)
    (g,) = generate([Scripted(table, DEFAULT)], SRC, SRC_LEN, cfg_(beam=1, nbest=1, no_repeat_ngram=2, max_len_b=5), BOS, EOS)[0]
    grams = list(zip(g.tokens, g.tokens[1:]))
    assert len(grams) == len(set(grams))


def test_bad_configs_are_errors():
    # checked once where a decode config is assembled, not per batch by the search
    for kw in ({"beam": 0}, {"nbest": 3, "beam": 2}, {"nbest": 0}, {"length_penalty": "bogus"}):
        with pytest.raises(MtkitError):
            cfg_(**kw).check_for_search()
    cfg_(nbest=3, beam=2).check_for_search(sampling=True)  # sampling draws nbest samples of any number
    with pytest.raises(MtkitError):
        SamplingOptions(temperature=0)


def random_table(seed: int, depth: int) -> dict[tuple[int, ...], dict[int, float]]:
    g = torch.Generator().manual_seed(seed)
    table = {}
    for n in range(depth + 1):
        for prefix in itertools.product([UNK, A, B], repeat=n):
            p = torch.rand(4, generator=g) ** 3 + 0.01
            p = p / p.sum()
            table[prefix] = dict(zip([EOS, UNK, A, B], p.tolist()))
    return table


@pytest.mark.parametrize("penalty,alpha", [("none", 1.0), ("average", 1.0), ("gnmt", 0.6), ("gnmt", 2.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_beam_equals_exhaustive_search(penalty, alpha, seed):
    depth = 3  # at most 3 tokens + EOS: 1 + 3 + 9 + 27 = 40 complete hypotheses
    table = random_table(seed, depth)
    model = Scripted(table, DEFAULT)

    def lp(n):
        return {"none": 1.0, "average": float(n), "gnmt": ((5 + n) / 6) ** alpha}[penalty]

    best = None
    for n in range(depth + 1):
        for seq in itertools.product([UNK, A, B], repeat=n):
            logp = sum(math.log(table[seq[:i]][seq[i]]) for i in range(n)) + math.log(table[seq][EOS])
            score = logp / lp(n + 1)
            if best is None or score > best[1]:
                best = (list(seq), score)
    cfg = cfg_(beam=40, nbest=1, min_len=0, max_len_b=depth, length_penalty=penalty, alpha=alpha)
    (h,) = generate([model], SRC, SRC_LEN, cfg, BOS, EOS)[0]
    assert h.tokens == best[0]
    assert h.score == pytest.approx(best[1], abs=1e-5)


# ----------------------------------------------------------------------------------------------
@dataclass
class TinyGRUConfig(ModelConfig):
    arch: str = "tiny_gru"
    dim: int = 16
    max_len: int = 0  # 0 = unbounded


class TinyGRU(Seq2Seq):
    """A small attentional GRU translator behind the contract (test-only)."""

    Config = TinyGRUConfig

    def __init__(self, cfg: TinyGRUConfig, src_vocab_size: int, tgt_vocab_size: int, pad_id: int):
        super().__init__(cfg, src_vocab_size, tgt_vocab_size, pad_id)
        d = cfg.dim
        self.src_emb = nn.Embedding(src_vocab_size, d, padding_idx=pad_id)
        self.tgt_emb = nn.Embedding(tgt_vocab_size, d, padding_idx=pad_id)
        self.enc = nn.GRU(d, d, batch_first=True)
        self.cell = nn.GRUCell(d, d)
        self.out = nn.Linear(2 * d, tgt_vocab_size)
        with torch.no_grad():
            self.out.weight.mul_(6.0)  # peaked distributions: decisions far from ties

    def max_positions(self):
        return self.cfg.max_len or None

    def encode(self, src, src_len):
        mem, _ = self.enc(self.src_emb(src))  # (B, S, d); unidirectional, so padding is harmless
        mask = torch.arange(src.size(1), device=src.device).unsqueeze(0) < src_len.unsqueeze(1)
        last = mem.gather(1, (src_len - 1).view(-1, 1, 1).expand(-1, 1, mem.size(2))).squeeze(1)
        return {"mem": mem, "mask": mask, "last": last}

    def init_state(self, enc):
        return {"h": enc["last"].clone()}

    def step(self, prev, enc, state, need_attn=True):
        h = self.cell(self.tgt_emb(prev), state["h"])
        scores = torch.einsum("bsd,bd->bs", enc["mem"], h).masked_fill(~enc["mask"], float("-inf"))
        attn = scores.softmax(-1)
        ctx = torch.einsum("bs,bsd->bd", attn, enc["mem"])
        lp = self.out(torch.cat([h, ctx], -1)).log_softmax(-1)
        return lp, {"h": h}, attn

    def forward(self, src, src_len, tgt_in):
        enc = self.encode(src, src_len)
        state = self.init_state(enc)
        outs = []
        for t in range(tgt_in.size(1)):
            lp, state, _ = self.step(tgt_in[:, t], enc, state)
            outs.append(lp)
        return torch.stack(outs, 1)


def tiny_gru(seed: int = 0, vocab: int = 12, dim: int = 16, max_len: int = 0) -> TinyGRU:
    torch.manual_seed(seed)
    return TinyGRU(TinyGRUConfig(dim=dim, max_len=max_len), vocab, vocab, PAD).eval()


def random_batch(seed: int = 0, n: int = 5, vocab: int = 12):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, 9, (n,), generator=g)
    src = torch.full((n, int(lens.max())), PAD)
    for i, m in enumerate(lens.tolist()):
        src[i, : m - 1] = torch.randint(4, vocab, (m - 1,), generator=g)
        src[i, m - 1] = EOS
    return src, lens


def rescore(models, src, src_len, tokens) -> float:
    """Teacher-forced log-prob of ``tokens`` + EOS (log of the mean probability for ensembles)."""
    tgt_in = torch.tensor([[BOS] + tokens])
    tgt_out = torch.tensor([tokens + [EOS]])
    with torch.no_grad():
        lps = torch.stack([m(src, src_len, tgt_in).log_softmax(-1) for m in models])  # (M, 1, T, V)
    lp = torch.logsumexp(lps, 0) - math.log(len(models))
    return float(lp.gather(2, tgt_out.unsqueeze(2)).sum())


GRU_CFG = DecodeConfig(beam=4, nbest=4, max_len_a=1.0, max_len_b=3, min_len=1, length_penalty="gnmt", alpha=0.6)


def test_beam_one_equals_greedy():
    model = tiny_gru()
    src, src_len = random_batch()
    cfg = replace(GRU_CFG, beam=1, nbest=1, length_penalty="average", beta=0.2)
    greedy = generate([model], src, src_len, cfg, BOS, EOS, attention=True)
    with torch.inference_mode():
        beam1 = beam_search(Ensemble([model]), src, src_len, cfg, BOS, EOS, attention=True)
    for (g,), (b,) in zip(greedy, beam1):
        assert g.tokens == b.tokens
        assert g.score == pytest.approx(b.score, abs=1e-5)
        assert g.log_prob == pytest.approx(b.log_prob, abs=1e-5)
        assert torch.allclose(g.attn, b.attn, atol=1e-6)


@pytest.mark.parametrize("beam", [1, 4])
def test_batch_equals_alone_and_scores_equal_rescoring(beam):
    model = tiny_gru(1)
    src, src_len = random_batch(1, n=6)
    cfg = replace(GRU_CFG, beam=beam, nbest=beam)
    batch = generate([model], src, src_len, cfg, BOS, EOS)
    assert len(batch) == src.size(0)
    for i in range(src.size(0)):
        one_src, one_len = src[i : i + 1, : int(src_len[i])], src_len[i : i + 1]
        alone = generate([model], one_src, one_len, cfg, BOS, EOS)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batch[i]]
        assert [h.score for h in alone] == pytest.approx([h.score for h in batch[i]], abs=1e-5)
        hyps = batch[i]
        assert len(hyps) == beam
        assert all(x.score >= y.score for x, y in zip(hyps, hyps[1:]))  # n-best sorted
        for h in hyps:
            assert len(h.tokens) <= int(src_len[i]) + 3
            assert EOS not in h.tokens and BOS not in h.tokens and PAD not in h.tokens
            assert h.log_prob == pytest.approx(rescore([model], one_src, one_len, h.tokens), abs=1e-4)
            assert h.score == pytest.approx(h.log_prob / ((5 + len(h.tokens) + 1) / 6) ** 0.6, abs=1e-4)


def test_coverage_penalty_matches_returned_attention():
    model = tiny_gru(2)
    src, src_len = random_batch(2, n=4)
    cfg = replace(GRU_CFG, beta=0.3, length_penalty="average")
    out = generate([model], src, src_len, cfg, BOS, EOS, attention=True)
    for i, hyps in enumerate(out):
        for h in hyps:
            assert h.attn.shape == (len(h.tokens) + 1, int(src_len[i]))
            assert torch.allclose(h.attn.sum(1), torch.ones(h.attn.size(0)), atol=1e-5)
            cov = h.attn.sum(0).clamp(min=1e-6, max=1.0).log().sum()
            expect = h.log_prob / (len(h.tokens) + 1) + 0.3 * float(cov)
            assert h.score == pytest.approx(expect, abs=1e-4)


def test_ensemble_scores_equal_rescoring_of_mean_probability():
    models = [tiny_gru(3), tiny_gru(4)]
    src, src_len = random_batch(3, n=3)
    for cfg in (GRU_CFG, replace(GRU_CFG, beam=1, nbest=1)):
        out = generate(models, src, src_len, cfg, BOS, EOS)
        for i, hyps in enumerate(out):
            one_src, one_len = src[i : i + 1, : int(src_len[i])], src_len[i : i + 1]
            for h in hyps:
                assert h.log_prob == pytest.approx(rescore(models, one_src, one_len, h.tokens), abs=1e-4)
    # an ensemble of a model with itself decodes exactly like the model
    single = generate(models[:1], src, src_len, GRU_CFG, BOS, EOS)
    double = generate(models[:1] * 2, src, src_len, GRU_CFG, BOS, EOS)
    assert [[h.tokens for h in x] for x in single] == [[h.tokens for h in x] for x in double]


def test_max_positions_caps_length():
    model = tiny_gru(5, max_len=4)
    src, src_len = random_batch(5, n=4)
    cfg = replace(GRU_CFG, max_len_a=10.0, max_len_b=50, min_len=20)  # min_len would push past it
    for hyps in generate([model], src, src_len, cfg, BOS, EOS):
        for h in hyps:
            assert len(h.tokens) <= 3  # BOS + 3 tokens fill the 4 positions; EOS is forced


def test_sampling_reproducible_and_rescorable():
    model = tiny_gru(6)
    src, src_len = random_batch(6, n=3)
    cfg = replace(GRU_CFG, nbest=3)

    def sample(seed, **kw):
        opts = SamplingOptions(generator=torch.Generator().manual_seed(seed), **kw)
        return generate([model], src, src_len, cfg, BOS, EOS, sampling=opts)

    a, b = sample(7, temperature=1.5), sample(7, temperature=1.5)
    assert [[h.tokens for h in x] for x in a] == [[h.tokens for h in x] for x in b]
    for i, hyps in enumerate(a):
        assert len(hyps) == 3 and all(x.score >= y.score for x, y in zip(hyps, hyps[1:]))
        one_src, one_len = src[i : i + 1, : int(src_len[i])], src_len[i : i + 1]
        for h in hyps:
            assert h.log_prob == pytest.approx(rescore([model], one_src, one_len, h.tokens), abs=1e-4)
    # top-k 1 (and a tiny nucleus) leave one token: sampling is greedy
    greedy = generate([model], src, src_len, replace(cfg, beam=1, nbest=1), BOS, EOS)
    for opts in ({"topk": 1}, {"topp": 1e-6}):
        for g, s in zip(greedy, sample(3, **opts)):
            assert all(h.tokens == g[0].tokens for h in s)


FAMILY_PRESETS = ["transformer_tiny", "lstm_tiny", "bahdanau_tiny", "luong_tiny", "gnmt_tiny"]


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_every_family_batch_equals_alone_and_rescoring(preset):
    from mtkit.config import load_config, preset_names
    from mtkit.models import build_model

    if preset not in preset_names():
        pytest.skip(f"preset {preset} not available")
    torch.manual_seed(0)
    model = build_model(load_config(preset).model, 12, 12, PAD).eval()
    src, src_len = random_batch(7, n=4)
    cfg = replace(GRU_CFG, beam=3, nbest=3)
    batch = generate([model], src, src_len, cfg, BOS, EOS, attention=True)
    for i, hyps in enumerate(batch):
        one_src, one_len = src[i : i + 1, : int(src_len[i])], src_len[i : i + 1]
        alone = generate([model], one_src, one_len, cfg, BOS, EOS)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in hyps]
        for h in hyps:
            assert h.log_prob == pytest.approx(rescore([model], one_src, one_len, h.tokens), abs=1e-4)


# --- finished sentences leave the batch; the "first" stopping rule ------------------------------
class RowCounter:
    """Wraps a model's step to record how many rows each step receives."""

    def __init__(self, model: Seq2Seq):
        self.model, self.rows = model, []
        self._step = model.step

    def __enter__(self):
        def step(prev, enc, state, need_attn=True):
            self.rows.append(prev.size(0))
            return self._step(prev, enc, state, need_attn)

        self.model.step = step
        return self

    def __exit__(self, *exc):
        del self.model.step


@pytest.mark.parametrize("beam", [1, 4])
def test_finished_sentences_leave_the_batch(beam):
    model = tiny_gru(2)
    src, src_len = random_batch(3, n=8)  # sources of 2-8 tokens: outputs of different lengths
    cfg = replace(GRU_CFG, beam=beam, nbest=1, max_len_a=1.0, max_len_b=2)
    with RowCounter(model) as rc:
        out = generate([model], src, src_len, cfg, BOS, EOS)
    assert rc.rows[0] == 8  # the first step: one row per sentence (the k beams are identical)
    assert rc.rows[1] == 8 * beam
    assert rc.rows[1:] == sorted(rc.rows[1:], reverse=True)  # never grows after that
    assert rc.rows[-1] < 8 * beam  # and did shrink before the end
    for i in range(src.size(0)):  # results as if each sentence were decoded alone
        alone = generate([model], src[i : i + 1, : int(src_len[i])], src_len[i : i + 1], cfg, BOS, EOS)[0]
        assert alone[0].tokens == out[i][0].tokens
        assert alone[0].score == pytest.approx(out[i][0].score, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_stopping_first_equals_full_without_length_penalty(seed):
    """Without a length penalty, extensions only lose probability: once the best extension is EOS
    nothing later can beat it, so stopping there returns the same best hypothesis, sooner."""
    model = tiny_gru(seed)
    src, src_len = random_batch(seed, n=6)
    full_cfg = replace(GRU_CFG, beam=4, nbest=1, length_penalty="none", max_len_b=6)
    with RowCounter(model) as full_rows:
        full = generate([model], src, src_len, full_cfg, BOS, EOS)
    with RowCounter(model) as first_rows:
        first = generate([model], src, src_len, replace(full_cfg, stopping="first"), BOS, EOS)
    for f, g in zip(full, first):
        assert f[0].tokens == g[0].tokens
        assert f[0].score == pytest.approx(g[0].score, abs=1e-6)
    assert sum(first_rows.rows) <= sum(full_rows.rows)


def test_stopping_first_keeps_nbest():
    model = tiny_gru(4)
    src, src_len = random_batch(4, n=5)
    cfg = replace(GRU_CFG, beam=4, nbest=3, stopping="first")
    for hyps in generate([model], src, src_len, cfg, BOS, EOS):
        assert len(hyps) == 3
        assert all(x.score >= y.score for x, y in zip(hyps, hyps[1:]))


def test_unknown_stopping_rule_is_an_error():
    with pytest.raises(MtkitError, match="decode.stopping"):
        replace(GRU_CFG, stopping="early").check_for_search()


@pytest.mark.parametrize("n,v,c", [(7, 8000, 10), (3, 8003, 4), (5, 700, 1), (2, 100, 10), (4, 64 * 20, 10)])
def test_row_topk_equals_topk(n, v, c):
    from mtkit.decoding.search_base import row_topk

    g = torch.Generator().manual_seed(v)
    x = torch.randn(n, v, generator=g)
    x[0, -1] = 50.0  # the best in the partial last block
    x[1, :] = float("-inf")
    x[1, 3] = 0.0  # a row of one finite value (a row at its length limit)
    values, idx = row_topk(x, c)
    ref_values, ref_idx = x.topk(c, dim=1)
    assert torch.equal(values, ref_values)
    assert torch.equal(x.gather(1, idx), values)
    assert all(len(set(row)) == c for row in idx.tolist())  # c distinct columns per row
    if c == 1:
        assert torch.equal(idx.squeeze(1), x.argmax(1))

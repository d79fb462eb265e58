"""Checkpoint selection (last / best / list) and weight averaging."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mtkit.average import average_checkpoints, select_checkpoints
from mtkit.checkpoint import build_payload, load_checkpoint, save_checkpoint, subword_entries
from mtkit.cli import main
from mtkit.config import Config
from mtkit.errors import MtkitError

SPM = b"fake sentencepiece model bytes"
VOCAB = {"src_size": 11, "tgt_size": 11, "pad": 0, "bos": 2, "eos": 3, "unk": 1, "joint": True}


def make_payload(seed: int, update: int, bleu: float | None = None, loss: float | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(11, 4, generator=g)
    state = {
        "embed.weight": emb,
        "out.weight": emb,  # tied with embed.weight (same storage)
        "layer.weight": torch.randn(4, 4, generator=g),
        "layer.bias": torch.randn(4, generator=g),
        "half.weight": torch.randn(3, 2, generator=g).half(),
        "norm.num_batches_tracked": torch.tensor(update, dtype=torch.long),
        "mask": torch.tensor([True, False, seed % 2 == 0]),
    }
    cfg = Config().to_dict()
    cfg["train"]["lr"] = 1e-3 + update * 1e-6  # non-model keys may differ between checkpoints
    metrics = {"valid_loss": loss, "valid_ppl": None, "valid_bleu": bleu}
    return build_payload(
        cfg,
        state,
        spm={"src": SPM, "tgt": SPM},
        vocab=dict(VOCAB),
        optimizer={"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []},
        update=update,
        epoch=1,
        metrics=metrics,
    )


def write(path: Path, payload: dict) -> Path:
    save_checkpoint(path, payload)
    return path


def test_average_is_elementwise_mean(tmp_path):
    payloads = [make_payload(seed, update) for seed, update in ((1, 300), (2, 100), (3, 200))]
    paths = [write(tmp_path / f"c{i}.pt", p) for i, p in enumerate(payloads)]
    out = tmp_path / "avg.pt"
    average_checkpoints(paths, out)

    avg = load_checkpoint(out)
    state = avg["model"]
    assert list(state) == list(payloads[0]["model"])
    for key in ("embed.weight", "layer.weight", "layer.bias", "half.weight"):
        stack = torch.stack([p["model"][key].double() for p in payloads])
        expected = stack.mean(0)
        assert state[key].dtype == payloads[0]["model"][key].dtype
        tol = 1e-3 if state[key].dtype == torch.float16 else 1e-6
        torch.testing.assert_close(state[key].double(), expected, atol=tol, rtol=0)
        # a real mean, not one of the inputs
        assert not any(torch.equal(state[key], p["model"][key]) for p in payloads)
    # integer / bool buffers and metadata come from the newest (update 300, given first)
    assert state["norm.num_batches_tracked"].item() == 300
    assert torch.equal(state["mask"], payloads[0]["model"]["mask"])
    assert avg["config"] == payloads[0]["config"] and avg["update"] == 300
    # tied weights stay tied
    assert state["out.weight"].untyped_storage().data_ptr() == state["embed.weight"].untyped_storage().data_ptr()
    # self-contained, no training state, says what it averages
    assert avg["spm"] == {"src": SPM, "tgt": SPM} and avg["vocab"] == VOCAB
    assert "optimizer" not in avg
    assert avg["metrics"]["averaged"] is True
    assert avg["metrics"]["averaged_updates"] == [300, 100, 200]


def test_average_of_one_is_identity_and_rounding_is_float32(tmp_path):
    p = make_payload(5, 10)
    path = write(tmp_path / "c.pt", p)
    average_checkpoints([path], tmp_path / "avg.pt")
    state = load_checkpoint(tmp_path / "avg.pt")["model"]
    for key, value in p["model"].items():
        assert torch.equal(state[key], value), key

    # fp16 values whose fp16 running sum would overflow: the float32 sum does not
    big = [make_payload(i, i) for i in (1, 2)]
    for b in big:
        b["model"]["half.weight"] = torch.full((3, 2), 60000.0, dtype=torch.float16)
    paths = [write(tmp_path / f"b{i}.pt", b) for i, b in enumerate(big)]
    average_checkpoints(paths, tmp_path / "avg2.pt")
    half = load_checkpoint(tmp_path / "avg2.pt")["model"]["half.weight"]
    assert torch.isfinite(half).all() and half.float().eq(60000.0).all()


@pytest.fixture
def ckpt_dir(tmp_path) -> Path:
    d = tmp_path / "ckpts"
    d.mkdir()
    bleus = {50: 10.0, 100: 30.0, 200: 25.0, 1000: 20.0, 400: 30.0}
    for i, (update, bleu) in enumerate(bleus.items()):
        p = write(d / f"checkpoint_{update}.pt", make_payload(i, update, bleu=bleu, loss=5.0 - bleu / 10))
        # file times say the opposite of the update numbers
        os.utime(p, (10_000 - update, 10_000 - update))
    write(d / "checkpoint_last.pt", make_payload(9, 1000, bleu=20.0))
    write(d / "checkpoint_best.pt", make_payload(9, 400, bleu=30.0))
    (d / "checkpoint_7.pt.tmp-123").write_bytes(b"partial")
    return d


def test_select_last_by_update_number(ckpt_dir):
    assert [p.name for p in select_checkpoints(ckpt_dir, last=2)] == ["checkpoint_400.pt", "checkpoint_1000.pt"]
    assert [p.name for p in select_checkpoints(ckpt_dir, last=3)] == [
        "checkpoint_200.pt",
        "checkpoint_400.pt",
        "checkpoint_1000.pt",
    ]
    assert len(select_checkpoints(ckpt_dir, last=50)) == 5


def test_select_best_by_bleu_then_loss(ckpt_dir):
    # BLEU 30 (updates 100 and 400, tie -> both), then 25 (update 200)
    assert [p.name for p in select_checkpoints(ckpt_dir, best=1)] == ["checkpoint_400.pt"]  # tie: newer wins
    assert [p.name for p in select_checkpoints(ckpt_dir, best=3)] == [
        "checkpoint_100.pt",
        "checkpoint_200.pt",
        "checkpoint_400.pt",
    ]
    # one checkpoint without BLEU: every checkpoint is ranked by loss (lower is better)
    p = make_payload(0, 50, bleu=None, loss=0.1)
    write(ckpt_dir / "checkpoint_50.pt", p)
    assert [p.name for p in select_checkpoints(ckpt_dir, best=2)][0] == "checkpoint_50.pt"
    # neither metric: refused
    write(ckpt_dir / "checkpoint_50.pt", make_payload(0, 50))
    with pytest.raises(MtkitError, match="checkpoint_50.pt records no validation"):
        select_checkpoints(ckpt_dir, best=2)


def test_select_best_refuses_mixed_metrics(tmp_path):
    # one checkpoint records only BLEU, the other only loss: no metric ranks them all
    write(tmp_path / "checkpoint_100.pt", make_payload(1, 100, bleu=30.0, loss=None))
    write(tmp_path / "checkpoint_200.pt", make_payload(2, 200, bleu=None, loss=2.0))
    with pytest.raises(MtkitError, match="do not all record the same validation metric"):
        select_checkpoints(tmp_path, best=1)


def test_selection_refusals(tmp_path, ckpt_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MtkitError, match="no checkpoint_<update>.pt"):
        select_checkpoints(empty, last=3)
    with pytest.raises(MtkitError, match="not found"):
        select_checkpoints(tmp_path / "nope", last=3)
    with pytest.raises(MtkitError, match="--last N or --best N"):
        select_checkpoints(ckpt_dir)
    with pytest.raises(MtkitError, match="not both"):
        select_checkpoints(ckpt_dir, last=1, best=1)
    with pytest.raises(MtkitError, match="no checkpoints selected"):
        select_checkpoints([])
    with pytest.raises(MtkitError, match="given twice"):
        select_checkpoints([ckpt_dir / "checkpoint_50.pt", ckpt_dir / ".." / ckpt_dir.name / "checkpoint_50.pt"])
    with pytest.raises(MtkitError, match="no checkpoints selected"):
        average_checkpoints([], tmp_path / "out.pt")


def _mutations():
    def arch(p):
        p["config"]["model"]["arch"] = "lstm"

    def model_cfg(p):
        p["config"]["model"]["d_model"] = 512

    def shape(p):
        p["model"]["layer.bias"] = torch.zeros(5)

    def extra_key(p):
        p["model"]["extra.weight"] = torch.zeros(2)

    def missing_key(p):
        del p["model"]["layer.bias"]

    def spm(p):
        p["spm"] = {"src": SPM, "tgt": SPM + b"x"}

    def vocab(p):
        p["vocab"]["tgt_size"] = 12

    def untied(p):
        p["model"]["out.weight"] = p["model"]["out.weight"].clone()

    def not_a_tensor(p):
        p["model"]["layer.bias"] = [0.0, 1.0, 2.0, 3.0]

    return {
        "arch": (arch, "different architectures"),
        "model_cfg": (model_cfg, "model.d_model differs"),
        "shape": (shape, "'layer.bias' has shape"),
        "extra_key": (extra_key, "extra weight 'extra.weight'"),
        "missing_key": (missing_key, "missing weight 'layer.bias'"),
        "spm": (spm, "tgt sentencepiece models"),
        "vocab": (vocab, "vocab.tgt_size differs"),
        "untied": (untied, "ties weights differently"),
        "not_a_tensor": (not_a_tensor, "'layer.bias' is a tensor in only one of"),
    }


@pytest.mark.parametrize("first", [False, True], ids=["second_differs", "first_differs"])
@pytest.mark.parametrize("name", list(_mutations()))
def test_average_refuses_incompatible(tmp_path, name, first):
    mutate, message = _mutations()[name]
    a = make_payload(1, 100)
    b = copy.deepcopy(make_payload(2, 200))
    if first:  # the first checkpoint read is the reference: the other way round must fail as clearly
        message = {"extra weight 'extra.weight'": "missing weight 'extra.weight'",
                   "missing weight 'layer.bias'": "extra weight 'layer.bias'"}.get(message, message)
    mutate(a if first else b)
    paths = [write(tmp_path / "a.pt", a), write(tmp_path / "b.pt", b)]
    out = tmp_path / "avg.pt"
    with pytest.raises(MtkitError, match=message) as err:
        average_checkpoints(paths, out)
    assert "\n" not in str(err.value) and "a.pt" in str(err.value) and "b.pt" in str(err.value)
    assert not out.exists()


def test_cli_average(ckpt_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "avg.pt"
    res = runner.invoke(main, ["average", str(ckpt_dir), "--last", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(out)["metrics"]["averaged_updates"] == [400, 1000]

    files = [str(ckpt_dir / "checkpoint_50.pt"), str(ckpt_dir / "checkpoint_100.pt")]
    res = runner.invoke(main, ["average", *files, "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(out)["metrics"]["averaged_updates"] == [50, 100]

    res = runner.invoke(main, ["average", str(ckpt_dir), "--best", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(out)["metrics"]["averaged_updates"] == [100, 400]

    for args in (
        ["average", str(ckpt_dir), "-o", str(out)],
        ["average", str(ckpt_dir), str(ckpt_dir), "--last", "2", "-o", str(out)],
        ["average", str(tmp_path / "missing"), "--last", "2", "-o", str(out)],
        ["average", str(ckpt_dir / "checkpoint_50.pt"), str(tmp_path / "missing.pt"), "-o", str(out)],
    ):
        res = runner.invoke(main, args)
        assert res.exit_code == 1, (args, res.output)
        assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr


def test_averaged_transformer_loads_and_translates(tmp_path):
    """End to end: average tiny random Transformers, load the result, get logits, translate."""
    pytest.importorskip("mtkit.models.transformer")
    translate = pytest.importorskip("mtkit.decoding.translate")
    from mtkit.checkpoint import load_model
    from mtkit.config import load_config
    from mtkit.data.subword import train_sentencepiece
    from mtkit.models import build_model

    torch.set_num_threads(1)
    try:
        cfg = load_config("transformer_tiny")
    except MtkitError:
        pytest.skip("preset transformer_tiny not available")
    lines = [f"ein {w} sieht {v} an ." for w in ("Hund", "Mann", "Kind", "Vogel") for v in ("den Ball", "die Katze", "das Haus")]
    spm = train_sentencepiece(lines * 4, vocab_size=40, num_threads=1)
    paths, states = [], []
    for i in range(3):
        torch.manual_seed(i)
        model = build_model(cfg.model, spm.size, spm.size, spm.pad)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        payload = build_payload(cfg.to_dict(), model.state_dict(), **subword_entries(spm, spm), update=100 * (i + 1),
                                metrics={"loss": 5.0 - i, "bleu": None})
        paths.append(write(tmp_path / f"checkpoint_{100 * (i + 1)}.pt", payload))

    out = tmp_path / "avg.pt"
    average_checkpoints(select_checkpoints(tmp_path, best=3), out)
    model, cfg2, src_spm, _ = load_model(out)
    name, value = next((k, v) for k, v in model.state_dict().items() if v.is_floating_point() and v.dim() == 2)
    torch.testing.assert_close(value, torch.stack([s[name] for s in states]).mean(0), atol=1e-6, rtol=0)

    src = torch.tensor([src_spm.encode(["ein Hund sieht den Ball an ."])[0] + [src_spm.eos]])
    tgt_in = torch.tensor([[src_spm.bos] + src_spm.encode(["ein Kind"])[0]])
    with torch.no_grad():
        logits = model(src, torch.tensor([src.shape[1]]), tgt_in)
    assert logits.shape == (1, tgt_in.shape[1], spm.size) and torch.isfinite(logits).all()

    inp, outp = tmp_path / "in.txt", tmp_path / "out.txt"
    inp.write_text("ein Hund sieht den Ball an .\nein Vogel sieht das Haus an .\n", encoding="utf-8")
    translate.translate_file([out], inp, outp, device="cpu")
    assert len(outp.read_text(encoding="utf-8").splitlines()) == 2

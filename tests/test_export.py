"""`mtkit export --format ctranslate2` and the CTranslate2 engine: the exported model is the same model."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner

ct2 = pytest.importorskip("ctranslate2")

from mtkit.checkpoint import build_payload, load_model, save_checkpoint, subword_entries  # noqa: E402
from mtkit.cli import main  # noqa: E402
from mtkit.config import load_config  # noqa: E402
from mtkit.ct2_dir import META, SRC_SPM, TGT_SPM  # noqa: E402
from mtkit.data.batching import collate_source, collate_target  # noqa: E402
from mtkit.data.subword import train_sentencepiece  # noqa: E402
from mtkit.decoding.ct2_engine import CT2Engine, translate_lines_ct2  # noqa: E402
from mtkit.decoding.search import generate  # noqa: E402
from mtkit.errors import MtkitError  # noqa: E402
from mtkit.export import export_ctranslate2  # noqa: E402
from mtkit.models import build_model  # noqa: E402

torch.set_num_threads(1)
WORDS = "a man woman dog is are riding walking on the in bike street park red blue small big".split()
WORTE = "ein mann frau hund ist sind reitet geht auf der im fahrrad strasse park rot blau klein gross".split()


def sentences(n: int, seed: int, words: list[str] = WORDS) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) for _ in range(n)]


def save(path, model, cfg, src_spm, tgt_spm) -> None:
    save_checkpoint(path, build_payload(cfg.to_dict(), model.state_dict(), **subword_entries(src_spm, tgt_spm)))


def make_checkpoint(path, src_spm, tgt_spm=None, overrides=(), preset="transformer_tiny", train_steps=0):
    """A tiny model from a preset; ``train_steps`` of Adam on a reversal task teach it to stop (EOS)."""
    tgt_spm = tgt_spm or src_spm
    cfg = load_config(preset, list(overrides))
    torch.manual_seed(0)
    model = build_model(cfg.model, src_spm.size, tgt_spm.size, tgt_spm.pad)
    if train_steps:
        ids = src_spm.encode(sentences(200, 3))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        rng = random.Random(0)
        model.train()
        for _ in range(train_steps):
            seqs = rng.sample(ids, 16)
            src, src_len = collate_source(seqs, src_spm.pad, src_spm.eos)
            tgt_in, tgt_out = collate_target([s[::-1] for s in seqs], tgt_spm.pad, tgt_spm.bos, tgt_spm.eos)
            logits = model(src, src_len, tgt_in)
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt_out, ignore_index=tgt_spm.pad)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
    save(path, model, cfg, src_spm, tgt_spm)
    return path


def teacher_forced(model, src_spm, tgt_spm, src_ids, tgt_ids) -> list[np.ndarray]:
    """mtkit's log-prob of every target token incl. EOS, per sentence."""
    src, src_len = collate_source(src_ids, src_spm.pad, src_spm.eos)
    tgt_in, tgt_out = collate_target(tgt_ids, tgt_spm.pad, tgt_spm.bos, tgt_spm.eos)
    with torch.no_grad():
        lp = torch.log_softmax(model(src, src_len, tgt_in).float(), -1).gather(2, tgt_out.unsqueeze(2)).squeeze(2)
    return [lp[i, : len(t) + 1].numpy() for i, t in enumerate(tgt_ids)]


def ct2_scores(translator, src_spm, tgt_spm, src_ids, tgt_ids) -> list[np.ndarray]:
    res = translator.score_batch([src_spm.id_to_piece(s) for s in src_ids], [tgt_spm.id_to_piece(t) for t in tgt_ids])
    return [np.asarray(r.log_probs, dtype=np.float64) for r in res]


@pytest.fixture(scope="module")
def spm():
    return train_sentencepiece(sentences(300, 1) + [w.capitalize() + "." for w in WORDS], vocab_size=60)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, spm):
    """(checkpoint, float32 export dir) of a briefly trained tiny Transformer."""
    root = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(root / "model.pt", spm, train_steps=60)
    export_ctranslate2(ckpt, root / "ct2")
    return ckpt, root / "ct2"


@pytest.fixture(scope="module")
def inputs(spm):
    return spm.encode(sentences(12, 7))


# ---------------------------------------------------------------------------------------------
def test_export_directory_is_self_contained(trained, spm):
    ckpt, out = trained
    for name in ("model.bin", "config.json", SRC_SPM, TGT_SPM, META):
        assert (out / name).is_file(), name
    assert (out / SRC_SPM).read_bytes() == spm.model_bytes
    config = json.loads((out / "config.json").read_text())
    # CTranslate2 starts decoding from <s>, stops at </s> and appends </s> to the source: mtkit's ids 2/3
    pieces = spm.id_to_piece([spm.pad, spm.unk, spm.bos, spm.eos])
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == (pieces[2], pieces[3], pieces[1])
    assert config["decoder_start_token"] == pieces[2] and config["add_source_eos"] is True
    vocab_file = next(out.glob("*vocabulary*"))
    tokens = json.loads(vocab_file.read_text()) if vocab_file.suffix == ".json" else vocab_file.read_text().split("\n")
    assert tokens[: spm.size] == spm.id_to_piece(range(spm.size))  # sentencepiece id order, pad at 0
    meta = json.loads((out / META).read_text())
    assert meta["quantization"] == "float32" and meta["decode"]["beam"] == 2


@pytest.mark.parametrize("a,b", [(0.0, 15), (0.5, 1)], ids=["fixed-limit", "per-sentence-limit"])
def test_greedy_output_equals_mtkit(trained, spm, inputs, a, b):
    ckpt, out = trained
    model, cfg, _, _ = load_model(ckpt)
    dc = dataclasses.replace(cfg.decode, beam=1, max_len_a=a, max_len_b=b)
    src, src_len = collate_source(inputs, spm.pad, spm.eos)
    ours = [h[0].tokens for h in generate([model], src, src_len, dc, spm.bos, spm.eos)]
    engine = CT2Engine.load(out, intra_threads=1)
    theirs = [h[0].tokens for h in engine.decode_ids(inputs, dc)]
    assert theirs == ours
    limits = [int(a * (len(s) + 1) + b) for s in inputs]
    if a == 0.0:
        assert any(len(t) < n for t, n in zip(ours, limits))  # some end in EOS: the EOS mapping is exercised
    else:
        assert any(len(t) == n for t, n in zip(ours, limits))  # some stop at their own length limit
        assert len(set(limits)) > 1


def test_greedy_attention_equals_mtkit(trained, spm, inputs):
    ckpt, out = trained
    model, cfg, _, _ = load_model(ckpt)
    dc = dataclasses.replace(cfg.decode, beam=1, max_len_a=0.0, max_len_b=15)
    src, src_len = collate_source(inputs, spm.pad, spm.eos)
    ours = generate([model], src, src_len, dc, spm.bos, spm.eos, attention=True)
    theirs = CT2Engine.load(out, intra_threads=1).decode_ids(inputs, dc, attention=True)
    for a, b, s in zip(ours, theirs, inputs):
        if len(a[0].tokens) < 15:  # one row per target piece plus EOS, one column per source piece plus EOS
            assert b[0].attn.shape == a[0].attn.shape == (len(a[0].tokens) + 1, len(s) + 1)
            torch.testing.assert_close(b[0].attn, a[0].attn, atol=1e-4, rtol=0)


def test_beam_output_equals_mtkit_with_average_length_penalty(trained, spm, inputs):
    ckpt, out = trained
    model, cfg, _, _ = load_model(ckpt)
    dc = dataclasses.replace(cfg.decode, beam=4, nbest=2, length_penalty="average", max_len_a=0.0, max_len_b=20)
    src, src_len = collate_source(inputs, spm.pad, spm.eos)
    ours = generate([model], src, src_len, dc, spm.bos, spm.eos)
    theirs = CT2Engine.load(out, intra_threads=1).decode_ids(inputs, dc)
    compared = 0
    for a, b in zip(ours, theirs):
        assert len(b) == 2
        # at the length limit mtkit forces EOS while CTranslate2 stops without it (and scores the
        # hypothesis without EOS), so only searches that end below the limit on both sides are alike
        # and a near-tie (the engines' scores differ by ~1e-2 in float32) may go either way
        if len(a[0].tokens) < 20 and len(b[0].tokens) < 20 and a[0].score - a[1].score > 0.02:
            compared += 1
            assert b[0].tokens == a[0].tokens
            assert b[0].score == pytest.approx(a[0].score, abs=0.05)  # |Y| incl. EOS on both sides
    assert compared >= len(inputs) // 3


def test_scores_equal_teacher_forced_log_probs(trained, spm, inputs):
    ckpt, out = trained
    model, *_ = load_model(ckpt)
    targets = spm.encode(sentences(len(inputs), 9))
    ours = teacher_forced(model, spm, spm, inputs, targets)
    theirs = ct2_scores(ct2.Translator(str(out), intra_threads=1), spm, spm, inputs, targets)
    for a, b in zip(ours, theirs):
        assert b.shape == a.shape  # one log-prob per target token plus EOS
        np.testing.assert_allclose(b, a, atol=1e-4)


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.positions=learned",),
        ("model.positions=rope",),
        ("model.pre_norm=false", "model.activation=gelu"),
        ("model.activation=silu", "model.tie_embeddings=false", "model.decoder_layers=3"),
    ],
    ids=["learned", "rope", "postnorm-gelu", "silu-untied"],
)
def test_variants_score_identically(tmp_path, spm, inputs, overrides):
    ckpt = make_checkpoint(tmp_path / "m.pt", spm, overrides=overrides)
    export_ctranslate2(ckpt, tmp_path / "ct2")
    model, *_ = load_model(ckpt)
    targets = spm.encode(sentences(6, 11))
    ours = teacher_forced(model, spm, spm, inputs[:6], targets)
    theirs = ct2_scores(ct2.Translator(str(tmp_path / "ct2"), intra_threads=1), spm, spm, inputs[:6], targets)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(b, a, atol=1e-4)


def test_separate_vocabularies(tmp_path, spm, inputs):
    tgt_spm = train_sentencepiece(sentences(300, 5, WORTE), vocab_size=50)
    ckpt = make_checkpoint(tmp_path / "m.pt", spm, tgt_spm)
    export_ctranslate2(ckpt, tmp_path / "ct2")
    assert (tmp_path / "ct2" / TGT_SPM).read_bytes() == tgt_spm.model_bytes
    model, *_ = load_model(ckpt)
    targets = tgt_spm.encode(sentences(6, 12, WORTE))
    ours = teacher_forced(model, spm, tgt_spm, inputs[:6], targets)
    theirs = ct2_scores(ct2.Translator(str(tmp_path / "ct2"), intra_threads=1), spm, tgt_spm, inputs[:6], targets)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(b, a, atol=1e-4)


def test_int8_export_loads_and_translates(tmp_path, trained, spm, inputs):
    ckpt, out32 = trained
    meta = export_ctranslate2(ckpt, tmp_path / "int8", quantization="int8")
    assert meta["quantization"] == "int8"
    assert (tmp_path / "int8" / "model.bin").stat().st_size < (out32 / "model.bin").stat().st_size
    lines = sentences(5, 13)
    lines.insert(2, "")
    got = translate_lines_ct2(tmp_path / "int8", lines, beam=2, max_batch_size=2, intra_threads=1)
    assert len(got) == len(lines) and got[2] == ""
    assert all(got[i] for i, line in enumerate(lines) if line)
    # still the same model: teacher-forced log-probs close to float32
    model, *_ = load_model(ckpt)
    targets = spm.encode(sentences(len(inputs), 9))
    ours = teacher_forced(model, spm, spm, inputs, targets)
    theirs = ct2_scores(ct2.Translator(str(tmp_path / "int8"), intra_threads=1), spm, spm, inputs, targets)
    # int8 kernels differ by CPU (VNNI or not): bound the error relative to the log-probs' size
    err = max(np.abs(a - b).mean() for a, b in zip(ours, theirs))
    scale = np.mean([np.abs(a).mean() for a in ours])
    assert err < 0.1 * scale, (err, scale)


def test_translate_lines_matches_engine_defaults(trained, spm):
    _, out = trained
    lines = sentences(7, 17)
    engine = CT2Engine.load(out, intra_threads=1)
    assert engine.cfg.beam == 2  # the checkpoint's decode section travels with the export
    one_by_one = [translate_lines_ct2(engine, [ln])[0] for ln in lines]
    assert translate_lines_ct2(engine, ["   "] + lines, max_batch_size=3) == [""] + one_by_one


# ---------------------------------------------------------------------------------------------
def test_non_transformer_is_refused(tmp_path, spm):
    ckpt = make_checkpoint(tmp_path / "lstm.pt", spm, preset="lstm_tiny")
    with pytest.raises(MtkitError, match="model.arch 'lstm'"):
        export_ctranslate2(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_alibi_is_refused(tmp_path, spm):
    ckpt = make_checkpoint(tmp_path / "alibi.pt", spm, overrides=("model.positions=alibi",))
    with pytest.raises(MtkitError, match="alibi"):
        export_ctranslate2(ckpt, tmp_path / "out")


def test_output_directory_and_quantization_checks(tmp_path, trained):
    ckpt, _ = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(MtkitError, match="not empty"):
        export_ctranslate2(ckpt, out)
    with pytest.raises(MtkitError, match="unknown quantization 'int3'"):
        export_ctranslate2(ckpt, out, quantization="int3", force=True)
    assert (out / "keep.txt").exists()  # a failed export leaves the old directory alone
    export_ctranslate2(ckpt, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.bin").is_file()


def test_engine_rejects_a_checkpoint_file(trained):
    ckpt, _ = trained
    with pytest.raises(MtkitError, match="export directory"):
        CT2Engine.load(ckpt)


def test_cli_export(tmp_path, trained, spm):
    ckpt, _ = trained
    runner = CliRunner()
    res = runner.invoke(main, ["export", "--format", "ctranslate2", "-m", str(ckpt), "-o", str(tmp_path / "c"),
                               "--quantization", "int8"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["quantization"] == "int8"
    lstm = make_checkpoint(tmp_path / "lstm.pt", spm, preset="lstm_tiny")
    res = runner.invoke(main, ["export", "-m", str(lstm), "-o", str(tmp_path / "d")])
    assert res.exit_code == 1 and "error: " in res.stderr and "lstm" in res.stderr
    res = runner.invoke(main, ["export", "-m", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "e")])
    assert res.exit_code == 1 and "checkpoint not found" in res.stderr


def test_translate_file_with_ctranslate2_engine_equals_torch(tmp_path, trained):
    from mtkit.decoding.translate import translate_file

    ckpt, out = trained
    lines = sentences(10, 11) + [""]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    dc = dataclasses.replace(load_model(ckpt)[1].decode, beam=1, max_len_a=0.0, max_len_b=12)
    translate_file([ckpt], src, tmp_path / "torch.txt", decode_cfg=dc, device="cpu")
    translate_file([out], src, tmp_path / "ct2.txt", decode_cfg=dc, device="cpu", engine="ctranslate2")
    ours = (tmp_path / "torch.txt").read_text(encoding="utf-8").split("\n")
    theirs = (tmp_path / "ct2.txt").read_text(encoding="utf-8").split("\n")
    assert len(theirs) == len(lines) + 1 and theirs[-2] == ""  # empty line kept, order kept
    assert theirs == ours

"""`translate_file` / `mtkit translate`: order, empty lines, formats, resume, OOM splits, bad input."""

from __future__ import annotations

import json
import math
import os
import random
import time

import pytest
import torch
from click.testing import CliRunner

from mtkit.checkpoint import build_payload, load_model, save_checkpoint, subword_entries
from mtkit.cli import main
from mtkit.config import load_config
from mtkit.data.batching import collate_source, length_sorted_batches
from mtkit.data.subword import train_sentencepiece
from mtkit.decoding import output, search, translate
from mtkit.decoding.output import prepare_resume
from mtkit.decoding.translate import translate_file
from mtkit.errors import MtkitError
from mtkit.models import build_model

torch.set_num_threads(1)
WORDS = "a man woman dog is are riding walking on the in bike street park red blue small big".split()


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(n)]


def make_checkpoint(path, spm, seed: int = 0, decode: dict | None = None) -> None:
    cfg = load_config("transformer_tiny", [f"decode.{k}={v}" for k, v in (decode or {}).items()])
    torch.manual_seed(seed)
    model = build_model(cfg.model, spm.size, spm.size, spm.pad)
    save_checkpoint(path, build_payload(cfg.to_dict(), model.state_dict(), **subword_entries(spm, spm)))


@pytest.fixture(scope="module")
def spm():
    return train_sentencepiece(sentences(300, 1) + [w.capitalize() + "." for w in WORDS], vocab_size=60)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, spm):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    make_checkpoint(path, spm, decode={"beam": 3, "max_len_a": 1.0, "max_len_b": 4})
    return path


@pytest.fixture()
def src_file(tmp_path):
    lines = sentences(23, 2)
    lines[3] = ""
    lines[10] = "   "
    lines[15] = lines[4]  # the same sentence at two places
    lines.append("")
    path = tmp_path / "in.en"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, lines


def read_lines(path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def test_line_count_order_and_empty_lines(ckpt, src_file, tmp_path):
    path, lines = src_file
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    stats = translate_file([ckpt], path, out1, max_tokens=40, buffer_lines=7)
    translate_file([ckpt], path, out2, batch_size=1)
    got = read_lines(out1)
    assert len(got) == len(lines) and stats["lines"] == len(lines)
    assert got == read_lines(out2)  # order survives length sorting, buffers and batch shapes
    assert got[3] == "" and got[10] == "" and got[-1] == ""
    assert got[15] == got[4]
    assert all(got[i] for i, line in enumerate(lines) if line.strip())
    assert stats["translated"] == sum(1 for line in lines if line.strip())


def test_length_sorted_batches_respect_limits():
    lengths = [5, 1, 9, 3, 3, 7, 2]
    for batches in (length_sorted_batches(lengths, 0, 20), length_sorted_batches(lengths, 2, 0)):
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in length_sorted_batches(lengths, 0, 20):
        assert len(b) == 1 or len(b) * (max(lengths[i] for i in b) + 1) <= 20
    assert all(len(b) <= 2 for b in length_sorted_batches(lengths, 2, 0))


def rescore(model, src_ids, tokens, eos, bos, pad) -> float:
    src = torch.tensor([src_ids + [eos]])
    tgt_in, tgt_out = torch.tensor([[bos] + tokens]), torch.tensor([tokens + [eos]])
    with torch.no_grad():
        lp = model(src, torch.tensor([src.size(1)]), tgt_in).log_softmax(-1)
    return float(lp.gather(2, tgt_out.unsqueeze(2)).sum())


def test_jsonl_scores_equal_rescoring_and_nbest_sorted(ckpt, spm, src_file, tmp_path):
    path, lines = src_file
    out = tmp_path / "o.jsonl"
    translate_file([ckpt], path, out, output_format="jsonl", output_units="ids", decode_overrides={"nbest": 3},
                   alignment="full")
    model, cfg, src_spm, _ = load_model(ckpt)
    objs = [json.loads(line) for line in read_lines(out)]
    assert [o["line"] for o in objs] == list(range(len(lines)))
    for o, line in zip(objs, lines):
        if not line.strip():
            assert o["hypothesis"] == "" and o["tokens"] == []
            continue
        src_ids = src_spm.encode([line])[0]
        assert len(o["nbest"]) == 3
        scores = [h["score"] for h in o["nbest"]]
        assert scores == sorted(scores, reverse=True)
        for h in o["nbest"]:
            ids = [int(x) for x in h["hypothesis"].split()]
            assert h["tokens"] == spm.id_to_piece(ids)
            assert h["log_prob"] == pytest.approx(rescore(model, src_ids, ids, spm.eos, spm.bos, spm.pad), abs=1e-3)
            lp = ((5 + len(ids) + 1) / 6) ** cfg.decode.alpha
            assert h["score"] == pytest.approx(h["log_prob"] / lp, abs=1e-3)
            assert len(h["alignment"]) == len(ids)
            assert all(0 <= a <= len(src_ids) for a in h["alignment"])
            assert len(h["attention"]) == len(ids) + 1 and len(h["attention"][0]) == len(src_ids) + 1


def test_nbest_format(ckpt, src_file, tmp_path):
    path, lines = src_file
    out = tmp_path / "o.nbest"
    translate_file([ckpt], path, out, output_format="nbest", decode_overrides={"nbest": 2})
    rows = [line.split(" ||| ") for line in read_lines(out)]
    assert all(len(r) == 4 and r[2].startswith("F0= ") for r in rows)
    idx = [int(r[0]) for r in rows]
    assert sorted(set(idx)) == list(range(len(lines))) and idx == sorted(idx)
    for i in range(len(lines)):
        group = [r for r in rows if int(r[0]) == i]
        assert len(group) == (2 if lines[i].strip() else 1)
        scores = [float(r[3]) for r in group]
        assert scores == sorted(scores, reverse=True)
        assert all(float(r[2].split()[1]) <= 0 for r in group)


@pytest.mark.parametrize("fmt,cut", [("text", 9), ("text", 0), ("nbest", 7), ("jsonl", 5)])
def test_resume_gives_the_uninterrupted_file(ckpt, src_file, tmp_path, fmt, cut):
    path, _ = src_file
    full, part = tmp_path / "full", tmp_path / "part"
    opts = {"decode_overrides": {"nbest": 2}} if fmt == "nbest" else {}
    translate_file([ckpt], path, full, output_format=fmt, **opts)
    data = full.read_bytes()
    lines = data.split(b"\n")
    part.write_bytes(b"\n".join(lines[:cut]) + (b"\n" if cut else b"") + lines[cut][: len(lines[cut]) // 2])
    stats = translate_file([ckpt], path, part, output_format=fmt, resume=True, **opts)
    assert part.read_bytes() == data
    assert stats["skipped"] > 0 or cut == 0
    # resuming a finished file changes nothing (n-best redoes its last sentence's group)
    stats = translate_file([ckpt], path, part, output_format=fmt, resume=True, **opts)
    assert part.read_bytes() == data and stats["lines"] == (1 if fmt == "nbest" else 0)


def test_resume_with_longer_output_than_input_is_an_error(ckpt, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.write_text("a man\n")
    out.write_text("x\ny\nz\n")
    with pytest.raises(MtkitError, match="resume"):
        translate_file([ckpt], src, out, resume=True)
    assert prepare_resume(tmp_path / "missing", "text") == 0


def test_oom_batches_are_split(ckpt, src_file, tmp_path, monkeypatch):
    path, _ = src_file
    ref, out = tmp_path / "ref", tmp_path / "out"
    translate_file([ckpt], path, ref, batch_size=8)
    real = search.generate

    def flaky(models, src, *args, **kwargs):
        if src.size(0) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(models, src, *args, **kwargs)

    monkeypatch.setattr(translate.search, "generate", flaky)
    stats = translate_file([ckpt], path, out, batch_size=8)
    assert out.read_bytes() == ref.read_bytes()
    assert stats["oom_splits"] > 0

    def always(models, src, *args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(translate.search, "generate", always)
    with pytest.raises(MtkitError, match="out of memory"):
        translate_file([ckpt], path, out, batch_size=8)


def test_input_formats_agree(ckpt, spm, tmp_path):
    lines = sentences(6, 5)
    text, pieces, ids = tmp_path / "t", tmp_path / "p", tmp_path / "i"
    text.write_text("\n".join(lines) + "\n")
    pieces.write_text("\n".join(" ".join(p) for p in spm.encode_pieces(lines)) + "\n")
    ids.write_text("\n".join(" ".join(map(str, s)) for s in spm.encode(lines)) + "\n")
    outs = []
    for fmt, path in (("text", text), ("pieces", pieces), ("ids", ids)):
        out = tmp_path / f"o.{fmt}"
        translate_file([ckpt], path, out, input_format=fmt, output_units="pieces")
        outs.append(out.read_text())
    assert outs[0] == outs[1] == outs[2]
    bad = tmp_path / "bad"
    bad.write_text("4 5\n7 x\n")
    with pytest.raises(MtkitError, match="line 2"):
        translate_file([ckpt], bad, tmp_path / "o", input_format="ids")
    bad.write_text("4 100000\n")
    with pytest.raises(MtkitError, match="line 1"):
        translate_file([ckpt], bad, tmp_path / "o", input_format="ids")


def test_bad_inputs(ckpt, spm, tmp_path, caplog):
    src, out = tmp_path / "in", tmp_path / "out"
    src.write_bytes(b"a man\nthe dog\nbad \xff byte\n")
    with pytest.raises(MtkitError, match="line 3"):
        translate_file([ckpt], src, out)
    translate_file([ckpt], src, out, errors="replace")
    assert len(read_lines(out)) == 3
    src.write_text("a man\n")
    not_ckpt = tmp_path / "x.pt"
    not_ckpt.write_bytes(b"hello")
    with pytest.raises(MtkitError, match="not an mtkit checkpoint"):
        translate_file([not_ckpt], src, out)
    for kw in ({"batch_size": 0}, {"max_tokens": -1}, {"decode_overrides": {"beam": 0}},
               {"input_format": "xml"}, {"no_such_option": 1}):
        with pytest.raises(MtkitError):
            translate_file([ckpt], src, out, **kw)
    # a line far beyond the model limit is truncated with a warning, not a crash
    src.write_text("a man\n" + " ".join(["street"] * 400) + "\nthe dog\n")
    with caplog.at_level("WARNING", logger="mtkit.translate"):
        stats = translate_file([ckpt], src, out)
    assert stats["truncated"] == 1 and len(read_lines(out)) == 3
    assert any("line 2" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)


def test_ensembles(ckpt, spm, tmp_path):
    src, out1, out2 = tmp_path / "in", tmp_path / "o1", tmp_path / "o2"
    src.write_text("\n".join(sentences(5, 9)) + "\n")
    translate_file([ckpt], src, out1)
    translate_file([ckpt, ckpt], src, out2)
    assert out1.read_text() == out2.read_text()
    other_spm = train_sentencepiece(sentences(300, 3), vocab_size=50)
    other = tmp_path / "other.pt"
    make_checkpoint(other, other_spm)
    with pytest.raises(MtkitError, match="different vocabularies"):
        translate_file([ckpt, other], src, out1)


def test_sampling_is_seeded(ckpt, tmp_path):
    src = tmp_path / "in"
    src.write_text("\n".join(sentences(5, 4)) + "\n")
    outs = []
    for i, seed in enumerate((1, 1)):
        out = tmp_path / f"o{i}"
        translate_file([ckpt], src, out, sampling=True, seed=seed, topk=5, output_format="nbest",
                       decode_overrides={"nbest": 2})
        outs.append(out.read_text())
    assert outs[0] == outs[1]
    assert {int(r.split(" ||| ")[0]) for r in outs[0].splitlines()} == set(range(5))


def test_plot_attention(ckpt, tmp_path):
    pytest.importorskip("matplotlib")
    src = tmp_path / "in"
    src.write_text("a man\n\nthe dog is red\n")
    translate_file([ckpt], src, tmp_path / "o", plot_attention=str(tmp_path / "plots"))
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["000000.png", "000002.png"]


def test_attention_plots_say_what_they_draw(ckpt, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    titles = []
    real = output.plot_attention
    monkeypatch.setattr(output, "plot_attention", lambda *a, **k: titles.append(k["title"]) or real(*a, **k))
    src = tmp_path / "in"
    src.write_text("a man\n")
    translate_file([ckpt, ckpt], src, tmp_path / "o", plot_attention=str(tmp_path / "plots"))
    assert titles == ["line 1: cross-attention of decoder layer 2 (the last), mean of 4 heads, mean over 2 models"]
    fig = figures[0]
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "attention weight"  # the colour bar
    assert fig.axes[0].get_title() == titles[0]


def test_cli_stdin_to_stdout(ckpt, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["-q", "translate", "-m", str(ckpt)], input="A man is riding a bike.\n")
    assert res.exit_code == 0, res.output
    assert len(res.stdout.splitlines()) == 1 and res.stdout.strip()
    res = runner.invoke(main, ["-q", "translate", "-m", str(ckpt), "--beam", "1", "--output-format", "jsonl"],
                        input="a man\n\nthe dog\n")
    objs = [json.loads(x) for x in res.stdout.splitlines()]
    assert res.exit_code == 0 and len(objs) == 3 and all(math.isfinite(o["score"]) for o in objs)
    for args in (["--beam", "0"], ["--batch-size", "0"], ["-m", str(tmp_path / "missing.pt")]):
        res = runner.invoke(main, ["translate", "-m", str(ckpt), *args], input="a man\n")
        assert res.exit_code == 1 and res.stderr.startswith("error: ") and len(res.stderr.splitlines()) == 1
    res = runner.invoke(main, ["translate", "-m", str(ckpt), "--resume"], input="a man\n")
    assert res.exit_code == 1 and "--resume needs an output file" in res.stderr


@pytest.mark.parametrize("preset", ["transformer_tiny", "lstm_tiny", "bahdanau_tiny", "luong_local_p_tiny", "gnmt_tiny"])
def test_bfloat16_decoding_tracks_float32(preset, spm, tmp_path):
    cfg = load_config(preset, ["decode.beam=3", "decode.max_len_a=1.0", "decode.max_len_b=4"])
    torch.manual_seed(0)
    model = build_model(cfg.model, spm.size, spm.size, spm.pad)
    path = tmp_path / "model.pt"
    save_checkpoint(path, build_payload(cfg.to_dict(), model.state_dict(), **subword_entries(spm, spm)))
    cpu = torch.device("cpu")
    full, half = (translate.Translator.load([path], cpu, dtype) for dtype in ("float32", "bfloat16"))
    assert all(p.dtype == torch.bfloat16 for p in half.models[0].parameters())
    seqs = spm.encode(sentences(6, 5))
    src, src_len = collate_source(seqs, spm.pad, spm.eos, None)
    out = search.generate(half.models, src, src_len, half.cfg, spm.bos, spm.eos)
    for ids, nbest in zip(seqs, out):
        hyp = nbest[0]
        assert math.isfinite(hyp.score) and all(0 <= t < spm.size for t in hyp.tokens)
        # the bf16 model scores its hypothesis within bf16 rounding of the float32 model
        exact = rescore(full.models[0], ids, hyp.tokens, spm.eos, spm.bos, spm.pad)
        rounded = rescore(half.models[0], ids, hyp.tokens, spm.eos, spm.bos, spm.pad)
        assert abs(rounded - exact) <= 0.05 * (len(hyp.tokens) + 1), (rounded, exact)


def test_dtype_option(ckpt, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["-q", "translate", "-m", str(ckpt), "--dtype", "bfloat16"], input="a man\n\nthe dog\n")
    assert res.exit_code == 0 and len(res.stdout.splitlines()) == 3
    res = runner.invoke(main, ["translate", "-m", str(ckpt), "--dtype", "float16", "--device", "cpu"], input="a man\n")
    assert res.exit_code == 1 and "float16 needs a CUDA device" in res.stderr
    with pytest.raises(MtkitError, match="unknown dtype"):
        translate_file([ckpt], tmp_path / "missing", tmp_path / "o", dtype="int4")


def test_piped_input_is_answered_line_by_line_when_it_pauses(ckpt, tmp_path):
    """A line followed by a pause is translated and written before the next line arrives; lines
    that flow are batched as before; the output keeps input order, one line per input line."""
    import subprocess
    import sys
    import threading

    proc = subprocess.Popen(
        [sys.executable, "-m", "mtkit", "-q", "translate", "-m", str(ckpt), "--device", "cpu"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    answers: list[str] = []
    first = threading.Event()

    def collect():
        for raw in proc.stdout:
            answers.append(raw.decode().rstrip("\n"))
            first.set()

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    try:
        proc.stdin.write(b"a man is riding a bike\n")
        proc.stdin.flush()
        assert first.wait(timeout=30), "no answer to the first line while the input paused"
        assert len(answers) == 1
        proc.stdin.write(b"\nthe dog\na woman walking\n")  # the rest flows, with an empty line
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    assert len(answers) == 4 and answers[1] == "" and all(answers[i] for i in (0, 2, 3))
    alone = tmp_path / "in.en"
    alone.write_text("a man is riding a bike\n\nthe dog\na woman walking\n")
    translate_file([ckpt], alone, tmp_path / "out.de", device="cpu")
    assert read_lines(tmp_path / "out.de") == answers  # the same translations as from a file


def test_paced_reader_marks_pauses_and_forwards_errors():
    from mtkit.decoding.inputs import paced

    def slow():
        yield "a"
        yield "b"
        time.sleep(0.3)
        yield "c"
        raise MtkitError("bad line 4")

    got = []
    with pytest.raises(MtkitError, match="bad line 4"):
        for item in paced(slow(), pause=0.1):
            got.append(item)
    assert [x for x in got if x is not None] == ["a", "b", "c"]
    assert None in got[got.index("b") : got.index("c")]  # the 0.3 s gap

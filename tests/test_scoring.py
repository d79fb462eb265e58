"""mtkit score against sacrebleu's own command line on real Multi30k lines."""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mtkit.cli import main
from mtkit.errors import MtkitError
from mtkit.scoring import format_results, score_files
from mtkit.scoring_metrics import parse_metrics

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"  # shared/ beside the repo
N_LINES = 300

pytestmark = pytest.mark.skipif(not (DATA / "val.de.gz").exists(), reason="shared Multi30k data not available")


def _perturb(lines: list[str], seed: int) -> list[str]:
    """A plausible 'system output': dropped/swapped words, case changes, tokenized periods."""
    rng = random.Random(seed)
    out = []
    for line in lines:
        words = line.split()
        if len(words) > 3 and rng.random() < 0.3:
            del words[rng.randrange(len(words))]
        if len(words) > 3 and rng.random() < 0.3:
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        if words and rng.random() < 0.2:
            words[0] = words[0].lower()
        text = " ".join(words)
        if rng.random() < 0.2:
            text = text.rstrip(".") + " ."
        out.append(text)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("scoring")
    with gzip.open(DATA / "val.de.gz", "rt", encoding="utf-8") as f:
        de = [next(f).rstrip("\n") for _ in range(2 * N_LINES)]
    ref, ref2 = de[:N_LINES], de[N_LINES:]
    paths = {
        "ref": ref,
        "ref2": ref2,  # a second (unrelated) reference stream: exercises multi-reference code paths
        "hyp": _perturb(ref, 1),
        "sysb": _perturb(ref, 2),
        "sysc": _perturb(ref2[:1] + ref[1:], 3),
    }
    out = {}
    for name, lines in paths.items():
        p = d / f"{name}.txt"
        p.write_text("\n".join(lines) + "\n", encoding="utf-8")
        out[name] = p
    return out


def sacrebleu_cli(args: list[str], cwd: Path | None = None) -> str:
    exe = shutil.which("sacrebleu")
    cmd = ([exe] if exe else [sys.executable, "-m", "sacrebleu"]) + args
    env = {k: v for k, v in os.environ.items() if k not in ("SACREBLEU_FORMAT", "SACREBLEU_SEED")}
    env["NO_COLOR"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, check=True)
    return proc.stdout


def _as_list(text: str) -> list[dict]:
    data = json.loads(text)
    return data if isinstance(data, list) else [data]


# (mtkit options, equivalent sacrebleu CLI options)
CASES = {
    "bleu-default": (dict(metrics=["bleu"]), ["-m", "bleu"]),
    "bleu-13a": (dict(metrics=["bleu"], tokenize="13a"), ["-m", "bleu", "--tokenize", "13a"]),
    "bleu-intl": (dict(metrics=["bleu"], tokenize="intl"), ["-m", "bleu", "--tokenize", "intl"]),
    "bleu-char": (dict(metrics=["bleu"], tokenize="char"), ["-m", "bleu", "--tokenize", "char"]),
    "bleu-none": (dict(metrics=["bleu"], tokenize="none", force=True), ["-m", "bleu", "--tokenize", "none", "--force"]),
    "bleu-lc-w2": (dict(metrics=["bleu"], lowercase=True, width=2), ["-m", "bleu", "-lc", "-w", "2"]),
    "chrf": (dict(metrics=["chrf"]), ["-m", "chrf"]),
    "chrf++": (dict(metrics=["chrf++"]), ["-m", "chrf", "--chrf-word-order", "2"]),
    "chrf-lc": (dict(metrics=["chrf"], lowercase=True, width=3), ["-m", "chrf", "--chrf-lowercase", "-w", "3"]),
    "ter": (dict(metrics=["ter"]), ["-m", "ter"]),
    "ter-cs": (dict(metrics=["ter"], ter_case_sensitive=True), ["-m", "ter", "--ter-case-sensitive"]),
    "all-lc": (
        dict(metrics=["bleu", "chrf", "ter"], lowercase=True),
        ["-m", "bleu", "chrf", "ter", "-lc", "--chrf-lowercase"],
    ),
}


MULTI_REF = ("bleu-default", "bleu-char", "chrf++", "ter", "all-lc")


@pytest.mark.parametrize("case,nrefs", [(c, 1) for c in CASES] + [(c, 2) for c in MULTI_REF])
def test_corpus_scores_equal_sacrebleu_cli(files, case, nrefs):
    opts, sb_opts = CASES[case]
    refs = [files["ref"], files["ref2"]][:nrefs]
    ours = score_files(files["hyp"], refs, **opts)
    width = opts.get("width", 1)
    sb_args = [str(r) for r in refs] + ["-i", str(files["hyp"])] + sb_opts

    theirs = _as_list(sacrebleu_cli(sb_args + ["-f", "json"]))
    assert len(ours) == len(theirs) == len(opts["metrics"])
    for mine, ref in zip(ours, theirs):
        assert mine["system"] == str(files["hyp"])
        assert {k: v for k, v in mine.items() if k != "system"} == ref
        assert ref["nrefs"] == str(nrefs)

    text = sacrebleu_cli(sb_args + ["-f", "text"])
    assert format_results(ours, "text", width) + "\n" == text


def test_sentence_scores_equal_sacrebleu_cli(files):
    for metric, sb in (("bleu", ["-m", "bleu"]), ("chrf++", ["-m", "chrf", "--chrf-word-order", "2"])):
        ours = score_files(files["hyp"], [files["ref"]], metrics=[metric], sentence=True)
        assert [d["sentence"] for d in ours] == list(range(1, N_LINES + 1))
        text = sacrebleu_cli([str(files["ref"]), "-i", str(files["hyp"]), "-sl", "-f", "text"] + sb)
        assert format_results(ours, "text") + "\n" == text
    # sentence BLEU differs between lines: not one number repeated
    assert len({d["score"] for d in score_files(files["hyp"], [files["ref"]], sentence=True)}) > 10


def _table_numbers(text: str) -> list[str]:
    """Every figure in sacrebleu's fancy-grid table (row by row), as printed."""
    table = text.split("\n\n")[0]
    return re.findall(r"\d+\.\d+", table)


def _signatures(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ - (\S+)\s+(\S+)$", text, flags=re.M))


@pytest.mark.parametrize(
    "test,n,metrics",
    [("bs", 300, ["bleu", "chrf"]), ("ar", 400, ["bleu", "ter"])],
)
def test_paired_tests_equal_sacrebleu_cli(files, test, n, metrics):
    systems = [files["hyp"], files["sysb"], files["sysc"]]
    ours = score_files(None, [files["ref"]], metrics=metrics, systems=systems, paired=test, paired_n=n)
    flag = ["--paired-bs", "--paired-bs-n", str(n)] if test == "bs" else ["--paired-ar", "--paired-ar-n", str(n)]
    text = sacrebleu_cli(
        [str(files["ref"]), "-i", *map(str, systems), "-m", *metrics, "-f", "text", *flag], cwd=files["ref"].parent
    )
    # expected figures, laid out the way sacrebleu's table prints them
    expected: list[str] = []
    by_sys: dict[str, list[dict]] = {}
    for d in ours:
        by_sys.setdefault(d["system"], []).append(d)
    assert [d["baseline"] for d in ours].count(True) == len(metrics)
    for i, path in enumerate(systems):
        rows = by_sys[str(path)]
        assert rows[0]["baseline"] is (i == 0)
        for d in rows:
            expected.append(f"{d['score']:.1f}")
            if test == "bs":
                expected += [f"{d['mean']:.1f}", f"{d['ci']:.1f}"]
        if i > 0:
            expected += [f"{d['p_value']:.4f}" for d in rows]
            assert all(0 < d["p_value"] <= 1 for d in rows)
        else:
            assert all(d["p_value"] is None for d in rows)
    assert len(expected) == len(systems) * len(metrics) * (3 if test == "bs" else 1) + 2 * len(metrics)
    assert _table_numbers(text) == expected
    sigs = _signatures(text)
    assert sigs == {d["name"]: d["signature"] for d in ours}
    assert all("seed:12345" in s for s in sigs.values())

    # the plain score of each system equals its single-system score
    single = score_files(files["sysb"], [files["ref"]], metrics=metrics)
    assert [d["score"] for d in by_sys[str(files["sysb"])]] == [d["score"] for d in single]
    # our text table marks the baseline and the significant p-values
    rendered = format_results(ours, "text")
    assert f"Baseline: {files['hyp']}" in rendered and "Metric signatures" in rendered


def test_cli_matches_sacrebleu_text(files):
    runner = CliRunner()
    args = ["score", "-r", str(files["ref"]), "-i", str(files["hyp"])]
    expected = sacrebleu_cli([str(files["ref"]), "-i", str(files["hyp"]), "-m", "bleu", "chrf", "ter", "-f", "text"])
    for metric_args in (["-m", "bleu", "chrf", "ter"], ["-m", "bleu", "-m", "chrf", "-m", "ter"], ["-m", "bleu,chrf,ter"]):
        res = runner.invoke(main, args + metric_args)
        assert res.exit_code == 0, res.output
        assert res.stdout == expected

    res = runner.invoke(main, ["score", "-r", str(files["ref"]), "-m", "chrf++", "--format", "json"], input=files["hyp"].read_text())
    assert res.exit_code == 0, res.output
    (obj,) = json.loads(res.stdout)
    (theirs,) = _as_list(sacrebleu_cli([str(files["ref"]), "-i", str(files["hyp"]), "-m", "chrf", "-cw", "2"]))
    assert obj["name"] == "chrF2++" and obj["score"] == theirs["score"] and obj["signature"] == theirs["signature"]

    res = runner.invoke(main, ["score", "-r", str(files["ref"]), "-s", str(files["hyp"]), "-s", str(files["sysb"])])
    assert res.exit_code == 0, res.output
    assert str(files["sysb"]) in res.stdout and "Baseline" not in res.stdout


def test_detok_pieces(files, tmp_path):
    from mtkit.checkpoint import build_payload, save_checkpoint
    from mtkit.data.subword import train_sentencepiece

    ref_lines = files["ref"].read_text(encoding="utf-8").splitlines()
    hyp_lines = files["hyp"].read_text(encoding="utf-8").splitlines()
    spm = train_sentencepiece(ref_lines, vocab_size=300, num_threads=1)
    model_path = tmp_path / "spm.model"
    model_path.write_bytes(spm.model_bytes)
    pieces = tmp_path / "pieces.txt"
    pieces.write_text("\n".join(" ".join(p) for p in spm.encode_pieces(hyp_lines)) + "\n", encoding="utf-8")

    plain = score_files(files["hyp"], [files["ref"]], metrics=["bleu", "chrf"])
    detok = score_files(pieces, [files["ref"]], metrics=["bleu", "chrf"], detok_spm=model_path)
    scored_pieces = score_files(pieces, [files["ref"]], metrics=["bleu", "chrf"])
    assert [d["score"] for d in detok] == [d["score"] for d in plain]
    assert scored_pieces[0]["score"] < plain[0]["score"] - 10  # scoring pieces is the mistake

    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, build_payload({}, {}, spm={"src": spm.model_bytes, "tgt": spm.model_bytes}))
    res = CliRunner().invoke(main, ["score", "-r", str(files["ref"]), "-i", str(pieces), "--detok-pieces", str(ckpt), "-f", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["score"] == plain[0]["score"]


def test_bad_input_is_one_line_error(files, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Ein Hund .\nZwei Hunde .\n", encoding="utf-8")
    with pytest.raises(MtkitError) as err:
        score_files(short, [files["ref"]])
    msg = str(err.value)
    assert str(short) in msg and str(files["ref"]) in msg and " 2 " in msg and str(N_LINES) in msg

    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(MtkitError, match="empty"):
        score_files(empty, [files["ref"]])

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\xfe broken\n")
    with pytest.raises(MtkitError, match=r"line 2: invalid UTF-8"):
        score_files(bad, [files["ref"]])

    runner = CliRunner()
    for args in (
        ["score", "-r", str(files["ref"]), "-i", str(short)],
        ["score", "-r", str(files["ref"]), "-i", str(bad)],
        ["score", "-r", str(files["ref"]), "-i", str(tmp_path / "missing.txt")],
        ["score", "-r", str(files["ref"]), "-i", str(files["hyp"]), "-m", "bleu", "blue"],
        ["score", "-r", str(files["ref"]), "-i", str(files["hyp"]), "--tokenize", "mosses"],
        ["score", "-r", str(files["ref"]), "-i", str(files["hyp"]), "--paired-bs"],
        ["score", "-r", str(files["ref"]), "-s", str(files["hyp"]), "-s", str(files["sysb"]), "--sentence"],
        ["score", str(files["ref"]), "-r", str(files["ref"]), "-i", str(files["hyp"])],
    ):
        res = runner.invoke(main, args)
        assert res.exit_code == 1, (args, res.output)
        assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
        assert res.stdout == ""


def test_parse_metrics():
    assert parse_metrics(["bleu chrf", "TER,chrf++", "bleu"]) == ["bleu", "chrf", "ter", "chrf++"]
    assert parse_metrics([]) == ["bleu"]
    with pytest.raises(MtkitError, match="unknown metric 'rouge'"):
        parse_metrics(["rouge"])

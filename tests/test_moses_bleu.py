"""Tokenized BLEU as the papers compute it: Moses tokenization, compound splitting, the signature,
the command line, a check on real Multi30k lines, and the recipe report's paper-metric column."""

from __future__ import annotations

import gzip
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sacrebleu.metrics import BLEU, CHRF
from sacremoses import MosesTokenizer

from mtkit.errors import MtkitError
from mtkit.scoring import score_files, score_systems
from mtkit.scoring_metrics import compound_split, language_of, moses_tokenizer
from tests.helpers import cli, error_line, run_mtkit

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"  # shared/ beside the repo

REFS = [
    "Das ist ein Test-Satz, oder?",
    "Die E-Mail-Adresse kam 2014-2015 an.",
    "Ein Mann & eine Frau gehen \"schnell\" nach Baden-Württemberg.",
    "x--y und a-b-c-d sind - wie -a und a- - keine Wörter.",
    "Er sagte: 'Das ist's.'",
]
HYPS = [
    "Das ist ein Test-Satz oder?",
    "Die E-Mail kam 2014 an.",
    "Ein Mann und eine Frau gehen schnell nach Baden-Württemberg.",
    "x--y und a-b-c sind - wie -a und a- - Wörter.",
    "Er sagte: 'Das ist es.'",
]


def perl_rule(s: str) -> str:
    return re.sub(r"(\S)-(\S)", r"\1 ##AT##-##AT## \2", s)


def tokenized(lines: list[str], lang: str, split: bool) -> list[str]:
    tok = MosesTokenizer(lang=lang)
    out = [tok.tokenize(line, escape=True, return_str=True) for line in lines]
    return [perl_rule(line) for line in out] if split else out


# ---------------------------------------------------------------------------------------------
# the two text transformations


@pytest.mark.parametrize("lang,line,expected", [
    ("de", "Das ist ein Test-Satz, oder?", "Das ist ein Test-Satz , oder ?"),
    ("en", "It's 3.5 km-long, isn't it?", "It &apos;s 3.5 km-long , isn &apos;t it ?"),
    ("de", "Herr Dr. Müller kam am 3. Mai & ging \"sofort\".", None),
    ("en", "Mr. Smith paid $5 [sic] for A&B's <b>bike</b>.", None),
])
def test_moses_tokenization_is_sacremoses_with_default_escaping(lang, line, expected):
    ours = moses_tokenizer(lang)(line)
    assert ours == MosesTokenizer(lang=lang).tokenize(line, escape=True, return_str=True)
    assert ours == MosesTokenizer(lang=lang).tokenize(line, return_str=True)  # escaping is the default
    if expected is not None:
        assert ours == expected


CS_CASES = {
    "a-b": "a ##AT##-##AT## b",
    "a-b-c": "a ##AT##-##AT## b-c",  # the b belongs to the first match: no overlap, as in Perl
    "a-b-c-d": "a ##AT##-##AT## b-c ##AT##-##AT## d",
    "x--y": "x ##AT##-##AT## -y",
    "x---y": "x ##AT##-##AT## --y",
    "-a": "-a",
    "a-": "a-",
    " - ": " - ",
    "a - b": "a - b",
    "1-2": "1 ##AT##-##AT## 2",
    "2014-2015": "2014 ##AT##-##AT## 2015",
    "E-Mail-Adresse": "E ##AT##-##AT## Mail ##AT##-##AT## Adresse",  # the next match starts after "M"
    "Baden-Württemberg , Nord-Süd": "Baden ##AT##-##AT## Württemberg , Nord ##AT##-##AT## Süd",
    "": "",
}


@pytest.mark.parametrize("line", list(CS_CASES))
def test_compound_split_is_the_perl_rule(line):
    assert compound_split(line) == CS_CASES[line] == perl_rule(line)


@pytest.mark.skipif(shutil.which("perl") is None, reason="perl not installed")
def test_compound_split_agrees_with_perl_itself():
    lines = list(CS_CASES) + [line for pair in zip(REFS, HYPS) for line in pair]
    proc = subprocess.run(
        ["perl", "-CSD", "-ple", "s{(\\S)-(\\S)}{$1 ##AT##-##AT## $2}g"],
        input="".join(line + "\n" for line in lines), capture_output=True, text=True, encoding="utf-8", check=True,
    )
    assert proc.stdout.split("\n")[:-1] == [compound_split(line) for line in lines]


def test_language_of_a_reference_file():
    assert language_of("newstest2014.de") == "de"
    assert language_of("/x/test_2016_flickr.de.gz") == "de"
    assert language_of("ref.FR") == "fr"
    assert language_of("ref.txt") is None and language_of("ref") is None and language_of("-") is None


# ---------------------------------------------------------------------------------------------
# the score and its signature


@pytest.mark.parametrize("tokenize,split,lowercase,label", [
    ("moses", True, False, "moses+cs"),
    ("moses", False, False, "moses"),
    ("moses", False, True, "moses"),
])
def test_bleu_is_sacrebleu_none_on_the_transformed_text(tokenize, split, lowercase, label):
    (d,) = score_systems([("hyp", HYPS)], [REFS], ["bleu"], tokenize=tokenize, split_compounds=split,
                         lowercase=lowercase, lang="de", width=4)
    expected = BLEU(tokenize="none", lowercase=lowercase).corpus_score(
        tokenized(HYPS, "de", split), [tokenized(REFS, "de", split)])
    assert d["score"] == round(expected.score, 4)
    assert f"|tok:{label}|" in d["signature"] and d["tok"] == label
    assert ("case:lc" if lowercase else "case:mixed") in d["signature"]
    assert "tok:none" not in d["signature"]


def test_already_tokenized_text_with_none_and_compound_split():
    hyps, refs = tokenized(HYPS, "de", False), tokenized(REFS, "de", False)
    (d,) = score_systems([("hyp", hyps)], [refs], ["bleu"], tokenize="none", split_compounds=True, width=4)
    expected = BLEU(tokenize="none").corpus_score([perl_rule(h) for h in hyps], [[perl_rule(r) for r in refs]])
    assert d["score"] == round(expected.score, 4) and "|tok:none+cs|" in d["signature"]
    (same,) = score_systems([("hyp", HYPS)], [REFS], ["bleu"], tokenize="moses", split_compounds=True, lang="de", width=4)
    assert same["score"] == d["score"]
    (plain,) = score_systems([("hyp", hyps)], [refs], ["bleu"], tokenize="none", force=True, width=4)
    assert "|tok:none|" in plain["signature"] and plain["score"] != d["score"]


def test_chrf_and_ter_read_the_text_as_given():
    opts = dict(tokenize="moses", split_compounds=True, lang="de")
    bleu, chrf, ter = score_systems([("hyp", HYPS)], [REFS], ["bleu", "chrf", "ter"], width=4, **opts)
    plain = score_systems([("hyp", HYPS)], [REFS], ["chrf", "ter"], width=4)
    assert [chrf, ter] == plain
    assert chrf["score"] == round(CHRF().corpus_score(HYPS, [REFS]).score, 4)
    assert bleu["tok"] == "moses+cs"

    sentences = score_systems([("hyp", HYPS)], [REFS], ["bleu", "chrf"], sentence=True, **opts)
    metric = BLEU(tokenize="none", effective_order=True)
    for d, h, r in zip(sentences[: len(HYPS)], tokenized(HYPS, "de", True), tokenized(REFS, "de", True)):
        assert d["score"] == round(metric.sentence_score(h, [r]).score, 1) and d["tok"] == "moses+cs"
    assert [d["score"] for d in sentences[len(HYPS):]] == [round(CHRF().sentence_score(h, [r]).score, 1)
                                                          for h, r in zip(HYPS, REFS)]

    other = [h.replace("Wörter", "Worte") for h in HYPS]
    paired = score_systems([("a", HYPS), ("b", other)], [REFS], ["bleu", "chrf"], paired="bs", paired_n=20, **opts)
    assert [(d["system"], d["name"]) for d in paired] == [("a", "BLEU"), ("a", "chrF2"), ("b", "BLEU"), ("b", "chrF2")]
    assert paired[0]["tok"] == "moses+cs" and "tok" not in paired[1]
    assert paired[0]["score"] == score_systems([("a", HYPS)], [REFS], **opts)[0]["score"]


def test_bad_combinations_are_refused():
    with pytest.raises(MtkitError, match="--compound-split works on tokenized text"):
        score_systems([("hyp", HYPS)], [REFS], split_compounds=True)
    with pytest.raises(MtkitError, match="--compound-split works on tokenized text"):
        score_systems([("hyp", HYPS)], [REFS], tokenize="intl", split_compounds=True)
    with pytest.raises(MtkitError, match="-l SRC-TGT"):
        score_systems([("hyp", HYPS)], [REFS], tokenize="moses")
    with pytest.raises(MtkitError, match="unknown BLEU tokenizer 'mosses'.*moses"):
        score_systems([("hyp", HYPS)], [REFS], tokenize="mosses")


# ---------------------------------------------------------------------------------------------
# the command line


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    out = {}
    for name, lines in (("ref.de", REFS), ("hyp.de", HYPS), ("ref.txt", REFS)):
        out[name] = tmp_path / name
        out[name].write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return out


def test_cli_scores_tokenized_bleu_with_compound_splitting(files):
    expected = BLEU(tokenize="none").corpus_score(tokenized(HYPS, "de", True), [tokenized(REFS, "de", True)])
    args = ["score", "-r", files["ref.de"], "-i", files["hyp.de"], "-tok", "moses", "--compound-split"]
    proc = run_mtkit(args, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith("BLEU|nrefs:1|case:mixed|eff:no|tok:moses+cs|smooth:exp|version:")
    assert f" = {expected.score:.1f} " in line

    res = cli(args + ["--format", "json", "-w", "2"])
    assert res.exit_code == 0, res.output
    (d,) = json.loads(res.stdout)
    assert d["score"] == round(expected.score, 2) and d["tok"] == "moses+cs"

    res = cli(["score", "-r", files["ref.txt"], "-i", files["hyp.de"], "--tokenize", "moses", "-l", "en-de",
               "--compound-split", "-f", "json", "-w", "2"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["score"] == d["score"]


def test_cli_refuses_unclear_options_in_one_line(files):
    res = cli(["-q", "score", "-r", files["ref.txt"], "-i", files["hyp.de"], "-tok", "moses"])
    error_line(res.stderr, res.exit_code, "cannot tell the language", "ref.txt", "-l SRC-TGT")
    res = cli(["-q", "score", "-r", files["ref.de"], "-i", files["hyp.de"], "--compound-split"])
    error_line(res.stderr, res.exit_code, "--compound-split", "-tok moses or -tok none")
    assert res.stdout == ""


def test_sacremoses_is_imported_only_when_asked_for():
    code = "import sys, mtkit.cli, mtkit.scoring, mtkit.recipes.runner, mtkit.report; print('sacremoses' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# real data


def _perturb(lines: list[str], seed: int) -> list[str]:
    """Deterministic 'system output': dropped, replaced and hyphen-joined words."""
    rng = random.Random(seed)
    out = []
    for line in lines:
        words = line.split()
        if len(words) > 3 and rng.random() < 0.4:
            del words[rng.randrange(len(words))]
        if len(words) > 2 and rng.random() < 0.3:
            words[rng.randrange(len(words))] = rng.choice(["Hund", "Mann", "rot", "und"])
        if len(words) > 3 and rng.random() < 0.2:
            i = rng.randrange(len(words) - 1)
            words[i : i + 2] = [words[i] + "-" + words[i + 1]]
        out.append(" ".join(words))
    return out


@pytest.mark.skipif(not (DATA / "test_2016_flickr.de.gz").exists(), reason="shared Multi30k data not available")
def test_multi30k_lines_agree_with_sacremoses_and_sacrebleu(tmp_path):
    with gzip.open(DATA / "test_2016_flickr.de.gz", "rt", encoding="utf-8") as f:
        refs = [next(f).rstrip("\n") for _ in range(200)]
    hyps = _perturb(refs, 7)
    assert sum("-" in h for h in hyps) >= 10  # the splitting has work to do
    ref, hyp = tmp_path / "ref.de", tmp_path / "hyp.de"
    ref.write_text("\n".join(refs) + "\n", encoding="utf-8")
    hyp.write_text("\n".join(hyps) + "\n", encoding="utf-8")

    tok = MosesTokenizer(lang="de")  # sacremoses' defaults: escape=True

    def direct(line: str) -> str:
        return perl_rule(tok.tokenize(line, return_str=True))

    expected = BLEU(tokenize="none").corpus_score([direct(h) for h in hyps], [[direct(r) for r in refs]]).score
    res = cli(["score", "-r", ref, "-i", hyp, "-tok", "moses", "--compound-split", "-f", "json", "-w", "2"])
    assert res.exit_code == 0, res.output
    (d,) = json.loads(res.stdout)
    assert abs(d["score"] - expected) <= 0.02, (d["score"], expected)
    assert d["tok"] == "moses+cs"
    (sacre,) = score_files(hyp, [ref], width=2)
    assert sacre["score"] != d["score"] and sacre["tok"] == "13a"


# ---------------------------------------------------------------------------------------------
# the recipe report


def test_recipe_report_scores_our_output_with_the_papers_metric(tmp_path, monkeypatch):
    """The score stage of the WMT14 En-De recipe on a made-up output: no training needed."""
    from mtkit.recipes.context import RunContext
    from mtkit.recipes.load import load_recipe, recipe_paths
    from mtkit.recipes.stages import stage_score

    monkeypatch.setenv("MTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MTKIT_OFFLINE", "1")
    path = recipe_paths()[0].parent / "wmt14_en_de_transformer_base.yaml"
    recipe = load_recipe(path)
    assert recipe.raw["reproduces"]["metric"] == "tokenized BLEU, compound-split"
    ctx = RunContext(recipe, tmp_path / "work")
    ctx.raw_dir.mkdir(parents=True)
    ctx.hyp_dir.mkdir(parents=True)
    (ctx.raw_dir / "newstest2014.de").write_text("".join(r + "\n" for r in REFS), encoding="utf-8")
    (ctx.hyp_dir / "newstest2014.de").write_text("".join(h + "\n" for h in HYPS), encoding="utf-8")

    out = stage_score(ctx, resume=False)
    res = json.loads(Path(out["results"]).read_text())
    rep = res["reproduces"]
    (cs,) = score_systems([("h", HYPS)], [REFS], tokenize="moses", split_compounds=True, lang="de", width=2)
    (sacre,) = score_systems([("h", HYPS)], [REFS], width=2)
    assert rep["ours"] == cs["score"] and rep["our_signature"] == cs["signature"]
    assert rep["sacrebleu"] == sacre["score"] and rep["sacrebleu_signature"] == sacre["signature"]
    assert rep["difference"] == round(cs["score"] - 27.3, 2) and rep["comparable"] is True
    assert "tok:moses+cs" in rep["our_signature"] and "tok:13a" in rep["sacrebleu_signature"]
    assert res["see_also"][0]["ours"] == cs["score"]  # Ott et al. 2018: the same metric
    assert res["tests"]["newstest2014"]["signature"] == sacre["signature"]  # the score section: sacreBLEU

    md = Path(out["report"]).read_text()
    row = (f"| Vaswani et al. 2017, Attention Is All You Need | Table 2 | newstest2014 | tokenized BLEU, "
           f"compound-split | 27.30 | {cs['score']:.2f} | {rep['difference']:.2f} | {sacre['score']:.2f} |")
    assert row in md, md
    assert f"- tokenized BLEU, compound-split on newstest2014: `{cs['signature']}`" in md
    assert f"- sacreBLEU on newstest2014: `{sacre['signature']}`" in md


def test_recipe_score_section_takes_the_tokenized_options(tmp_path):
    from mtkit.config import build_section
    from mtkit.recipes.schema import RECIPE_SECTIONS

    section = build_section(RECIPE_SECTIONS["score"], {"tokenize": "moses", "compound_split": True}, "score")
    assert section.tokenize == "moses" and section.compound_split is True
    with pytest.raises(MtkitError, match="score.compound_split needs score.tokenize moses or none"):
        build_section(RECIPE_SECTIONS["score"], {"compound_split": True}, "score")
    with pytest.raises(MtkitError, match="score.tokenize"):
        build_section(RECIPE_SECTIONS["score"], {"tokenize": "mosses"}, "score")

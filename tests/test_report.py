"""The recipe report on plain data: results.json's content, report.md's tables, the curves, and
what it does when parts of the run are missing."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from mtkit.errors import MtkitError
from mtkit.report import (
    RecipeRun,
    build_results,
    compare,
    plot_curves,
    read_metrics,
    render_markdown,
    write_report,
)

PAPER = {"paper": "Vaswani et al. 2017", "table": "Table 2", "metric": "tokenized BLEU", "value": 27.3,
         "test_set": "newstest2014", "note": "big batches"}
OTHER = {"paper": "Ott et al. 2018", "table": "Table 1", "metric": "sacreBLEU", "value": 28.6,
         "test_set": "newstest2014"}
SCORES = {"newstest2014": [{"name": "BLEU", "score": 25.1, "signature": "nrefs:1|tok:13a"},
                           {"name": "chrF2", "score": 55.0, "signature": "nrefs:1|chrf"}]}
BY_METRIC = {"newstest2014": {"sacreBLEU": {"score": 25.1, "signature": "nrefs:1|tok:13a"},
                              "tokenized BLEU": {"score": 26.05, "signature": "nrefs:1|tok:moses"}}}


def full_run(**changes) -> RecipeRun:
    run = RecipeRun(
        recipe="wmt14_demo", recipe_file="/r/wmt14_demo.yaml", smoke=False, src_lang="en", tgt_lang="de",
        reproduces=PAPER, see_also=[OTHER], test_lines={"newstest2014": 3003},
        training={"updates": 1000, "epochs": 2, "train_seconds": 600.0, "metrics_file": None, "extra": 1},
        model={"arch": "transformer", "preset": "transformer_base", "parameters": 61000000,
               "checkpoint": "/w/avg.pt", "averaged_from": ["/w/a.pt", "/w/b.pt"]},
        decode={"beam": 4, "length_penalty": "gnmt", "alpha": 0.6},
        stage_seconds={"prepare": 30.0, "train": 600.0, "score": None},
        provenance={"command": "mtkit recipe run wmt14_demo"},
    )
    for key, value in changes.items():
        setattr(run, key, value)
    return run


def test_results_hold_the_run_and_the_comparison():
    res = build_results(full_run(), SCORES, BY_METRIC)
    assert list(res) == ["recipe", "recipe_file", "smoke", "src_lang", "tgt_lang", "tests", "reproduces",
                         "see_also", "training", "model", "decode", "stage_seconds", "total_seconds", "provenance"]
    test = res["tests"]["newstest2014"]
    assert test["bleu"] == 25.1 and test["signature"] == "nrefs:1|tok:13a" and test["lines"] == 3003
    assert test["metrics"] == BY_METRIC["newstest2014"] and test["scores"] == SCORES["newstest2014"]
    rep = res["reproduces"]
    assert rep["ours"] == 26.05 and rep["difference"] == -1.25 and rep["our_signature"] == "nrefs:1|tok:moses"
    assert rep["sacrebleu"] == 25.1 and rep["comparable"] is True and rep["caveat"] is None
    assert res["see_also"][0]["ours"] == 25.1 and res["see_also"][0]["difference"] == -3.5
    assert res["training"] == {"updates": 1000, "epochs": 2, "train_seconds": 600.0, "best_checkpoint": None,
                               "last_checkpoint": None, "metrics_file": None}  # its keys only, missing ones None
    assert res["model"]["parameters"] == 61000000 and res["decode"]["alpha"] == 0.6
    assert res["total_seconds"] == 630.0  # a stage without seconds adds nothing


def test_markdown_tables():
    res = build_results(full_run(), SCORES, BY_METRIC)
    res["curves"] = "/w/training_curves.png"
    md = render_markdown(res)
    assert md.startswith("# wmt14_demo\n") and "smoke run" not in md
    assert ("en -> de, model `transformer` (preset `transformer_base`, 61000000 parameters), 1000 updates "
            "in 10.0 min of training; 10.5 min for all stages.") in md
    assert "| newstest2014 | 3003 | BLEU 25.10 | `nrefs:1|tok:13a` |" in md
    assert "| newstest2014 | 3003 | chrF2 55.00 | `nrefs:1|chrf` |" in md
    assert "| source | table | test set | metric | theirs | ours | difference | ours, sacreBLEU |" in md
    assert "| Vaswani et al. 2017 | Table 2 | newstest2014 | tokenized BLEU | 27.30 | 26.05 | -1.25 | 25.10 |" in md
    assert "| Ott et al. 2018 | Table 1 | newstest2014 | sacreBLEU | 28.60 | 25.10 | -3.50 | 25.10 |" in md
    assert md.count("- sacreBLEU on newstest2014: `nrefs:1|tok:13a`") == 1  # each signature once
    assert "- tokenized BLEU on newstest2014: `nrefs:1|tok:moses`" in md
    assert "- Vaswani et al. 2017: big batches" in md and "- Ott et al. 2018:" not in md
    assert "| prepare | 30.0 |\n| train | 600.0 |\n| score | - |" in md
    assert md.endswith("\n![training curves](training_curves.png)\n")
    smoke = render_markdown(build_results(full_run(smoke=True), SCORES, BY_METRIC))
    assert smoke.startswith("# wmt14_demo (smoke run: tiny model, not a real result)\n")


def test_missing_data_gives_dashes_and_a_caveat():
    bare = RecipeRun(recipe="bare", recipe_file="bare.yaml", smoke=False, src_lang="en", tgt_lang="de",
                     reproduces=dict(PAPER, note=None))
    res = build_results(bare, {"newstest2014": [{"name": "chrF2", "score": 50.0, "signature": "s"}]})
    test = res["tests"]["newstest2014"]
    assert test["bleu"] is None and test["lines"] is None and test["metrics"] == {}
    rep = res["reproduces"]
    assert rep["ours"] is None and rep["difference"] is None and rep["sacrebleu"] is None
    assert rep["comparable"] is False and "not scored with tokenized BLEU on newstest2014" in rep["caveat"]
    assert res["training"]["updates"] is None and res["model"]["parameters"] is None
    assert res["stage_seconds"] == {} and res["total_seconds"] == 0
    md = render_markdown(res)
    assert "model `None` (preset `None`, - parameters), - updates in 0.0 min of training" in md
    assert "| newstest2014 | - | chrF2 50.00 | `s` |" in md
    assert "| Vaswani et al. 2017 | Table 2 | newstest2014 | tokenized BLEU | 27.30 | - | - | - |" in md
    assert "- Vaswani et al. 2017: our output was not scored with tokenized BLEU" in md
    assert "on newstest2014: `" not in md  # no signature to list
    assert md.endswith("| stage | seconds |\n| --- | --- |\n") and "![training curves]" not in md


def test_a_published_number_without_a_value_has_no_difference():
    tests = {"newstest2014": {"metrics": BY_METRIC["newstest2014"]}}
    c = compare(dict(PAPER, value=None), tests)
    assert c["ours"] == 26.05 and c["difference"] is None and c["comparable"] is True and c["caveat"] is None
    assert compare(dict(PAPER, test_set="newstest2015"), tests)["ours"] is None


def _metrics_file(path: Path) -> Path:
    events = [{"kind": "train", "update": u, "loss": 5.0 - u / 100} for u in (10, 20, 30)]
    events += [{"kind": "valid", "update": u, "loss": 4.0, "bleu": u / 2} for u in (15, 30)]
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + "not json\n[1, 2]\n")
    return path


def test_write_report_writes_the_files_and_draws_the_curves(tmp_path):
    pytest.importorskip("matplotlib")
    metrics = _metrics_file(tmp_path / "metrics.jsonl")
    out = write_report(full_run(), tmp_path, SCORES, BY_METRIC, metrics_file=metrics)
    assert out == {"results": str(tmp_path / "results.json"), "report": str(tmp_path / "report.md"),
                   "curves": str(tmp_path / "training_curves.png"), "bleu": {"newstest2014": 25.1}}
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["curves"] == out["curves"] and res["reproduces"]["difference"] == -1.25
    assert (tmp_path / "report.md").read_text() == render_markdown(res)
    assert Path(out["curves"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_without_metrics_has_no_curves(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mtkit.report"):
        out = write_report(full_run(), tmp_path, SCORES, metrics_file=tmp_path / "missing.jsonl")
        assert out["curves"] is None and "metrics file not found" in caplog.text
        caplog.clear()
        out = write_report(full_run(), tmp_path, SCORES)  # the run names none at all
        assert out["curves"] is None and "names no metrics file" in caplog.text
    assert "![training curves]" not in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "training_curves.png").exists()


def test_read_metrics_and_plot_errors(tmp_path):
    metrics = _metrics_file(tmp_path / "metrics.jsonl")
    assert [e["update"] for e in read_metrics(metrics)] == [10, 20, 30, 15, 30]  # bad lines skipped
    assert read_metrics(tmp_path / "none.jsonl") == []
    with pytest.raises(MtkitError, match="metrics file not found"):
        plot_curves(tmp_path / "none.jsonl", tmp_path / "x.png")
    (tmp_path / "empty.jsonl").write_text('{"kind": "train", "update": 1, "loss": NaN}\n')
    with pytest.raises(MtkitError, match="no training metrics"):
        plot_curves(tmp_path / "empty.jsonl", tmp_path / "x.png")


def test_the_report_imports_neither_the_runner_nor_training():
    code = ("import sys, mtkit.report; "
            "print([m for m in sys.modules if m.startswith(('mtkit.recipes', 'mtkit.training'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

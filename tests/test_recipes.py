"""Recipes: schema checks for every shipped recipe, the stage runner's markers and resume logic,
the report, and (slow) a --smoke run of every recipe on generated data."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mtkit.cli import main
from mtkit.errors import MtkitError
from mtkit.recipes import schema, stages
from mtkit.recipes.context import STAGES
from mtkit.recipes.load import check_recipe, load_recipe, recipe_paths
from mtkit.recipes.runner import parse_stages, run_recipe
from mtkit.recipes.smoke import SMOKE_PREPROCESS, SMOKE_TRAIN

RECIPES = recipe_paths()
MINIMAL = {
    "reproduces": {"paper": "P", "table": "T1", "metric": "sacreBLEU", "value": 30.0, "test_set": "test_2016_flickr"},
    "src_lang": "en",
    "tgt_lang": "de",
    "corpora": {"train": ["multi30k/train"], "valid": ["multi30k/val"], "test": ["multi30k/test_2016_flickr"]},
    "preset": "transformer_tiny",
    "average": {"last": 2},
}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("MTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MTKIT_OFFLINE", "1")
    monkeypatch.delenv("MTKIT_DATA", raising=False)


def _write(tmp_path: Path, raw: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert {
        "multi30k_en_de_transformer", "multi30k_en_de_lstm", "multi30k_en_de_bahdanau", "multi30k_en_de_luong",
        "multi30k_en_de_gnmt", "iwslt14_de_en_transformer", "wmt14_en_de_transformer_base",
        "wmt14_en_de_transformer_big", "wmt14_en_fr_transformer_big", "wmt14_en_de_gnmt", "wmt14_en_fr_gnmt",
        "wmt15_en_de_luong", "wmt14_en_fr_bahdanau", "wmt14_en_fr_lstm",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_passes_check(path):
    info = check_recipe(path)
    assert info["ok"] and info["tests"]
    raw = yaml.safe_load(path.read_text())
    for rep in [raw["reproduces"], *(raw.get("see_also") or [])]:
        assert rep["metric"] in schema.METRICS, path.name
    # every top-level key carries a comment on its line or the line of its first child
    lines = path.read_text().splitlines()
    for key in raw:
        i = next(n for n, line in enumerate(lines) if line.startswith(f"{key}:"))
        assert "#" in lines[i] or "#" in lines[i + 1], f"{path.name}: key '{key}' has no comment"


def test_unknown_keys_get_a_did_you_mean(tmp_path):
    raw = dict(MINIMAL, averag={"last": 2})
    with pytest.raises(MtkitError, match="unknown recipe key 'averag'; did you mean 'average'"):
        load_recipe(_write(tmp_path, raw))
    raw = dict(MINIMAL, average={"lats": 2})
    with pytest.raises(MtkitError, match="did you mean 'average.last'"):
        load_recipe(_write(tmp_path, raw))
    raw = dict(MINIMAL, train={"max_update": 5})
    with pytest.raises(MtkitError, match="did you mean 'train.max_updates'"):
        load_recipe(_write(tmp_path, raw))
    raw = dict(MINIMAL, corpora=dict(MINIMAL["corpora"], train=["multi30k/trian"]))
    with pytest.raises(MtkitError, match="did you mean 'train'"):
        load_recipe(_write(tmp_path, raw))
    raw = dict(MINIMAL, reproduces=dict(MINIMAL["reproduces"], metric="BLEU"))
    with pytest.raises(MtkitError, match="'sacreBLEU', 'NIST BLEU', 'tokenized BLEU', 'tokenized BLEU, compound-split'"):
        load_recipe(_write(tmp_path, raw))
    raw = dict(MINIMAL, reproduces=dict(MINIMAL["reproduces"], test_set="newstest2014"))
    with pytest.raises(MtkitError, match="not one of the test sets"):
        load_recipe(_write(tmp_path, raw))
    raw = dict(MINIMAL, see_also=[dict(MINIMAL["reproduces"], test_set="newstest2014")])
    with pytest.raises(MtkitError, match=r"see_also\[0\].test_set 'newstest2014' is not one of the test sets"):
        load_recipe(_write(tmp_path, raw))


def test_overrides_and_the_smoke_variant(tmp_path):
    path = _write(tmp_path, dict(MINIMAL, preset="transformer_small", model={"activation": "gelu", "d_model": 512}))
    r = load_recipe(path, ["train.lr=5e-4", "average.last=4", "preprocess.vocab_size=1000"])
    assert r.config.train.lr == 5e-4 and r.raw["average"] == {"last": 4}
    assert r.config.model.d_model == 512 and r.raw["preprocess"]["vocab_size"] == 1000
    smoke = load_recipe(path, ["average.last=4"], smoke=True)
    assert smoke.raw["preset"] == "transformer_tiny"
    assert smoke.config.model.d_model == 32  # sizes from the tiny preset
    assert smoke.config.model.activation == "gelu"  # choices kept from the recipe
    assert smoke.config.train.max_updates == SMOKE_TRAIN["max_updates"]
    assert smoke.raw["average"] == {"last": 4}  # --set wins over the smoke defaults
    assert smoke.raw["preprocess"]["vocab_size"] == SMOKE_PREPROCESS["vocab_size"]
    with pytest.raises(MtkitError, match="did you mean 'train.lr'"):
        load_recipe(path, ["train.lrr=1"])


def test_every_preset_declares_its_smoke_preset():
    from mtkit.config import PRESET_DIR, load_raw_config
    from mtkit.models import MODELS
    from mtkit.recipes.smoke import FAMILY_SMOKE_PRESETS, SMOKE_PRESETS

    def arch(preset: str) -> str:
        return (load_raw_config(preset).get("model") or {}).get("arch", "transformer")

    presets = {p.stem for p in PRESET_DIR.glob("*.yaml")}
    assert set(SMOKE_PRESETS) == presets  # a new preset names its small counterpart here
    for full, small in SMOKE_PRESETS.items():
        assert small in presets and arch(small) == arch(full), full
        assert SMOKE_PRESETS[small] == small  # a small preset runs as itself
    assert set(FAMILY_SMOKE_PRESETS) == set(MODELS)
    assert all(arch(small) == family for family, small in FAMILY_SMOKE_PRESETS.items())


def test_the_smoke_preset_comes_from_the_table_the_family_or_the_recipe(tmp_path):
    def smoke_preset_of(**changes) -> str:
        return load_recipe(_write(tmp_path, dict(MINIMAL, **changes)), smoke=True).raw["preset"]

    assert smoke_preset_of(preset="bahdanau2015") == "bahdanau_tiny"
    assert smoke_preset_of(preset="luong_local_p_tiny") == "luong_local_p_tiny"
    own = tmp_path / "own.yaml"  # a preset file of one's own: its family's small preset
    own.write_text(yaml.safe_dump({"model": {"arch": "gnmt"}}))
    assert smoke_preset_of(preset=str(own)) == "gnmt_tiny"
    assert smoke_preset_of(preset=None, model={"arch": "rnn_attention"}) == "bahdanau_tiny"
    assert smoke_preset_of(smoke={"preset": "transformer_small"}) == "transformer_small"


def test_parse_stages():
    assert parse_stages(None) == list(STAGES)
    assert parse_stages(["score,train"]) == ["train", "score"]
    assert parse_stages(["preprocess-average"]) == ["preprocess", "train", "average"]
    with pytest.raises(MtkitError, match="did you mean 'average'"):
        parse_stages(["averge"])


# ---------------------------------------------------------------------------------------------
# The runner, with fake stages


class FakeStages:
    """Stand-ins for the six stages that record calls; ``fail`` makes one raise once."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, bool]] = []
        self.fail: str | None = None
        for stage in STAGES:
            monkeypatch.setitem(stages.STAGE_FUNCS, stage, self._make(stage))

    def _make(self, stage):
        def fn(ctx, resume):
            self.calls.append((stage, resume))
            if self.fail == stage:
                self.fail = None
                raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-stage
            (ctx.workdir / f"{stage}.out").write_text("x")
            return {"stage": stage, "saw": sorted(ctx.outputs)}

        return fn

    def ran(self) -> list[str]:
        out = [s for s, _ in self.calls]
        self.calls.clear()
        return out


def test_markers_skip_done_stages_and_resume_an_interrupted_one(tmp_path, monkeypatch):
    fake = FakeStages(monkeypatch)
    path, work = _write(tmp_path, MINIMAL), tmp_path / "work"
    run_recipe(path, work)
    assert fake.ran() == list(STAGES)
    marker = json.loads((work / "stages" / "score.json").read_text())
    assert marker["status"] == "done" and marker["outputs"]["saw"] == list(sorted(STAGES[:-1]))

    run_recipe(path, work)  # everything is done: nothing runs
    assert fake.ran() == []

    (work / "stages" / "train.json").unlink()  # train never finished: it and all after it rerun
    fake.fail = "average"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(path, work)
    assert fake.ran() == ["train", "average"]
    assert json.loads((work / "stages" / "average.json").read_text())["status"] == "running"
    assert not (work / "stages" / "translate.json").exists()  # later markers were invalidated

    run_recipe(path, work)
    assert fake.calls == [("average", True), ("translate", False), ("score", False)]


def test_changed_inputs_redo_only_the_affected_stages(tmp_path, monkeypatch):
    fake = FakeStages(monkeypatch)
    path, work = _write(tmp_path, MINIMAL), tmp_path / "work"
    run_recipe(path, work)
    fake.ran()
    run_recipe(path, work, overrides=["decode.beam=3"])
    assert fake.ran() == ["translate", "score"]
    run_recipe(path, work, overrides=["decode.beam=3", "train.lr=0.002"])
    assert fake.ran() == ["train", "average", "translate", "score"]
    assert not fake.calls


def test_stage_selection_and_force(tmp_path, monkeypatch):
    fake = FakeStages(monkeypatch)
    path, work = _write(tmp_path, MINIMAL), tmp_path / "work"
    with pytest.raises(MtkitError, match="stage 'prepare' has not finished"):
        run_recipe(path, work, stages=["train"])
    run_recipe(path, work, stages=["prepare-train"])
    assert fake.ran() == ["prepare", "preprocess", "train"]
    run_recipe(path, work, stages=["train"], force=True)
    assert fake.calls == [("train", False)]
    fake.ran()
    run_recipe(path, work)
    assert fake.ran() == ["average", "translate", "score"]


def test_cli_recipe_check_and_run_errors(tmp_path, monkeypatch):
    FakeStages(monkeypatch)
    path = _write(tmp_path, MINIMAL)
    res = CliRunner().invoke(main, ["recipe", "check", str(path)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["tests"] == ["test_2016_flickr"]
    res = CliRunner().invoke(main, ["recipe", "run", str(path), "--workdir", str(tmp_path / "w"), "--set", "trian.lr=1"])
    assert res.exit_code == 1
    assert "error: " in res.output and "did you mean 'train'" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["recipe", "run", str(path), "--workdir", str(tmp_path / "w")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["stages"]["score"].startswith("ran")


# ---------------------------------------------------------------------------------------------
# The report


def test_report_compares_with_the_paper_and_draws_curves(tmp_path):
    from mtkit.recipes.context import RunContext
    from mtkit.recipes.stages import write_run_report

    raw = dict(MINIMAL, reproduces=dict(MINIMAL["reproduces"], metric="tokenized BLEU", value=30.0))
    ctx = RunContext(load_recipe(_write(tmp_path, raw)), tmp_path)
    ctx.save_dir.mkdir()
    events = [{"kind": "train", "update": u, "loss": 5.0 - u / 100} for u in (10, 20, 30)]
    events += [{"kind": "valid", "update": u, "loss": 4.0 - u / 100, "bleu": u / 2} for u in (15, 30)]
    (ctx.save_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    ctx.outputs["train"] = {"updates": 30, "train_seconds": 12.5, "metrics_file": str(ctx.save_dir / "metrics.jsonl")}
    scores = {"test_2016_flickr": [{"name": "BLEU", "score": 26.3, "signature": "nrefs:1|tok:13a"}]}
    by_metric = {"test_2016_flickr": {
        "sacreBLEU": {"score": 26.31, "signature": "nrefs:1|tok:13a"},
        "tokenized BLEU": {"score": 27.25, "signature": "nrefs:1|tok:moses"},
    }}
    out = write_run_report(ctx, scores, by_metric)
    res = json.loads(Path(out["results"]).read_text())
    rep = res["reproduces"]
    assert rep["ours"] == 27.25 and rep["difference"] == -2.75 and rep["our_signature"] == "nrefs:1|tok:moses"
    assert rep["sacrebleu"] == 26.31 and rep["sacrebleu_signature"] == "nrefs:1|tok:13a"
    assert rep["comparable"] is True and rep["caveat"] is None
    assert res["tests"]["test_2016_flickr"]["signature"] == "nrefs:1|tok:13a"
    assert res["training"]["updates"] == 30
    md = Path(out["report"]).read_text()
    assert "| P | T1 | test_2016_flickr | tokenized BLEU | 30.00 | 27.25 | -2.75 | 26.31 |" in md
    assert "- tokenized BLEU on test_2016_flickr: `nrefs:1|tok:moses`" in md
    assert "- sacreBLEU on test_2016_flickr: `nrefs:1|tok:13a`" in md

    # without our output scored by the paper's metric there is no difference to give
    res = json.loads(Path(write_run_report(ctx, scores)["results"]).read_text())
    assert res["reproduces"]["ours"] is None and res["reproduces"]["difference"] is None
    assert res["reproduces"]["comparable"] is False and "tokenized BLEU" in res["reproduces"]["caveat"]
    pytest.importorskip("matplotlib")
    assert Path(out["curves"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Real stages on generated data (--smoke)


def _generated_data_dir(recipe_path: Path, root: Path) -> Path:
    """Write every corpus file the recipe names (a few hundred generated pairs) under root."""
    r = load_recipe(recipe_path)
    for n, ref in enumerate(r.data_refs()):
        dataset, split = ref.split("/")
        pairs = stages.generated_pairs(250, seed=n)
        for i, lang in enumerate((r.src_lang, r.tgt_lang)):
            path = root / dataset / f"{split}.{lang}.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(path, "wt", encoding="utf-8") as f:
                f.write("".join(p[i] + "\n" for p in pairs))
    return root


def _smoke(path: Path, tmp_path: Path) -> dict:
    data = _generated_data_dir(path, tmp_path / "data")
    work = tmp_path / "work"
    summary = run_recipe(path, work, data_dir=data, smoke=True, device="cpu")
    assert all(v.startswith("ran") for v in summary["stages"].values()), summary
    res = json.loads((work / "results.json").read_text())
    assert res["smoke"] is True
    for name, t in res["tests"].items():
        assert t["bleu"] is not None and "nrefs:1" in t["signature"], name
        hyp = (work / "translations" / f"{name}.{res['tgt_lang']}").read_text().splitlines()
        assert len(hyp) == t["lines"] > 0
    assert res["model"]["parameters"] > 0 and res["training"]["updates"] > 0
    for c in [res["reproduces"], *res["see_also"]]:  # our output by the paper's metric, and sacreBLEU
        assert c["ours"] is not None and c["our_metric"] == c["metric"] and c["sacrebleu"] is not None
        assert "tok:13a" in c["sacrebleu_signature"]
        assert c["metric"] != "tokenized BLEU, compound-split" or "tok:moses+cs" in c["our_signature"]
    assert (work / "report.md").exists()
    manifest = hashlib.sha256((work / "data" / "manifest.json").read_bytes()).hexdigest()
    assert res["provenance"]["data"]["manifest_sha256"] == manifest
    assert res["provenance"]["config"] == load_recipe(path, smoke=True).config.to_dict()
    log = (work / "run.log").read_text()
    assert "=== mtkit recipe run" in log.splitlines()[0] and "versions: mtkit" in log and "stage score: done" in log
    assert "=== mtkit train ===" in (work / "checkpoints" / "train.log").read_text()
    return res


SMOKE_PARAMS = [
    pytest.param(p, id=p.stem, marks=() if p.stem == "multi30k_en_de_transformer" else pytest.mark.slow)
    for p in RECIPES
]


@pytest.mark.parametrize("path", SMOKE_PARAMS)
def test_every_recipe_passes_smoke(path, tmp_path):
    _smoke(path, tmp_path)


def test_interrupted_training_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    import dataclasses

    from mtkit.training import trainer

    path = recipe_paths()[0].parent / "multi30k_en_de_transformer.yaml"
    data = _generated_data_dir(path, tmp_path / "data")
    work = tmp_path / "work"
    real_train = trainer.train
    calls = []

    def interrupted_once(data_dir, cfg, save_dir, resume=False, device="auto"):
        calls.append(resume)
        if len(calls) == 1:  # train 8 of the 12 updates, then "Ctrl-C"
            short = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_updates=8))
            real_train(data_dir, short, save_dir, resume=resume, device=device)
            raise KeyboardInterrupt
        return real_train(data_dir, cfg, save_dir, resume=resume, device=device)

    monkeypatch.setattr(trainer, "train", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(path, work, data_dir=data, smoke=True, device="cpu")
    assert json.loads((work / "stages" / "train.json").read_text())["status"] == "running"
    assert (work / "checkpoints" / "checkpoint_8.pt").exists()

    summary = run_recipe(path, work, data_dir=data, smoke=True, device="cpu")
    assert calls == [False, True]  # the rerun resumed from checkpoint_last.pt
    assert summary["stages"]["prepare"] == summary["stages"]["preprocess"] == "skipped (done)"
    assert summary["stages"]["train"].startswith("resumed")
    marker = json.loads((work / "stages" / "train.json").read_text())
    assert marker["status"] == "done" and marker["outputs"]["updates"] == SMOKE_TRAIN["max_updates"]
    assert (work / "checkpoints" / "checkpoint_8.pt").exists()  # the first attempt's work was kept
    assert json.loads((work / "results.json").read_text())["training"]["updates"] == 12

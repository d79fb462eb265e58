"""Run records and the surface around them: train.log and provenance, config dump and reuse,
`mtkit info`, presets, recipes by name, test sets by name, n-best output, the Python API,
curves, and the command-line conventions (-q after the command, MTKIT_LOG_LEVEL, --version,
help examples)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mtkit.checkpoint import load_checkpoint
from mtkit.cli import main
from mtkit.config import dump_config, load_config
from mtkit.data.dataset import load_spm
from tests.helpers import (
    TINY,
    cli,
    error_line,
    get_workspace,
    random_checkpoint,
    sets,
    subprocess_env,
)

ROOT = Path(__file__).resolve().parent.parent
INFO_LINE = re.compile(r"^\d\d:\d\d:\d\d \| INFO \|", re.M)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return get_workspace(tmp_path_factory)


def train_args(ws, save_dir: Path, updates: int) -> list:
    return ["train", ws.data, "-c", "transformer_tiny", "--save-dir", save_dir, "--device", "cpu",
            *sets(TINY + [f"train.max_updates={updates}"])]


# --- train.log, provenance, config.yaml, info ----------------------------------------------------
def test_train_log_survives_quiet_and_the_checkpoint_carries_the_provenance(workspace, tmp_path):
    save = tmp_path / "ck"
    res = cli([*train_args(workspace, save, 4), "-q"])  # -q after the subcommand
    assert res.exit_code == 0, res.stderr
    assert not INFO_LINE.search(res.stderr), res.stderr
    log = (save / "train.log").read_text().splitlines()
    manifest = hashlib.sha256((workspace.data / "manifest.json").read_bytes()).hexdigest()
    assert log[0].endswith("=== mtkit train ===")
    head = "\n".join(log[:12])
    for needle in ("versions: mtkit", "torch", "sentencepiece", "sacrebleu", "command: ", "host: ", "cpu: ",
                   "gpus: ", "world size: 1", "seed: 1", f"data manifest sha256: {manifest}"):
        assert needle in head, needle
    assert any("stopped at update 4" in line for line in log)

    prov = load_checkpoint(save / "checkpoint_last.pt")["provenance"]
    assert prov["data"]["manifest_sha256"] == manifest and prov["data"]["src_lang"] == "en"
    assert prov["config"] == load_config(save / "config.yaml").to_dict()
    assert prov["world_size"] == 1 and prov["versions"]["mtkit"]

    res = cli(["info", save / "checkpoint_last.pt"])
    assert res.exit_code == 0, res.stderr
    assert "parameters" in res.stdout and "languages: en -> de" in res.stdout and "vocabulary: source" in res.stdout
    assert f"data manifest sha256: {manifest}" in res.stdout and "config:" in res.stdout
    info = json.loads(cli(["info", save / "checkpoint_last.pt", "-f", "json"]).stdout)
    assert info["parameters"] > 0 and info["provenance"]["seed"] == 1

    res = cli([*train_args(workspace, save, 6), "--resume", "-q"])  # resuming appends
    assert res.exit_code == 0, res.stderr
    text = (save / "train.log").read_text()
    assert text.count("=== mtkit train ===") == 2 and "resumed from" in text


def test_info_of_a_checkpoint_without_provenance_and_of_a_bad_path(workspace, tmp_path):
    ckpt = random_checkpoint(tmp_path / "old.pt", load_spm(workspace.data)[0])
    res = cli(["info", ckpt])
    assert res.exit_code == 0 and "provenance: none recorded" in res.stdout
    res = cli(["-q", "info", tmp_path / "missing.pt"])
    error_line(res.stderr, res.exit_code, "missing.pt")


def test_dump_config_writes_nothing_and_feeds_back_through_c(workspace, tmp_path):
    save = tmp_path / "never"
    overrides = ["train.lr=0.002", "model.d_model=32", "decode.beam=3"]
    res = cli(["train", workspace.data, "-c", "transformer_tiny", "--save-dir", save, *sets(overrides), "--dump-config"])
    assert res.exit_code == 0, res.stderr
    assert not save.exists()
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(res.stdout)
    expected = load_config("transformer_tiny", overrides)
    assert load_config(dumped) == expected
    assert "tensorboard_dir" in res.stdout and "label_smoothing" in res.stdout  # every key
    again = cli(["train", workspace.data, "-c", dumped, "--save-dir", save, "--dump-config"])
    assert again.stdout == res.stdout == dump_config(expected)
    # the config.yaml a run writes repeats it
    assert load_config(workspace.ckpt_dir / "config.yaml") == load_config("transformer_tiny", TINY + ["train.max_updates=10"])


def test_presets_list_their_descriptions():
    res = cli(["presets"])
    assert res.exit_code == 0
    first = (ROOT / "mtkit" / "presets" / "transformer_tiny.yaml").read_text().splitlines()[0].lstrip("# ")
    assert "transformer_tiny  " in res.stdout and first in res.stdout
    assert len(res.stdout.splitlines()) == len(list((ROOT / "mtkit" / "presets").glob("*.yaml")))


# --- recipes by name --------------------------------------------------------------------------
def test_recipe_list_and_recipes_by_name(tmp_path, monkeypatch):
    res = cli(["recipe", "list"])
    assert res.exit_code == 0
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("multi30k_en_de_transformer "))
    assert "en-de" in line and "transformer" in line and "35 sacreBLEU" in line
    monkeypatch.chdir(tmp_path)  # no recipes/ here: the checkout path form still names the shipped one
    for name in ("multi30k_en_de_transformer", "recipes/multi30k_en_de_transformer.yaml"):
        res = cli(["recipe", "check", name])
        assert res.exit_code == 0, res.stderr
        assert json.loads(res.stdout)["recipe"] == "multi30k_en_de_transformer"
    res = cli(["-q", "recipe", "check", "multi30k_en_de_transfomer"])
    error_line(res.stderr, res.exit_code, "did you mean 'multi30k_en_de_transformer'")
    res = cli(["-q", "recipe", "run", "nope/x.yaml", "--workdir", tmp_path / "w"])
    error_line(res.stderr, res.exit_code, "nope/x.yaml")
    assert not (tmp_path / "w").exists()


# --- test sets by name ------------------------------------------------------------------------
@pytest.fixture()
def fake_multi30k(tmp_path, monkeypatch, workspace):
    """A local data dir laid out as the catalog expects, holding a tiny multi30k test set."""
    monkeypatch.setenv("MTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MTKIT_OFFLINE", "1")
    monkeypatch.delenv("MTKIT_DATA", raising=False)
    root = tmp_path / "m30k"
    root.mkdir()
    src = workspace.test_lines[:8]
    for lang, lines in (("en", src), ("de", [s.upper() for s in src])):
        (root / f"test_2016_flickr.{lang}").write_text("".join(x + "\n" for x in lines))
    return root


def test_score_by_test_set_name_equals_score_with_the_file(fake_multi30k, tmp_path):
    hyp = tmp_path / "hyp"
    hyp.write_text("".join(x.upper()[:-1] + "\n" for x in (fake_multi30k / "test_2016_flickr.en").read_text().splitlines()))
    by_file = cli(["score", "-r", fake_multi30k / "test_2016_flickr.de", "-i", hyp, "-m", "bleu", "chrf", "-f", "json"])
    by_name = cli(["score", "-t", "multi30k/test_2016_flickr", "-l", "en-de", "--data-dir", fake_multi30k, "-i", hyp,
                   "-m", "bleu", "chrf", "-f", "json"])
    assert by_file.exit_code == by_name.exit_code == 0, by_name.stderr

    def scores(res):
        return [(d["name"], d["score"], d["signature"]) for d in json.loads(res.stdout)]

    assert scores(by_name) == scores(by_file)
    for side, lang in (("src", "en"), ("ref", "de")):
        res = cli(["data", "get", "multi30k/test_2016_flickr", "-l", "en-de", "--side", side, "--data-dir", fake_multi30k])
        assert res.exit_code == 0 and res.stdout == (fake_multi30k / f"test_2016_flickr.{lang}").read_text()
    res = cli(["-q", "score", "-t", "multi30k/test_2016_flickr", "-i", hyp])
    error_line(res.stderr, res.exit_code, "-l/--langpair")
    res = cli(["-q", "data", "get", "multi30k/test_2016_flikr", "-l", "en-de"])
    error_line(res.stderr, res.exit_code, "did you mean 'test_2016_flickr'")
    res = cli(["-q", "data", "get", "multi30k/test_2016_flickr", "-l", "en-xx", "--data-dir", fake_multi30k])
    error_line(res.stderr, res.exit_code, "'xx'")


def test_evaluation_pipeline_in_one_line(fake_multi30k, workspace, tmp_path):
    m = f"{sys.executable} -m mtkit"
    line = (f"{m} data get multi30k/test_2016_flickr -l en-de --side src | {m} translate -m {workspace.ckpt} -q "
            f"| {m} score -t multi30k/test_2016_flickr -l en-de -f json")
    env = {**subprocess_env(), "MTKIT_DATA": str(fake_multi30k), "MTKIT_CACHE": os.environ["MTKIT_CACHE"]}
    res = subprocess.run(["bash", "-o", "pipefail", "-c", line], capture_output=True, text=True, env=env, timeout=300,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)[0]["name"] == "BLEU"


# --- n-best and the Python API ------------------------------------------------------------------
def test_nbest_file_has_four_fields_and_zero_based_ids(workspace, tmp_path):
    inp = tmp_path / "in.en"
    lines = workspace.test_lines[:5]
    lines[2] = ""
    inp.write_text("".join(x + "\n" for x in lines))
    out = tmp_path / "out.nbest"
    res = cli(["translate", "-m", workspace.ckpt, "-i", inp, "-o", out, "--beam", "3", "--nbest", "3",
               "--output-format", "nbest", "--device", "cpu"])
    assert res.exit_code == 0, res.stderr
    rows = [ln.split(" ||| ") for ln in out.read_text().splitlines()]
    assert all(len(r) == 4 for r in rows)
    ids = [int(r[0]) for r in rows]
    assert ids == sorted(ids) and set(ids) == set(range(5))
    assert [ids.count(i) for i in range(5)] == [3, 3, 1, 3, 3]
    for r in rows:
        name, value = r[2].split(" ")
        assert name == "F0=" and float(value) <= 0 and float(r[3]) <= 0


def test_python_api_gives_the_strings_of_the_command_line(workspace, tmp_path):
    from mtkit import Translator, score

    ckpt = random_checkpoint(tmp_path / "r.pt", load_spm(workspace.data)[0], overrides=["decode.max_len_b=6"])
    lines = workspace.test_lines[:12] + [""]
    inp = tmp_path / "in.en"
    inp.write_text("".join(x + "\n" for x in lines))
    res = cli(["translate", "-m", ckpt, "-i", inp, "--beam", "3", "--device", "cpu"])
    assert res.exit_code == 0, res.stderr
    tr = Translator.load(ckpt, device="cpu", dtype="float32")
    hyps = tr.translate(lines, beam=3)
    assert hyps == res.stdout.split("\n")[:-1]
    nbest = tr.translate(lines, beam=3, nbest=2)
    assert [n[0][0] if n else "" for n in nbest] == hyps
    assert all(len(n) == 2 and n[0][1] >= n[1][1] for n in nbest[:-1]) and nbest[-1] == []
    ref = tmp_path / "ref"
    ref.write_text("".join(x.upper() + "\n" for x in lines))
    by_cli = json.loads(cli(["score", "-r", ref, "-i", "-", "-m", "bleu", "chrf", "-f", "json"],
                            input=res.stdout).stdout)
    by_api = score(hyps, [x.upper() for x in lines], metrics=["bleu", "chrf"])
    assert [(d["name"], d["score"]) for d in by_api] == [(d["name"], d["score"]) for d in by_cli]


def test_import_mtkit_stays_light():
    code = "import sys, mtkit; assert 'torch' not in sys.modules and 'sacrebleu' not in sys.modules; mtkit.Translator"
    subprocess.run([sys.executable, "-c", code], check=True, env=subprocess_env(), cwd=ROOT, timeout=120)


# --- curves -----------------------------------------------------------------------------------
def test_plot_draws_a_training_runs_curves(workspace, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    res = cli(["plot", workspace.ckpt_dir / "metrics.jsonl", "-o", out])
    assert res.exit_code == 0, res.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = cli(["-q", "plot", tmp_path / "none.jsonl", "-o", out])
    error_line(res.stderr, res.exit_code, "none.jsonl")


def test_tensorboard_dir(workspace, tmp_path):
    save, events = tmp_path / "ck", tmp_path / "tb"
    res = cli([*train_args(workspace, save, 2), "--set", f"train.tensorboard_dir={events}", "-q"])
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        error_line(res.stderr, res.exit_code, "tensorboard")
        assert not save.exists()
        return
    assert res.exit_code == 0, res.stderr
    assert any(p.name.startswith("events.out.tfevents") for p in events.iterdir())


# --- conventions ------------------------------------------------------------------------------
def test_version_names_torch_and_sacrebleu():
    import sacrebleu
    import torch

    res = cli(["--version"])
    assert res.exit_code == 0
    assert res.stdout.startswith("mtkit 0.1.0") and f"torch {torch.__version__}" in res.stdout
    assert f"sacrebleu {sacrebleu.__version__}" in res.stdout


def test_log_level_from_the_environment(workspace, tmp_path, monkeypatch):
    args = ["translate", "-m", workspace.ckpt, "--device", "cpu"]
    assert INFO_LINE.search(cli(args, input="a man\n").stderr)
    monkeypatch.setenv("MTKIT_LOG_LEVEL", "warning")
    assert not INFO_LINE.search(cli(args, input="a man\n").stderr)
    monkeypatch.setenv("MTKIT_LOG_LEVEL", "loud")
    res = cli(args, input="a man\n")
    error_line(res.stderr, res.exit_code, "MTKIT_LOG_LEVEL")


def commands(group=main, prefix=()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name)


@pytest.mark.parametrize("command", list(commands()), ids=" ".join)
def test_every_command_help_ends_with_examples(command):
    res = cli([*command, "--help"])
    assert res.exit_code == 0
    examples = res.stdout.split("Examples:")[-1].strip().splitlines()
    assert "Examples:" in res.stdout and 2 <= len([x for x in examples if "mtkit " in x]) <= 3
    assert "-q, --quiet" in res.stdout


# --- a plain install ships the recipes --------------------------------------------------------
@pytest.mark.slow
def test_plain_pip_install_ships_the_recipes(tmp_path):
    venv = tmp_path / "venv"
    # no pip of its own: the system's pip and setuptools (a venv's bundled setuptools may be too
    # old to build a wheel without the wheel package) install into the venv
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    source = tmp_path / "source"  # pip builds in the tree: a copy keeps the checkout free of build/
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "cache"))
    build = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(source)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )
    if build.returncode != 0:
        why = [ln.strip() for ln in build.stderr.splitlines() if "error" in ln.lower()] or ["pip failed"]
        pytest.skip(f"cannot build the package here: {why[0]}")
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}

    def mtkit(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([venv / "bin" / "mtkit", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120)

    where = subprocess.run([python, "-c", "import mtkit; print(mtkit.__file__)"], capture_output=True, text=True,
                           env=env, cwd=tmp_path, check=True).stdout
    assert str(venv) in where, where  # the installed copy, not the checkout
    listed = mtkit("recipe", "list")
    assert listed.returncode == 0 and "multi30k_en_de_transformer" in listed.stdout, listed.stderr
    checked = mtkit("recipe", "check", "multi30k_en_de_transformer")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["ok"] is True

"""The click layer's option handling: help, usage errors, option checks, error mapping and what
it hands to the library (library calls are replaced by recorders: nothing here trains or decodes)."""

from __future__ import annotations

import errno
import signal
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from helpers import cli, error_line

from mtkit.cli import main
from mtkit.errors import MtkitError
from mtkit.signals import Interrupted


def commands(group: click.Group = main, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and subgroup below ``group``, as argv prefixes."""
    found: list[tuple[str, ...]] = []
    for name, cmd in group.commands.items():
        found.append((*path, name))
        if isinstance(cmd, click.Group):
            found += commands(cmd, (*path, name))
    return found


def leaf(argv: tuple[str, ...]) -> click.Command:
    cmd: click.Command = main
    for name in argv:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    return cmd


class Recorder:
    """Stands in for a library function: records its arguments and returns ``result``."""

    def __init__(self, result: Any = None):
        self.result = result
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        return self.result


# --- help ----------------------------------------------------------------------------------------
def test_every_command_is_listed():
    names = {argv for argv in commands()}
    for expected in ("preprocess", "train", "translate", "score", "average", "recipe", "data", "info", "presets",
                     "plot", "export", ("recipe", "run"), ("recipe", "check"), ("recipe", "list"), ("data", "get")):
        assert (expected,) in names or expected in names, expected


@pytest.mark.parametrize("argv", commands(), ids=" ".join)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_of_every_command(argv, flag):
    res = cli([*argv, flag])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(f"Usage: main {' '.join(argv)} ")
    assert res.stderr == ""
    if not isinstance(leaf(argv), click.Group):
        assert "Examples:" in res.stdout  # every command shows real invocations
        for option in ("--verbose", "--quiet", "--debug"):  # -q / -v / --debug also after the name
            assert option in res.stdout


def test_top_level_help_and_version():
    res = cli(["--help"])
    assert res.exit_code == 0 and "translate" in res.stdout and "MTKIT_LOG_LEVEL" in res.stdout
    res = cli(["--version"])
    assert res.exit_code == 0
    for package in ("mtkit", "torch", "sentencepiece", "sacrebleu"):
        assert package in res.stdout
    assert len(res.stdout.strip().splitlines()) == 1


# --- usage errors: click's message naming the option, exit 2 ---------------------------------------
@pytest.mark.parametrize("args,option", [
    (["train", "d", "-c", "transformer_tiny", "--save-dir", "s", "--device", "gpu"], "--device"),
    (["train", "d", "-c", "transformer_tiny", "--save-dir", "s", "--nproc", "two"], "--nproc"),
    (["translate", "-m", "x.pt", "--beam", "five"], "--beam"),
    (["translate", "-m", "x.pt", "--lenpen", "gnmt2"], "--lenpen"),
    (["translate", "-m", "x.pt", "--output-format", "xml"], "--output-format"),
    (["preprocess", "-s", "en", "-t", "de", "--train", "c", "-o", "d", "--model-type", "word"], "--model-type"),
    (["score", "-r", "ref", "--paired-bs-n", "0"], "--paired-bs-n"),
    (["score", "-r", "ref", "-w", "11"], "--width"),
    (["average", "ckpt", "--last", "0", "-o", "avg.pt"], "--last"),
    (["data", "get", "multi30k/test_2016_flickr", "-l", "en-de", "--side", "both"], "--side"),
])
def test_bad_option_values_are_usage_errors(args, option):
    res = cli(args)
    assert res.exit_code == 2
    assert "Traceback" not in res.stderr
    error = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and option in error[0], res.stderr


@pytest.mark.parametrize("args,option", [
    (["train", "d", "--save-dir", "s"], "--config"),
    (["translate"], "--model"),
    (["preprocess", "-s", "en", "-t", "de", "-o", "d"], "--train"),
    (["average", "a.pt"], "--output"),
    (["data", "get", "multi30k/test_2016_flickr"], "--langpair"),
])
def test_missing_required_options_are_usage_errors(args, option):
    res = cli(args)
    assert res.exit_code == 2 and "Missing option" in res.stderr and option in res.stderr


# --- option checks in the click layer: one `error:` line, exit 1, before any work --------------------
@pytest.mark.parametrize("args,needles", [
    (["score", "-t", "multi30k/test_2016_flickr", "-i", "h"], ["-t/--test-set needs -l/--langpair"]),
    (["score", "-r", "ref", "-l", "ende"], ["'ende'", "SRC-TGT"]),
    (["score", "-r", "ref", "-l", "en-de-fr"], ["'en-de-fr'", "SRC-TGT"]),
    (["score", "-i", "hyp"], ["no reference given"]),
    (["score", "-r", "ref", "-s", "a", "-s", "b", "--paired-bs", "--paired-ar"], ["--paired-bs", "--paired-ar"]),
    (["score", "-r", "ref", "stray"], ["unexpected argument 'stray'"]),
    (["average", "a_dir", "b_dir", "--last", "2", "-o", "avg.pt"], ["--last/--best", "one checkpoint directory"]),
    (["average", "a_dir", "b_dir", "--best", "2", "-o", "avg.pt"], ["--last/--best"]),
])
def test_option_conflicts_are_one_line_errors(monkeypatch, args, needles):
    import mtkit.average
    import mtkit.scoring

    work = Recorder()
    monkeypatch.setattr(mtkit.scoring, "score_files", work)
    monkeypatch.setattr(mtkit.average, "average_checkpoints", work)
    res = cli(["-q", *args])
    error_line(res.stderr, res.exit_code, *needles)
    assert res.exit_code == 1
    assert res.stdout == ""
    assert work.calls == []  # refused before scoring or averaging anything


def test_train_negative_nproc_is_one_line_error(tmp_path):
    res = cli(["-q", "train", tmp_path / "data", "-c", "transformer_tiny", "--save-dir", tmp_path / "s", "--nproc", "-2"])
    error_line(res.stderr, res.exit_code, "--nproc must be positive, got -2")
    assert not (tmp_path / "s").exists()


def test_train_dump_config_applies_overrides_and_writes_nothing(tmp_path):
    save = tmp_path / "s"
    res = cli(["train", tmp_path / "no-data", "-c", "transformer_tiny", "--save-dir", save,
               "--set", "train.lr=0.25", "--set", "decode.beam=7", "--dump-config"])
    assert res.exit_code == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)
    assert cfg["train"]["lr"] == 0.25 and cfg["decode"]["beam"] == 7 and cfg["model"]["arch"] == "transformer"
    assert not save.exists()


# --- what the click layer hands to the library -------------------------------------------------------
def test_translate_passes_only_the_decode_options_given(monkeypatch, tmp_path):
    """Decode options left out stay out, so the checkpoint's decode section supplies them."""
    import mtkit.decoding.translate

    stats = {"lines": 0, "skipped": 0, "seconds": 1.0, "sentences_per_s": 0.0, "tgt_tokens_per_s": 0.0}
    run = Recorder(stats)
    monkeypatch.setattr(mtkit.decoding.translate, "translate_file", run)
    assert cli(["translate", "-m", "a.pt", "-m", "b.pt"]).exit_code == 0
    args, kwargs = run.calls[-1]
    assert args == (["a.pt", "b.pt"], "-", "-")
    assert kwargs["decode_overrides"] == {}
    assert kwargs["device"] == "auto" and kwargs["output_format"] == "text" and kwargs["resume"] is False
    assert kwargs["temperature"] == 1.0 and kwargs["topk"] == 0 and kwargs["topp"] == 1.0
    assert kwargs["batch_size"] is None and kwargs["max_tokens"] is None
    for key in ("beam", "nbest", "length_penalty", "alpha", "min_len", "stopping"):
        assert key not in kwargs  # decode keys travel only inside decode_overrides

    res = cli(["translate", "-m", "a.pt", "--beam", "3", "--lenpen", "gnmt", "--alpha", "0.6", "--min-len", "0",
               "-i", tmp_path / "in", "-o", tmp_path / "out", "--output-format", "jsonl", "--resume"])
    assert res.exit_code == 0, res.stderr
    args, kwargs = run.calls[-1]
    assert args == (["a.pt"], str(tmp_path / "in"), str(tmp_path / "out"))
    assert kwargs["decode_overrides"] == {"beam": 3, "length_penalty": "gnmt", "alpha": 0.6, "min_len": 0}
    assert kwargs["output_format"] == "jsonl" and kwargs["resume"] is True


def test_score_hands_over_metrics_systems_and_the_chosen_test(monkeypatch):
    import mtkit.scoring

    run = Recorder([])
    monkeypatch.setattr(mtkit.scoring, "score_files", run)
    monkeypatch.setattr(mtkit.scoring, "format_results", lambda results, fmt, width: f"{fmt} {width}")
    res = cli(["score", "-r", "r1", "-r", "r2", "-m", "bleu", "chrf", "-s", "a", "-s", "b", "--paired-ar",
               "--paired-ar-n", "50", "-l", "en-de", "-w", "2", "-f", "json"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout == "json 2\n"
    (hyp, refs, metrics), kwargs = run.calls[-1]
    assert hyp is None and refs == ("r1", "r2") and metrics == ("bleu", "chrf")
    assert kwargs["systems"] == ("a", "b") and kwargs["paired"] == "ar" and kwargs["paired_n"] == 50
    assert kwargs["lang"] == "de" and kwargs["width"] == 2
    cli(["score", "-r", "r1", "-s", "a", "-s", "b", "--paired-bs"])
    assert run.calls[-1][1]["paired"] == "bs" and run.calls[-1][1]["paired_n"] == 1000  # its own default
    cli(["score", "-r", "r1"])
    assert run.calls[-1][0][0] == "-" and run.calls[-1][1]["paired"] is None  # stdin, no test


def test_preprocess_splits_the_user_defined_symbols(monkeypatch):
    import mtkit.data.preprocess

    run = Recorder({"splits": {"train": 1}, "filters": {}, "other": 1})
    monkeypatch.setattr(mtkit.data.preprocess, "preprocess", run)
    res = cli(["preprocess", "-s", "en", "-t", "de", "--train", "c", "-o", "d", "--user-defined-symbols", "<a>,,<b>",
               "--separate"])
    assert res.exit_code == 0, res.stderr
    assert yaml.safe_load(res.stdout) == {"splits": {"train": 1}, "filters": {}}  # only these two keys
    kwargs = run.calls[-1][1]
    assert kwargs["user_defined_symbols"] == ["<a>", "<b>"] and kwargs["joint"] is False
    assert kwargs["vocab_size"] == 8000 and kwargs["model_type"] == "bpe" and kwargs["max_ratio"] == 3.0


# --- errors from the library: one line, the right exit status; --debug re-raises ---------------------
def fail_presets(monkeypatch, exc: BaseException) -> None:
    import mtkit.config

    def raise_it() -> None:
        raise exc

    monkeypatch.setattr(mtkit.config, "preset_descriptions", raise_it)


@pytest.mark.parametrize("exc,code,needles", [
    (MtkitError("the library refused"), 1, ["error: the library refused"]),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "corpus/train.en"), 1,
     ["No such file or directory: corpus/train.en"]),
    (KeyboardInterrupt(), 130, ["error: interrupted"]),
    (Interrupted(signal.SIGTERM), 143, ["stopped by SIGTERM"]),
])
def test_library_errors_become_one_line_and_an_exit_status(monkeypatch, exc, code, needles):
    fail_presets(monkeypatch, exc)
    res = cli(["presets"])
    error_line(res.stderr, res.exit_code, *needles)
    assert res.exit_code == code


def test_broken_pipe_is_not_an_error(monkeypatch):
    fail_presets(monkeypatch, BrokenPipeError())
    assert cli(["presets"]).exit_code == 0


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_before_or_after_the_command_reraises(monkeypatch, where):
    fail_presets(monkeypatch, MtkitError("the library refused"))
    res = cli(["--debug", "presets"] if where == "before" else ["presets", "--debug"])
    assert isinstance(res.exception, MtkitError) and "error:" not in res.stderr


@pytest.mark.parametrize("flag", ["-q", "-v"])
def test_verbosity_flags_work_after_the_command(flag):
    res = cli(["presets", flag])
    assert res.exit_code == 0 and "transformer_tiny" in res.stdout


def test_presets_lists_every_preset_file():
    res = cli(["presets"])
    shipped = {p.stem for p in (Path(__file__).parents[1] / "mtkit" / "presets").glob("*.yaml")}
    listed = {line.split()[0] for line in res.stdout.splitlines()}
    assert listed == shipped

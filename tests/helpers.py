"""Shared pieces of the reliability tests: a tiny generated corpus, a preprocessed data dir,
a briefly trained tiny Transformer, and ways to run the command line (in process or as a
real subprocess) and check its error output."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from mtkit.checkpoint import build_payload, save_checkpoint, subword_entries
from mtkit.cli import main
from mtkit.config import load_config
from mtkit.data.preprocess import preprocess
from mtkit.models import build_model

WORDS = "a man woman dog is are riding walking on the in bike street park red blue small big".split()

# A very small Transformer that trains in well under a second per few updates on one CPU thread.
TINY = [
    "model.d_model=16", "model.ffn_dim=32", "model.heads=2", "model.encoder_layers=1",
    "model.decoder_layers=1", "model.dropout=0.1", "train.num_threads=1", "train.max_tokens=128",
    "train.warmup_updates=4", "train.lr=0.003", "train.log_interval=1", "train.valid_bleu=false",
    "train.validate_interval_updates=5", "train.save_interval_updates=5", "train.keep_last=3",
    "decode.beam=1", "decode.max_len_a=0", "decode.max_len_b=4",
]

torch.set_num_threads(1)  # the tests share two cores; tiny models gain nothing from more

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d \| [A-Z]+ \| mtkit")


def sentences(n: int, seed: int, words: list[str] = WORDS) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) for _ in range(n)]


def write_lines(path: Path, lines: list[str], newline: str = "\n", bom: bool = False) -> Path:
    data = "".join(line + newline for line in lines).encode("utf-8")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return path


def write_pair(prefix: Path, src: list[str], tgt: list[str] | None = None) -> Path:
    """Write PREFIX.en and PREFIX.de (the target is the upper-cased source by default)."""
    write_lines(Path(f"{prefix}.en"), src)
    write_lines(Path(f"{prefix}.de"), tgt if tgt is not None else [s.upper() for s in src])
    return prefix


@dataclass
class Workspace:
    root: Path
    corpus: Path  # holds train/valid/test .en/.de
    data: Path  # preprocessed data dir
    ckpt_dir: Path  # a finished 10-update training run
    ckpt: Path  # its checkpoint_last.pt
    test_lines: list[str]


_CACHE: dict[str, Workspace] = {}


def build_workspace(root: Path) -> Workspace:
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    write_pair(corpus / "train", sentences(200, 0))
    write_pair(corpus / "valid", sentences(12, 1))
    test_lines = sentences(30, 2)
    write_pair(corpus / "test", test_lines)
    data = root / "data"
    preprocess("en", "de", corpus / "train", data, valid_prefix=corpus / "valid",
               test_prefixes=[corpus / "test"], vocab_size=60, workers=1)
    ckpt_dir = root / "ckpt"
    res = cli(["train", str(data), "-c", "transformer_tiny", "--save-dir", str(ckpt_dir), "--device", "cpu",
               *sets(TINY + ["train.max_updates=10"])])
    assert res.exit_code == 0, res.stderr
    return Workspace(root, corpus, data, ckpt_dir, ckpt_dir / "checkpoint_last.pt", test_lines)


def get_workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """Built once per test session, whichever module asks first."""
    if "ws" not in _CACHE:
        _CACHE["ws"] = build_workspace(tmp_path_factory.mktemp("workspace"))
    return _CACHE["ws"]


def sets(overrides: list[str]) -> list[str]:
    out: list[str] = []
    for item in overrides:
        out += ["--set", item]
    return out


def random_checkpoint(path: Path, spm, arch: str = "transformer", overrides: list[str] = (), seed: int = 0) -> Path:
    """An untrained but complete inference checkpoint (no optimizer state)."""
    preset = {"transformer": "transformer_tiny", "lstm": "lstm_tiny"}[arch]
    cfg = load_config(preset, list(overrides))
    torch.manual_seed(seed)
    model = build_model(cfg.model, spm.size, spm.size, spm.pad)
    save_checkpoint(path, build_payload(cfg.to_dict(), model.state_dict(), **subword_entries(spm, spm)))
    return path


# --- running the command line ----------------------------------------------------------------
def cli(args: list[str], input: str | bytes | None = None) -> Result:
    """``mtkit ARGS`` in this process; ``result.stdout`` / ``result.stderr`` are separate."""
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def run_mtkit(args: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``python -m mtkit ARGS`` as a real process (exit status and stderr as a user sees them)."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.run([sys.executable, "-m", "mtkit", *map(str, args)], text=True, env=subprocess_env(),
                          timeout=timeout, **kwargs)


def popen_mtkit(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mtkit", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env(), **kwargs)


def error_line(stderr: str, exit_code: int, *needles: str) -> str:
    """Check the user-facing failure shape and return the error line.

    Non-zero exit; no traceback; exactly one ``error:`` line, which is the last line and names
    every needle; any other stderr line is a log record (the tests run with ``-q``, so only
    warnings/errors can appear there)."""
    assert exit_code != 0, f"expected a failure, got exit 0; stderr: {stderr}"
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, f"expected one error line: {stderr!r}"
    assert lines[-1] == errors[0], stderr
    others = [ln for ln in lines[:-1] if not LOG_LINE.match(ln)]
    assert not others, f"stray stderr lines: {others}"
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not named in {errors[0]!r}"
    return errors[0]


def line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0

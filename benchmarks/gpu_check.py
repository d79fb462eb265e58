"""One prepared check that mtkit's GPU promises hold: batched beam search, AMP training and DDP on CUDA.

    bash benchmarks/gpu_check.sh                  # on a CUDA machine: every check, about 7 minutes
    bash benchmarks/gpu_check.sh --device cpu     # the same script end to end on a CPU, tiny sizes

(``gpu_check.sh`` puts this checkout on PYTHONPATH, copies the Multi30k files and installs an
optional ctranslate2 wheel, all offline, then calls this script with the same options.)

The checks, in order; each runs in its own process under a time limit, and the whole run under
``--budget`` seconds:

- ``environment``: Python packages, torch, the device (a CUDA matmul), NCCL version;
- ``data``: Multi30k En-De preprocessed (joint BPE), test_2016_flickr set aside;
- ``cuda_tests``: ``pytest -m cuda tests/test_cuda.py`` (alongside the next two checks);
- ``train_transformer``: a Multi30k Transformer trained for the decoding checks (bf16 on CUDA);
- ``decode_match``: greedy and beam 5 in float32 give the same lines on CUDA as on the CPU
  (>= 99% of test_2016_flickr), bfloat16 and float16 within 0.3 BLEU of float32 (CUDA only);
- ``train_speed``: ``transformer_base``-sized training, target tokens/s in bf16 and fp16 (with
  loss scaling), peak GPU memory;
- ``decode_speed``: beam 5 sentences/s and pieces/s at several batch sizes and dtypes, peak memory;
- ``ct2_speed``: the same decode through the CTranslate2 export (float16 / int8_float16 on CUDA),
  with the ratio; skipped when ctranslate2 is not installed;
- ``rnn_families``: each recurrent family trains 50 updates (bf16 on CUDA) and decodes;
- ``ddp``: ``torchrun --nproc-per-node 1`` trains, resumes and matches a single process; two
  ranks on the one device (NCCL on a GPU if it allows it, else said) match one process with
  ``update_freq 2``;
- ``oom_backoff``: a translate batch forced past a GPU memory limit splits and finishes (CUDA only).

Every check prints one JSON line on stdout, ``{"check", "status": pass|fail|skip, "seconds",
"summary", "reason", "figures", "device"}``; a failing check never stops the others, and a check
whose prerequisite did not pass is skipped with that reason. A summary table follows. The JSON
lines go to ``OUT_DIR/results.jsonl``, the table to ``OUT_DIR/summary.txt`` and each check's log
to ``OUT_DIR/logs/``. The exit status is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
STORE = REPO / "gpu_check"  # git-ignored: the Multi30k copy and optional wheels travel in it
SPLITS = ("train", "val", "test_2016_flickr")
LANGS = ("en", "de")
AS_RANK = "--as-rank-on-device-0"  # internal: run `mtkit ARGS` as a torchrun rank on device 0
MIN_START_S = 10.0  # a check is not started with less time than this left in the budget
MiB, GiB = 2**20, 2**30

# every training run of the checks: no validation BLEU, no checkpoints but the last
QUIET_TRAIN = (
    "train.valid_bleu=false", "train.validate_interval_updates=1000000",
    "train.save_interval_updates=1000000", "train.keep_last=1", "train.patience=0",
)


# --- sizes ----------------------------------------------------------------------------------------
@dataclass
class Plan:
    """The sizes of one run: the full check on a GPU, tiny ones on a CPU."""

    budget_s: float
    vocab_size: int
    train_lines: int  # training pairs read (0: all)
    test_lines: int  # test_2016_flickr lines decoded
    model_preset: str  # the model every decoding check uses
    model_overrides: list[str]
    speed_preset: str
    speed_overrides: list[str]
    speed_amps: list[str]
    speed_warmup: int
    speed_updates: int
    speed_seconds: float  # per amp mode, at most
    decode_settings: list[tuple[str, int]]  # (dtype, sentences per batch), beam 5
    ct2_batch: int
    ct2_quantizations: list[str]
    ct2_mtkit_dtypes: list[str]
    rnn_presets: list[str]
    rnn_updates: int
    rnn_amp: str
    rnn_decode_lines: int
    ddp_overrides: list[str]
    ddp_updates: int  # the straight run; the resumed one stops half way first
    ddp_run_timeout_s: float
    two_rank_timeout_s: float
    limits: dict[str, float] = field(default_factory=dict)  # seconds per check


PLANS = {
    "cuda": Plan(
        budget_s=450, vocab_size=8000, train_lines=0, test_lines=1000,
        model_preset="transformer_small",
        model_overrides=["train.max_tokens=8192", "train.pass_tokens=0", "train.amp=bf16",
                         "train.max_time_minutes=0.75", "train.max_updates=100000", "train.log_interval=100"],
        speed_preset="transformer_base",
        speed_overrides=["train.max_tokens=8192", "train.update_freq=1", "train.pass_tokens=0"],
        speed_amps=["bf16", "fp16"], speed_warmup=5, speed_updates=100, speed_seconds=12,
        decode_settings=[("float32", 16), ("float32", 64), ("float32", 256), ("float32", 1000),
                         ("bfloat16", 64), ("bfloat16", 256), ("float16", 256)],
        ct2_batch=64, ct2_quantizations=["float16", "int8_float16"], ct2_mtkit_dtypes=["float32", "float16"],
        rnn_presets=["lstm_small", "bahdanau_small", "luong_small", "gnmt_small"], rnn_updates=50, rnn_amp="bf16",
        rnn_decode_lines=200,
        ddp_overrides=["train.max_tokens=2048"], ddp_updates=20, ddp_run_timeout_s=90, two_rank_timeout_s=60,
        limits={"environment": 60, "data": 90, "cuda_tests": 180, "train_transformer": 120, "decode_match": 90,
                "train_speed": 90, "decode_speed": 75, "ct2_speed": 75, "rnn_families": 100, "ddp": 180,
                "oom_backoff": 60},
    ),
    "cpu": Plan(
        budget_s=480, vocab_size=2000, train_lines=3000, test_lines=100,
        model_preset="transformer_tiny",
        model_overrides=["train.max_tokens=1024", "train.amp=none", "train.max_updates=40", "train.log_interval=10"],
        speed_preset="transformer_tiny",
        speed_overrides=["train.max_tokens=1024", "train.update_freq=1"],
        speed_amps=["bf16"], speed_warmup=2, speed_updates=8, speed_seconds=30,
        decode_settings=[("float32", 16), ("float32", 64), ("bfloat16", 64)],
        ct2_batch=32, ct2_quantizations=["float32", "int8"], ct2_mtkit_dtypes=["float32"],
        rnn_presets=["lstm_tiny", "bahdanau_tiny", "luong_tiny", "gnmt_tiny"], rnn_updates=20, rnn_amp="none",
        rnn_decode_lines=30,
        ddp_overrides=["train.max_tokens=256"], ddp_updates=8, ddp_run_timeout_s=150, two_rank_timeout_s=150,
        limits={"environment": 60, "data": 120, "cuda_tests": 150, "train_transformer": 150, "decode_match": 60,
                "train_speed": 150, "decode_speed": 150, "ct2_speed": 150, "rnn_families": 240, "ddp": 420,
                "oom_backoff": 60},
    ),
}


@dataclass
class Ctx:
    """What every check knows: the device, where the data and the work files are, the sizes."""

    device: str
    data_dir: Path  # the raw Multi30k files (PREFIX.LANG or PREFIX.LANG.gz)
    work: Path  # preprocessed data, checkpoints, outputs
    logs: Path  # per-check and per-process logs (returned with the results)
    plan: Plan

    @property
    def prep(self) -> Path:
        return self.work / "data"

    @property
    def model_dir(self) -> Path:
        return self.work / "model"

    @property
    def ckpt(self) -> Path:
        return self.model_dir / "checkpoint_last.pt"

    @property
    def test_src(self) -> Path:
        return self.work / "test.en"

    @property
    def test_ref(self) -> Path:
        return self.work / "test.de"

    def save(self, path: Path) -> None:
        d = {"device": self.device, "data_dir": str(self.data_dir), "work": str(self.work), "logs": str(self.logs),
             "plan": dataclasses.asdict(self.plan)}
        path.write_text(json.dumps(d, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Ctx:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        plan = d["plan"]
        plan["decode_settings"] = [tuple(x) for x in plan["decode_settings"]]
        return cls(d["device"], Path(d["data_dir"]), Path(d["work"]), Path(d["logs"]), Plan(**plan))


# --- results --------------------------------------------------------------------------------------
def passed(summary: str, **figures: Any) -> dict[str, Any]:
    return {"status": "pass", "summary": summary, "figures": figures}


def failed(reason: str, **figures: Any) -> dict[str, Any]:
    return {"status": "fail", "reason": reason, "figures": figures}


def skipped(reason: str, **figures: Any) -> dict[str, Any]:
    return {"status": "skip", "reason": reason, "figures": figures}


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    text = str(exc).strip() if not isinstance(exc, BaseException) else f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else ""
    return first[:limit]


def tail(text: str, lines: int = 6, limit: int = 600) -> str:
    kept = [ln for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return " | ".join(kept)[-limit:]


# --- small helpers for the checks -----------------------------------------------------------------
def child_env() -> dict[str, str]:
    """The environment of every process started here: this checkout importable, unbuffered output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    path = env.get("PYTHONPATH", "")
    if str(REPO) not in path.split(os.pathsep):
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([path] if path else [])])
    return env


def run_proc(cmd: list[str], log: Path, timeout: float) -> tuple[int | None, str]:
    """Run ``cmd`` with its output in ``log``; (exit status, or None after a timeout; the output).

    The process stays in this process group, so stopping a check stops it too; on its own
    timeout it gets SIGTERM first (torchrun then stops its ranks), SIGKILL 15 s later."""
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=child_env())
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            code = None
    return code, log.read_text(encoding="utf-8", errors="replace")


def read_lines(path: Path) -> list[str]:
    """The lines of a text file written one per line (no other line breaks are split on)."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def write_lines(path: Path, lines: list[str]) -> Path:
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return Path(path)


def head(path: Path, n: int) -> list[str]:
    from mtkit.data.text import iter_lines

    return list(itertools.islice(iter_lines(path), n)) if n > 0 else list(iter_lines(path))


def same_share(a: list[str], b: list[str]) -> float:
    """Share of identical lines (0 when the line counts differ)."""
    if len(a) != len(b) or not a:
        return 0.0
    return round(sum(x == y for x, y in zip(a, b)) / len(a), 4)


def bleu(hyps: list[str], refs: list[str]) -> float:
    import sacrebleu

    return round(sacrebleu.corpus_bleu(hyps, [refs[: len(hyps)]]).score, 2)


def sets(overrides: list[str]) -> list[str]:
    out: list[str] = []
    for item in overrides:
        out += ["--set", item]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> dict[str, float]:
    """Peak GPU memory since the last :func:`reset_peak` (on a CPU: the process's peak RSS)."""
    if device == "cuda":
        import torch

        return {"peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / GiB, 3),
                "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 3)}
    import resource

    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def release(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def decode(ctx: Ctx, src: Path, out: Path, *, model: Path | None = None, device: str | None = None,
           dtype: str = "float32", beam: int = 5, batch_size: int | None = None, max_tokens: int | None = None,
           engine: str = "torch", length_penalty: str | None = None) -> dict[str, Any]:
    """``mtkit translate`` of ``src`` into ``out`` (one buffer, so batches are the same on every
    device); returns its stats (sentences/s, target pieces/s, batches, oom_splits, ...)."""
    from mtkit.decoding.translate import translate_file

    overrides: dict[str, Any] = {"beam": beam, "nbest": 1}
    if length_penalty is not None:
        overrides["length_penalty"] = length_penalty
    size = {"batch_size": batch_size} if batch_size else {"max_tokens": max_tokens or 4000}
    n = len(read_lines(src))
    return translate_file([str(model or ctx.ckpt)], src, out, device=device or ctx.device, dtype=dtype, engine=engine,
                          buffer_lines=n + 1, decode_overrides=overrides, **size)


def endless_batches(trainer: Any):
    """The trainer's batches, epoch after epoch, ``update_freq`` at a time."""
    while True:
        chunk = []
        while len(chunk) < trainer.train_cfg.update_freq:
            b = trainer.batches.next_batch()
            if b is None:
                trainer.batches.next_epoch()
                continue
            chunk.append(b)
        yield chunk


def time_updates(trainer: Any, warmup: int, updates: int, seconds: float) -> dict[str, Any]:
    """``warmup`` untimed updates, then up to ``updates`` timed ones (or ``seconds``): target
    tokens/s over the wall-clock time of the training steps."""
    device = trainer.device.type
    batches = endless_batches(trainer)
    for _ in range(warmup):
        trainer.train_step(next(batches))
    sync(device)
    tokens = done = not_applied = 0
    last_loss = None
    start = time.perf_counter()
    while done < updates and time.perf_counter() - start < seconds:
        stats = trainer.train_step(next(batches))
        done += 1
        if stats is None:  # non-finite loss: skipped
            not_applied += 1
            continue
        tokens += stats["ntok"]
        last_loss = stats["loss"] / max(stats["ntok"], 1)
        if not math.isfinite(stats["gnorm"]):  # fp16 overflow: the grad scaler skipped the step
            not_applied += 1
    sync(device)
    wall = time.perf_counter() - start
    return {
        "updates": done, "tgt_tokens": tokens, "seconds": round(wall, 2),
        "tgt_tokens_per_s": round(tokens / wall, 1) if wall > 0 else 0.0,
        "s_per_update": round(wall / max(done, 1), 4), "tgt_tokens_per_update": round(tokens / max(done, 1), 1),
        "steps_not_applied": not_applied, "last_loss": None if last_loss is None else round(last_loss, 4),
    }


def train_losses(save_dir: Path) -> list[tuple[int, float]]:
    path = save_dir / "metrics.jsonl"
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(e["update"], e["loss"]) for e in events if e.get("kind") == "train"]


def compare_runs(a: Path, b: Path) -> dict[str, Any]:
    """How far two training runs' last checkpoints and logged losses are apart."""
    from mtkit.checkpoint import load_checkpoint

    ca, cb = load_checkpoint(a / "checkpoint_last.pt"), load_checkpoint(b / "checkpoint_last.pt")
    max_abs = diff2 = norm2 = 0.0
    for name, ta in ca["model"].items():
        if not ta.is_floating_point():
            continue
        d = ta.double() - cb["model"][name].double()
        max_abs = max(max_abs, float(d.abs().max()))
        diff2 += float((d * d).sum())
        norm2 += float((ta.double() ** 2).sum())
    la, lb = train_losses(a), train_losses(b)
    loss_rel = None
    if la and [u for u, _ in la] == [u for u, _ in lb]:
        loss_rel = max(abs(x - y) / max(abs(x), 1e-12) for (_, x), (_, y) in zip(la, lb))
    return {
        "updates": [int(ca["update"]), int(cb["update"])],
        "world_sizes": [int(ca["data_state"].get("world_size", 1)), int(cb["data_state"].get("world_size", 1))],
        "weights_max_abs_diff": max_abs, "weights_rel_diff": math.sqrt(diff2 / max(norm2, 1e-30)),
        "bit_exact": max_abs == 0.0, "losses_compared": len(la) if loss_rel is not None else 0,
        "loss_max_rel_diff": loss_rel,
    }


# --- the checks -----------------------------------------------------------------------------------
def check_environment(ctx: Ctx) -> dict[str, Any]:
    import importlib.metadata
    import importlib.util
    import platform

    needed = ("torch", "numpy", "yaml", "click", "tqdm", "sentencepiece", "sacrebleu", "pytest")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        return failed(f"missing Python packages: {', '.join(missing)}", python=platform.python_version())
    import torch
    import torch.distributed as dist

    import mtkit

    packages = {}
    for name in ("numpy", "sentencepiece", "sacrebleu", "pytest", "ctranslate2"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    figures: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "mtkit": mtkit.__version__, "mtkit_from": str(Path(mtkit.__file__).parent), "cpus": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(), "packages": packages,
    }
    if ctx.device != "cuda":
        return passed(f"CPU ({os.cpu_count()} cores), torch {torch.__version__}, Python {platform.python_version()}",
                      **figures)
    if not torch.cuda.is_available():
        return failed(f"--device cuda but torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device",
                      **figures)
    props = torch.cuda.get_device_properties(0)
    x = torch.randn(512, 512, device="cuda")
    if not math.isfinite(float((x @ x).sum())):
        return failed("a CUDA matmul gave a non-finite result", **figures)
    nccl = None
    with contextlib.suppress(Exception):
        v = torch.cuda.nccl.version()
        nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    figures.update(gpu=props.name, gpus=torch.cuda.device_count(), gpu_memory_gib=round(props.total_memory / GiB, 1),
                   compute_capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported(),
                   nccl=nccl, nccl_available=dist.is_nccl_available())
    return passed(f"{props.name} ({figures['gpu_memory_gib']} GiB), torch {torch.__version__} (CUDA "
                  f"{torch.version.cuda}), NCCL {nccl}, {os.cpu_count()} CPUs", **figures)


def check_data(ctx: Ctx) -> dict[str, Any]:
    from mtkit.data.preprocess import preprocess
    from mtkit.data.text import resolve_corpus_file

    plan = ctx.plan
    files = {(s, lang): resolve_corpus_file(ctx.data_dir / s, lang) for s in SPLITS for lang in LANGS}
    corpus = ctx.work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    train_prefix = ctx.data_dir / "train"
    if plan.train_lines:
        for lang in LANGS:
            write_lines(corpus / f"train.{lang}", head(files["train", lang], plan.train_lines))
        train_prefix = corpus / "train"
    src, ref = head(files["test_2016_flickr", "en"], plan.test_lines), head(files["test_2016_flickr", "de"], plan.test_lines)
    if len(src) != len(ref) or not src:
        return failed(f"test_2016_flickr: {len(src)} source and {len(ref)} reference lines")
    write_lines(ctx.test_src, src)
    write_lines(ctx.test_ref, ref)
    t0 = time.monotonic()
    manifest = preprocess("en", "de", train_prefix, ctx.prep, valid_prefix=ctx.data_dir / "val",
                          vocab_size=plan.vocab_size, workers=max(1, min(8, os.cpu_count() or 1)), force=True)
    splits = manifest["splits"]
    figures = {"train_pairs": splits["train"]["pairs"], "valid_pairs": splits["valid"]["pairs"],
               "test_lines": len(src), "vocab_size": plan.vocab_size, "preprocess_s": round(time.monotonic() - t0, 1),
               "source": str(ctx.data_dir)}
    return passed(f"{figures['train_pairs']} training pairs, {figures['valid_pairs']} valid, {len(src)} test lines; "
                  f"joint BPE {plan.vocab_size}", **figures)


def junit_counts(path: Path) -> dict[str, Any]:
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    bad = [c.get("name") for c in root.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    return {"tests": counts["tests"], "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"], "failing": bad}


def check_cuda_tests(ctx: Ctx) -> dict[str, Any]:
    report = ctx.work / "cuda_tests.xml"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={report}",
           "tests/test_cuda.py"]
    code, output = run_proc(cmd, ctx.logs / "cuda_tests.pytest.log", ctx.plan.limits["cuda_tests"] - 10)
    if code is None:
        return failed(f"pytest did not finish: {tail(output, 3)}")
    if not report.exists():
        return failed(f"pytest exited {code} without a report: {tail(output)}")
    counts = junit_counts(report)
    figures = {**counts, "pytest_exit": code}
    bad = counts["failed"] + counts["errors"]
    if bad:
        return failed(f"{bad} of {counts['tests']} CUDA tests failed: {', '.join(counts['failing'][:6])}", **figures)
    if counts["passed"] == 0:
        if ctx.device != "cuda":
            return skipped(f"no CUDA device: all {counts['skipped']} CUDA tests skipped", **figures)
        return failed(f"no CUDA test ran on a CUDA device ({counts['skipped']} skipped)", **figures)
    if code != 0:
        return failed(f"pytest exited {code}: {tail(output, 3)}", **figures)
    more = f", {counts['skipped']} skipped" if counts["skipped"] else ""
    return passed(f"{counts['passed']} CUDA tests passed{more}", **figures)


def check_train_transformer(ctx: Ctx) -> dict[str, Any]:
    from mtkit.config import load_config
    from mtkit.training.trainer import train

    plan = ctx.plan
    cfg = load_config(plan.model_preset, [*QUIET_TRAIN, *plan.model_overrides])
    shutil.rmtree(ctx.model_dir, ignore_errors=True)
    summary = train(ctx.prep, cfg, ctx.model_dir, device=ctx.device)
    metrics = ctx.model_dir / "metrics.jsonl"
    events = [json.loads(x) for x in metrics.read_text(encoding="utf-8").splitlines() if x.strip()] if metrics.exists() else []
    rates = sorted(e["tgt_tokens_per_s"] for e in events if e.get("kind") == "train")
    valid = summary.get("valid") or {}
    figures = {"preset": plan.model_preset, "amp": cfg.train.amp, "max_tokens": cfg.train.max_tokens,
               "updates": summary["updates"], "train_seconds": summary["train_seconds"],
               "epochs": summary["epochs"], "valid_loss": valid.get("loss"), "valid_ppl": valid.get("ppl"),
               "tgt_tokens_per_s_median": rates[len(rates) // 2] if rates else None, "stop_reason": summary["stop_reason"]}
    if not ctx.ckpt.exists():
        return failed("training ended without checkpoint_last.pt", **figures)
    if valid.get("loss") is None or not math.isfinite(valid["loss"]):
        return failed(f"validation loss is {valid.get('loss')}", **figures)
    return passed(f"{plan.model_preset}: {summary['updates']} updates in {summary['train_seconds']:.0f} s "
                  f"({cfg.train.amp}), valid ppl {valid['ppl']:.1f}", **figures)


def check_decode_match(ctx: Ctx) -> dict[str, Any]:
    if ctx.device != "cuda":
        return skipped("needs CUDA: compares decoding on CUDA with decoding on the CPU")
    refs = read_lines(ctx.test_ref)
    runs: dict[tuple[str, str, int], dict[str, Any]] = {}
    decode(ctx, write_lines(ctx.work / "warm.en", read_lines(ctx.test_src)[:32]), ctx.work / "warm.de",
           device="cuda", batch_size=32)  # CUDA context and kernels, outside the figures
    for device, dtype, beam in (("cpu", "float32", 1), ("cuda", "float32", 1), ("cpu", "float32", 5),
                                ("cuda", "float32", 5), ("cuda", "bfloat16", 5), ("cuda", "float16", 5)):
        out = ctx.work / f"match.{device}.{dtype}.beam{beam}.de"
        stats = decode(ctx, ctx.test_src, out, device=device, dtype=dtype, beam=beam, batch_size=64)
        hyps = read_lines(out)
        runs[device, dtype, beam] = {"hyps": hyps, "bleu": bleu(hyps, refs), "seconds": stats["seconds"],
                                     "sentences_per_s": stats["sentences_per_s"]}
    same_greedy = same_share(runs["cpu", "float32", 1]["hyps"], runs["cuda", "float32", 1]["hyps"])
    same_beam = same_share(runs["cpu", "float32", 5]["hyps"], runs["cuda", "float32", 5]["hyps"])
    base = runs["cuda", "float32", 5]["bleu"]
    d_bf16 = round(runs["cuda", "bfloat16", 5]["bleu"] - base, 2)
    d_fp16 = round(runs["cuda", "float16", 5]["bleu"] - base, 2)
    figures = {
        "lines": len(refs), "batch_sentences": 64,
        "same_lines_greedy_cuda_vs_cpu": same_greedy, "same_lines_beam5_cuda_vs_cpu": same_beam,
        "bleu_delta_bfloat16_vs_float32": d_bf16, "bleu_delta_float16_vs_float32": d_fp16,
        "runs": {f"{d}.{t}.beam{b}": {k: v for k, v in r.items() if k != "hyps"} for (d, t, b), r in runs.items()},
    }
    problems = []
    for name, share in (("greedy", same_greedy), ("beam 5", same_beam)):
        if share < 0.99:
            problems.append(f"{name}: {share:.1%} of lines equal on CUDA and CPU (needs >= 99%)")
    for name, delta in (("bfloat16", d_bf16), ("float16", d_fp16)):
        if abs(delta) > 0.3:
            problems.append(f"{name} BLEU {delta:+.2f} from float32 (needs within 0.3)")
    if problems:
        return failed("; ".join(problems), **figures)
    return passed(f"CUDA = CPU on {same_greedy:.1%} (greedy) / {same_beam:.1%} (beam 5) of {len(refs)} lines; "
                  f"BLEU {base:.2f} float32, bf16 {d_bf16:+.2f}, fp16 {d_fp16:+.2f}", **figures)


def check_train_speed(ctx: Ctx) -> dict[str, Any]:
    from mtkit.config import load_config
    from mtkit.models.base import num_parameters
    from mtkit.training.trainer import Trainer, load_data

    plan = ctx.plan
    data = load_data(ctx.prep)
    rows: dict[str, Any] = {}
    problems = []
    max_tokens = 0
    for amp in plan.speed_amps:
        cfg = load_config(plan.speed_preset, [*QUIET_TRAIN, *plan.speed_overrides, f"train.amp={amp}"])
        max_tokens = cfg.train.max_tokens
        with tempfile.TemporaryDirectory(dir=ctx.work) as tmp:
            reset_peak(ctx.device)
            trainer = Trainer(data, cfg, tmp, device=ctx.device)
            row = time_updates(trainer, plan.speed_warmup, plan.speed_updates, plan.speed_seconds)
            row.update(peak_memory(ctx.device), parameters=num_parameters(trainer.model),
                       autocast=str(trainer.autocast_dtype).replace("torch.", ""))
            if trainer.scaler is not None:
                row["loss_scale"] = trainer.scaler.get_scale()
            del trainer
            release(ctx.device)
        rows[amp] = row
        if not row["tgt_tokens_per_s"] > 0 or row["last_loss"] is None or not math.isfinite(row["last_loss"]):
            problems.append(f"{amp}: {row['tgt_tokens_per_s']} tokens/s, last loss {row['last_loss']}")
    if "fp16" not in plan.speed_amps:
        rows["fp16"] = {"status": "skip", "reason": "fp16 autocast with a grad scaler needs CUDA"}
    figures = {"preset": plan.speed_preset, "max_tokens": max_tokens, **rows}
    if problems:
        return failed("; ".join(problems), **figures)
    mem = "peak_gpu_memory_gib" if ctx.device == "cuda" else "peak_rss_gib"
    parts = [f"{amp} {r['tgt_tokens_per_s']:.0f} tgt tok/s ({r[mem]} GiB)" for amp, r in rows.items() if "tgt_tokens_per_s" in r]
    return passed(f"{plan.speed_preset}, {figures['max_tokens']}-token batches: " + ", ".join(parts), **figures)


def check_decode_speed(ctx: Ctx) -> dict[str, Any]:
    refs = read_lines(ctx.test_ref)
    expected = sum(1 for line in read_lines(ctx.test_src) if line.strip())
    decode(ctx, write_lines(ctx.work / "warm.en", read_lines(ctx.test_src)[:32]), ctx.work / "warm.de",
           batch_size=32)  # the device's first kernels, outside the figures
    rows = []
    for dtype, batch in ctx.plan.decode_settings:
        reset_peak(ctx.device)
        out = ctx.work / f"speed.{dtype}.{batch}.de"
        stats = decode(ctx, ctx.test_src, out, dtype=dtype, beam=5, batch_size=batch)
        rows.append({"dtype": dtype, "batch_sentences": batch, "sentences": stats["translated"],
                     "tgt_pieces": stats["tgt_tokens"], "seconds": stats["seconds"],
                     "sentences_per_s": stats["sentences_per_s"], "tgt_pieces_per_s": stats["tgt_tokens_per_s"],
                     "batches": stats["batches"], **peak_memory(ctx.device), "bleu": bleu(read_lines(out), refs)})
    figures = {"beam": 5, "lines": len(refs), "rows": rows}
    bad = [r for r in rows if r["sentences"] != expected or not r["tgt_pieces_per_s"] > 0]
    if bad:
        return failed(f"{len(bad)} settings translated {[r['sentences'] for r in bad]} of {expected} lines", **figures)
    best = max(rows, key=lambda r: r["tgt_pieces_per_s"])
    first = rows[0]
    return passed(f"beam 5, {len(refs)} lines: {first['sentences_per_s']:.0f} sent/s at {first['dtype']} batch "
                  f"{first['batch_sentences']}, up to {best['sentences_per_s']:.0f} sent/s, "
                  f"{best['tgt_pieces_per_s']:.0f} pieces/s ({best['dtype']}, batch {best['batch_sentences']})", **figures)


def check_ct2_speed(ctx: Ctx) -> dict[str, Any]:
    import importlib.util

    if importlib.util.find_spec("ctranslate2") is None:
        return skipped("ctranslate2 is not installed (put a ctranslate2 wheel for this Python into gpu_check/wheels/)")
    import ctranslate2

    from mtkit.export import export_ctranslate2

    plan = ctx.plan
    figures: dict[str, Any] = {"ctranslate2": ctranslate2.__version__, "beam": 5, "length_penalty": "average",
                               "batch_sentences": plan.ct2_batch}
    if ctx.device == "cuda" and ctranslate2.get_cuda_device_count() == 0:
        return skipped(f"ctranslate2 {ctranslate2.__version__} sees no CUDA device (a wheel without CUDA, or built "
                       "for another CUDA version)", **figures)
    exports = {}
    for q in plan.ct2_quantizations:
        exports[q] = ctx.work / f"ct2-{q}"
        export_ctranslate2(ctx.ckpt, exports[q], quantization=q, force=True)
    probe = write_lines(ctx.work / "probe.en", read_lines(ctx.test_src)[:16])
    try:  # CTranslate2's own libraries (e.g. its CUDA runtime) load and decode here
        decode(ctx, probe, ctx.work / "probe.de", model=exports[plan.ct2_quantizations[0]], engine="ctranslate2",
               batch_size=plan.ct2_batch)
    except Exception as exc:
        traceback.print_exc()
        return skipped(f"ctranslate2 {ctranslate2.__version__} cannot decode on {ctx.device} here: {one_line(exc)}",
                       **figures)
    decode(ctx, probe, ctx.work / "probe.de", batch_size=plan.ct2_batch)  # mtkit's first kernels
    refs = read_lines(ctx.test_ref)
    rows: list[dict[str, Any]] = []

    def run(name: str, out: Path, **kw: Any) -> dict[str, Any]:
        stats = decode(ctx, ctx.test_src, out, beam=5, batch_size=plan.ct2_batch, length_penalty="average", **kw)
        row = {"engine": name, "sentences_per_s": stats["sentences_per_s"], "tgt_pieces_per_s": stats["tgt_tokens_per_s"],
               "tgt_pieces": stats["tgt_tokens"], "seconds": stats["seconds"], "bleu": bleu(read_lines(out), refs)}
        rows.append(row)
        return row

    mtkit_rows = [run(f"mtkit {dt}", ctx.work / f"ct2cmp.mtkit.{dt}.de", dtype=dt) for dt in plan.ct2_mtkit_dtypes]
    reference = read_lines(ctx.work / f"ct2cmp.mtkit.{plan.ct2_mtkit_dtypes[0]}.de")
    for q, path in exports.items():
        out = ctx.work / f"ct2cmp.ct2.{q}.de"
        row = run(f"ctranslate2 {q}", out, model=path, engine="ctranslate2")
        row[f"same_as_mtkit_{plan.ct2_mtkit_dtypes[0]}"] = same_share(reference, read_lines(out))
        row["mtkit_over_ct2"] = {m["engine"]: round(m["tgt_pieces_per_s"] / row["tgt_pieces_per_s"], 3)
                                 for m in mtkit_rows if row["tgt_pieces_per_s"] > 0}
    figures["rows"] = rows
    bad = [r["engine"] for r in rows if not r["tgt_pieces_per_s"] > 0]
    if bad:
        return failed(f"no output from {', '.join(bad)}", **figures)
    ct2_parts = [f"{r['engine'].split()[1]} {r['tgt_pieces_per_s']:.0f} (mtkit/ct2 "
                 f"{'/'.join(str(v) for v in r['mtkit_over_ct2'].values())})" for r in rows if r["engine"].startswith("ctranslate2")]
    mt_parts = [f"{r['engine']} {r['tgt_pieces_per_s']:.0f}" for r in mtkit_rows]
    return passed(f"beam 5 pieces/s, batch {plan.ct2_batch}: {', '.join(mt_parts)}; ctranslate2 {', '.join(ct2_parts)}",
                  **figures)


def train_and_decode_family(ctx: Ctx, data: Any, preset: str, src: Path, refs: list[str]) -> dict[str, Any]:
    from mtkit.config import load_config
    from mtkit.training.trainer import Trainer

    plan = ctx.plan
    cfg = load_config(preset, [*QUIET_TRAIN, f"train.amp={plan.rnn_amp}"])
    save = ctx.work / "rnn" / preset
    shutil.rmtree(save, ignore_errors=True)
    reset_peak(ctx.device)
    trainer = Trainer(data, cfg, save, device=ctx.device)
    warmup = min(5, plan.rnn_updates // 2)
    row = time_updates(trainer, warmup, plan.rnn_updates - warmup, float("inf"))
    if row["last_loss"] is None or not math.isfinite(row["last_loss"]):
        raise RuntimeError(f"training loss is {row['last_loss']} after {plan.rnn_updates} updates")
    autocast = str(trainer.autocast_dtype).replace("torch.", "") if trainer.autocast_dtype else "none"
    trainer.save(numbered=False)
    del trainer
    release(ctx.device)
    out = ctx.work / f"rnn.{preset}.de"
    stats = decode(ctx, src, out, model=save / "checkpoint_last.pt", beam=5, batch_size=64)
    return {"arch": cfg.model.arch, "autocast": autocast, "updates": warmup + row["updates"],
            "tgt_tokens_per_s": row["tgt_tokens_per_s"], "last_loss": row["last_loss"], **peak_memory(ctx.device),
            "decode_sentences_per_s": stats["sentences_per_s"], "decode_tgt_pieces_per_s": stats["tgt_tokens_per_s"],
            "decoded": stats["translated"], "bleu": bleu(read_lines(out), refs)}


def check_rnn_families(ctx: Ctx) -> dict[str, Any]:
    from mtkit.training.trainer import load_data

    plan = ctx.plan
    data = load_data(ctx.prep)
    lines = read_lines(ctx.test_src)[: plan.rnn_decode_lines]
    src = write_lines(ctx.work / "rnn_test.en", lines)
    refs = read_lines(ctx.test_ref)[: len(lines)]
    rows: dict[str, Any] = {}
    problems = []
    for preset in plan.rnn_presets:
        try:
            rows[preset] = {"status": "pass", **train_and_decode_family(ctx, data, preset, src, refs)}
        except Exception as exc:
            traceback.print_exc()
            rows[preset] = {"status": "fail", "error": one_line(exc)}
            problems.append(f"{preset}: {one_line(exc, 160)}")
            release(ctx.device)
    figures = {"updates": plan.rnn_updates, "amp": plan.rnn_amp, "decoded_lines": len(lines), "beam": 5, **rows}
    if problems:
        return failed("; ".join(problems), **figures)
    parts = [f"{p.split('_')[0]} {r['tgt_tokens_per_s']:.0f}" for p, r in rows.items()]
    return passed(f"{plan.rnn_updates} updates ({plan.rnn_amp}) and beam 5 for each; tgt tok/s: {', '.join(parts)}",
                  **figures)


def one_rank_all_reduce(device: str) -> dict[str, Any]:
    """A process group of this one process (NCCL on CUDA, Gloo on a CPU) all-reduces a tensor."""
    import torch
    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        t = torch.full((4,), 2.0, device=device)
        dist.all_reduce(t)
        sync(device)
        ok = bool((t == 2.0).all())
    finally:
        dist.destroy_process_group()
    return {"backend": backend, "all_reduce": "ok" if ok else "wrong result"}


# how NCCL refuses two ranks on one GPU (one communicator may not hold a device twice)
NCCL_REFUSAL = re.compile(r"duplicate gpu|invalid ?usage|ncclInvalidUsage", re.IGNORECASE)


def nccl_reason(output: str) -> str:
    """The line of a failed run's output that says why NCCL refused."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for pattern in (r"duplicate gpu", r"invalid ?usage", r"nccl"):
        found = [ln for ln in lines if re.search(pattern, ln, re.IGNORECASE)]
        if found:
            return found[0][:300]
    return tail(output, 2)


def check_ddp(ctx: Ctx) -> dict[str, Any]:
    plan, dev, py = ctx.plan, ctx.device, sys.executable
    n, half = plan.ddp_updates, plan.ddp_updates // 2
    tol = 1e-5 if dev == "cpu" else 1e-3
    common = [*QUIET_TRAIN, *plan.ddp_overrides, "train.amp=none", "train.num_threads=1", "train.log_interval=1",
              "train.warmup_updates=4", "train.lr=0.003"]
    root = ctx.work / "ddp"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)

    def args(name: str, *extra: str, resume: bool = False) -> list[str]:
        return ["-q", "train", str(ctx.prep), "-c", "transformer_tiny", "--save-dir", str(root / name), "--device", dev,
                *sets([*common, *extra]), *(["--resume"] if resume else [])]

    torchrun = [py, "-m", "torch.distributed.run", "--standalone"]

    def must_run(log: str, cmd: list[str]) -> None:
        code, output = run_proc(cmd, ctx.logs / f"ddp.{log}.log", plan.ddp_run_timeout_s)
        if code != 0:
            why = "timed out" if code is None else f"exited {code}"
            raise RuntimeError(f"{log} {why}: {tail(output, 3)}")

    figures: dict[str, Any] = {"backend": "nccl" if dev == "cuda" else "gloo", "updates": n, "tolerance": tol}
    problems = []
    try:
        figures["one_rank_process_group"] = one_rank_all_reduce(dev)
    except Exception as exc:
        traceback.print_exc()
        problems.append(f"a one-rank {figures['backend']} process group failed: {one_line(exc)}")

    # torchrun with one rank: half the updates, then --resume to the end == one plain process
    must_run("single", [py, "-m", "mtkit", *args("single", "model.dropout=0.1", f"train.max_updates={n}")])
    must_run("torchrun1", [*torchrun, "--nproc-per-node", "1", "-m", "mtkit",
                           *args("torchrun1", "model.dropout=0.1", f"train.max_updates={half}")])
    must_run("torchrun1_resume", [*torchrun, "--nproc-per-node", "1", "-m", "mtkit",
                                  *args("torchrun1", "model.dropout=0.1", f"train.max_updates={n}", resume=True)])
    one = compare_runs(root / "single", root / "torchrun1")
    figures["torchrun_1_rank_resumed_vs_single_process"] = one
    if one["updates"] != [n, n] or one["weights_rel_diff"] > tol or one["loss_max_rel_diff"] is None \
            or one["loss_max_rel_diff"] > tol:
        problems.append(f"torchrun 1 rank (resumed at {half}) differs from a single process: {one}")

    # two ranks on this one device, update_freq 1 == one process with update_freq 2 (dropout off)
    code, output = run_proc([*torchrun, "--nproc-per-node", "2", str(THIS), AS_RANK,
                             *args("two_ranks", "model.dropout=0.0", f"train.max_updates={half}")],
                            ctx.logs / "ddp.two_ranks.log", plan.two_rank_timeout_s)
    two_ranks = "not run"
    if code == 0:
        must_run("update_freq2", [py, "-m", "mtkit", *args("update_freq2", "model.dropout=0.0", "train.update_freq=2",
                                                           f"train.max_updates={half}")])
        two = compare_runs(root / "two_ranks", root / "update_freq2")
        figures["two_ranks_vs_update_freq_2"] = two
        two_ranks = f"2 ranks = update_freq 2 (rel diff {two['weights_rel_diff']:.1e})"
        if two["world_sizes"] != [2, 1] or two["updates"] != [half, half] or two["weights_rel_diff"] > tol \
                or two["loss_max_rel_diff"] is None or two["loss_max_rel_diff"] > tol:
            problems.append(f"2 ranks differ from one process with update_freq 2: {two}")
    elif dev == "cuda" and (code is None or NCCL_REFUSAL.search(output)):
        reason = nccl_reason(output) if code is not None else f"no result in {plan.two_rank_timeout_s:.0f} s (stopped)"
        figures["two_ranks_on_one_gpu"] = {"ran": False, "reason": reason}
        two_ranks = f"2 ranks on one GPU: not allowed by NCCL ({reason[:120]})"
    else:
        why = "timed out" if code is None else f"exited {code}"
        problems.append(f"2 ranks on one {dev} device {why}: {tail(output, 3)}")
    if dev == "cuda":
        figures["note"] = ("a one-rank torchrun run trains without a process group (world size 1); NCCL is exercised "
                           "by the one-rank all-reduce and by two ranks when they run")
    if problems:
        return failed("; ".join(problems), **figures)
    exact = "bit-exact" if one["bit_exact"] else f"rel diff {one['weights_rel_diff']:.1e}"
    return passed(f"torchrun 1 rank, resumed at {half}/{n}, = single process ({exact}); {two_ranks}", **figures)


def check_oom_backoff(ctx: Ctx) -> dict[str, Any]:
    if ctx.device != "cuda":
        return skipped("needs CUDA: forces the GPU allocator past a memory limit")
    import torch

    lines = len(read_lines(ctx.test_src))
    whole = {"beam": 5, "max_tokens": 10**7}  # every test line in one batch
    decode(ctx, write_lines(ctx.work / "warm.en", read_lines(ctx.test_src)[:32]), ctx.work / "warm.de", batch_size=32)
    reset_peak("cuda")
    ref = decode(ctx, ctx.test_src, ctx.work / "oom.whole.de", **whole)
    peak = torch.cuda.max_memory_reserved()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    limit = max(peak // 4, 64 * MiB)
    figures: dict[str, Any] = {"lines": lines, "beam": 5, "batches_unlimited": ref["batches"],
                               "peak_reserved_mib": round(peak / MiB), "limit_mib": round(limit / MiB)}
    torch.cuda.set_per_process_memory_fraction(limit / total)
    try:
        stats = decode(ctx, ctx.test_src, ctx.work / "oom.split.de", **whole)
    except Exception as exc:
        traceback.print_exc()
        return failed(f"one batch of {lines} sentences under a {limit // MiB} MiB limit did not finish: "
                      f"{one_line(exc)}", **figures)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    same = same_share(read_lines(ctx.work / "oom.whole.de"), read_lines(ctx.work / "oom.split.de"))
    figures.update(oom_splits=stats["oom_splits"], batches=stats["batches"], seconds=stats["seconds"],
                   same_as_unlimited=same)
    if ref["batches"] != 1:
        return failed(f"the unlimited run took {ref['batches']} batches, not one", **figures)
    if stats["oom_splits"] == 0:
        return failed(f"nothing was forced: the batch fit under {limit // MiB} MiB (peak {peak // MiB} MiB)", **figures)
    if same < 0.99:
        return failed(f"after splitting only {same:.1%} of lines equal the unsplit output", **figures)
    return passed(f"one batch of {lines} sentences (peak {peak // MiB} MiB) under a {limit // MiB} MiB limit: split "
                  f"{stats['oom_splits']} times into {stats['batches']} batches, {same:.1%} of lines as unsplit", **figures)


# --- the run --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Ctx], dict[str, Any]]
    needs: tuple[str, ...] = ()
    cuda_only: bool = False  # skipped at once on --device cpu
    background: bool = False  # started, then left running beside the following checks
    overlap: bool = False  # may run while a background check runs (gives no timing figures)


CHECKS = [
    Check("environment", check_environment),
    Check("cuda_tests", check_cuda_tests, ("environment",), background=True),
    Check("data", check_data, ("environment",), overlap=True),
    Check("train_transformer", check_train_transformer, ("data",), overlap=True),
    Check("decode_match", check_decode_match, ("train_transformer",), cuda_only=True),
    Check("train_speed", check_train_speed, ("data",)),
    Check("decode_speed", check_decode_speed, ("train_transformer",)),
    Check("ct2_speed", check_ct2_speed, ("train_transformer",)),
    Check("rnn_families", check_rnn_families, ("data",)),
    Check("ddp", check_ddp, ("data",)),
    Check("oom_backoff", check_oom_backoff, ("train_transformer",), cuda_only=True),
]
BY_NAME = {c.name: c for c in CHECKS}


def selected_checks(only: str | None) -> list[Check]:
    """``--only a,b``: those checks and what they need, in the usual order."""
    if not only:
        return list(CHECKS)
    wanted: set[str] = set()
    todo = [x.strip() for x in only.split(",") if x.strip()]
    while todo:
        name = todo.pop()
        if name not in BY_NAME:
            raise SystemExit(f"error: unknown check '{name}' (checks: {', '.join(BY_NAME)})")
        if name not in wanted:
            wanted.add(name)
            todo.extend(BY_NAME[name].needs)
    return [c for c in CHECKS if c.name in wanted]


@dataclass
class Running:
    check: Check
    proc: subprocess.Popen
    started: float
    limit: float
    result_path: Path
    log: Any


class Runner:
    def __init__(self, ctx: Ctx, out_dir: Path, budget: float):
        self.ctx, self.out_dir, self.budget = ctx, out_dir, budget
        self.start = time.monotonic()
        self.results: dict[str, dict[str, Any]] = {}
        self.background: list[Running] = []
        self.context_file = ctx.work / "context.json"
        ctx.save(self.context_file)
        self.jsonl = open(out_dir / "results.jsonl", "w", encoding="utf-8")

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def report(self, check: Check, result: dict[str, Any], seconds: float) -> None:
        line = {"check": check.name, "status": result["status"], "seconds": round(seconds, 1),
                "summary": result.get("summary", ""), "reason": result.get("reason", ""),
                "figures": result.get("figures", {}), "device": self.ctx.device}
        self.results[check.name] = line
        text = json.dumps(line, default=str)
        print(text, flush=True)
        self.jsonl.write(text + "\n")
        self.jsonl.flush()

    def not_started(self, check: Check) -> dict[str, Any] | None:
        if check.cuda_only and self.ctx.device != "cuda":
            return skipped("needs CUDA (this run is --device cpu)")
        for need in check.needs:
            status = self.results.get(need, {}).get("status", "not run")
            if status != "pass":
                return skipped(f"needs {need}, which did not pass ({status})")
        if self.left() < MIN_START_S:
            return skipped(f"time budget spent (--budget {self.budget:.0f} s)")
        return None

    def launch(self, check: Check) -> Running:
        limit = min(self.ctx.plan.limits.get(check.name, 120), self.left())
        result_path = self.ctx.work / f"result.{check.name}.json"
        result_path.unlink(missing_ok=True)
        log = open(self.ctx.logs / f"{check.name}.log", "w", encoding="utf-8")
        cmd = [sys.executable, str(THIS), "--child", check.name, "--context", str(self.context_file),
               "--result", str(result_path)]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=child_env(),
                                start_new_session=True)
        return Running(check, proc, time.monotonic(), limit, result_path, log)

    def finish(self, job: Running) -> None:
        timeout = max(job.limit - (time.monotonic() - job.started), 0.1)
        try:
            code = job.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(job.proc)
            code = None
        job.log.close()
        seconds = time.monotonic() - job.started
        if code is None:
            result = failed(f"timed out after {job.limit:.0f} s (log: logs/{job.check.name}.log)")
        elif job.result_path.exists():
            result = json.loads(job.result_path.read_text(encoding="utf-8"))
        else:
            log_text = (self.ctx.logs / f"{job.check.name}.log").read_text(encoding="utf-8", errors="replace")
            result = failed(f"the check's process exited {code}: {tail(log_text, 4)}")
        self.report(job.check, result, seconds)

    def join_background(self) -> None:
        while self.background:
            self.finish(self.background.pop(0))

    def stop_background(self) -> None:
        while self.background:
            job = self.background.pop(0)
            stop_group(job.proc)
            job.log.close()

    def run(self, checks: list[Check]) -> None:
        for check in checks:
            if not check.overlap:
                self.join_background()
            early = self.not_started(check)
            if early is not None:
                self.report(check, early, 0.0)
                continue
            job = self.launch(check)
            if check.background:
                self.background.append(job)
            else:
                self.finish(job)
        self.join_background()

    def table(self, checks: list[Check]) -> str:
        rows = [self.results[c.name] for c in checks if c.name in self.results]
        counts = {s: sum(r["status"] == s for r in rows) for s in ("pass", "fail", "skip")}
        elapsed = time.monotonic() - self.start
        lines = [f"mtkit GPU check on {self.ctx.device}: {len(rows)} checks in {elapsed:.0f} s: "
                 f"{counts['pass']} pass, {counts['fail']} fail, {counts['skip']} skip",
                 f"{'check':<18} {'status':<6} {'seconds':>7}  result"]
        for r in rows:
            text = r["summary"] if r["status"] == "pass" else r["reason"]
            lines.append(f"{r['check']:<18} {r['status']:<6} {r['seconds']:>7.1f}  {text[:220]}")
        lines.append(f"results: {self.out_dir / 'results.jsonl'}; logs: {self.out_dir / 'logs'}")
        return "\n".join(lines)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group of ``proc`` (torchrun stops its ranks), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_child(name: str, context: Path, result_path: Path) -> int:
    """Run one check in this process and write its result (a failure is a result too)."""
    ctx = Ctx.load(context)
    from mtkit.utils import limit_onednn_caches, setup_logging

    setup_logging(0)
    if ctx.device == "cpu":
        limit_onednn_caches()  # as `mtkit train` does on a CPU
    try:
        result = BY_NAME[name].run(ctx)
    except Exception as exc:
        traceback.print_exc()
        result = failed(one_line(exc))
    result_path.write_text(json.dumps(result, default=str), encoding="utf-8")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cuda: the full check; cpu: tiny sizes")
    ap.add_argument("--data-dir", default=str(STORE / "multi30k"),
                    help="Multi30k files: train/val/test_2016_flickr .en/.de, plain or .gz (default: %(default)s)")
    ap.add_argument("--out-dir", default=None,
                    help="results.jsonl, summary.txt, logs/ (default: $OUT/gpu_check if $OUT is set, else gpu_check/results)")
    ap.add_argument("--work-dir", default=None, help="work files (default: a temporary directory, removed at the end)")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary work directory")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all checks (default: 450 on cuda, 480 on cpu)")
    ap.add_argument("--only", default=None, metavar="CHECK[,CHECK]", help="these checks (and what they need)")
    ap.add_argument("--vocab-size", type=int, default=None, help="joint BPE size (default: 8000 on cuda, 2000 on cpu)")
    ap.add_argument("--train-lines", type=int, default=None, help="training pairs read (0: all)")
    ap.add_argument("--test-lines", type=int, default=None, help="test_2016_flickr lines decoded")
    ap.add_argument("--list", action="store_true", help="list the checks and exit")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--context", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == AS_RANK:
        # a torchrun rank whose mtkit uses device 0 whatever LOCAL_RANK says: with one GPU,
        # NCCL decides whether two ranks may share it
        os.environ["LOCAL_RANK"] = "0"
        from mtkit.cli import main as mtkit_main

        mtkit_main(argv[1:], prog_name="mtkit")
        return 0
    args = parse_args(argv)
    if args.child:
        return run_child(args.child, Path(args.context), Path(args.result))
    if args.list:
        for c in CHECKS:
            print(f"{c.name:<18} {'(CUDA only) ' if c.cuda_only else ''}needs: {', '.join(c.needs) or '-'}")
        return 0
    plan = dataclasses.replace(PLANS[args.device])
    for key in ("vocab_size", "train_lines", "test_lines"):
        if getattr(args, key) is not None:
            setattr(plan, key, getattr(args, key))
    if args.budget is not None:
        plan.budget_s = args.budget
    data_dir = Path(args.data_dir).resolve()
    if not data_dir.is_dir():
        print(f"error: data directory {data_dir} not found (--data-dir; bash benchmarks/gpu_check.sh copies it)",
              file=sys.stderr)
        return 2
    if args.out_dir:
        out_dir = Path(args.out_dir)
    elif os.environ.get("OUT"):
        out_dir = Path(os.environ["OUT"]) / "gpu_check"
    else:
        out_dir = STORE / "results"
    out_dir = out_dir.resolve()
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    temporary = args.work_dir is None
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mtkit-gpu-check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(args.device, data_dir, work, out_dir / "logs", plan)
    checks = selected_checks(args.only)
    runner = Runner(ctx, out_dir, plan.budget_s)
    try:
        runner.run(checks)
    except BaseException:
        runner.stop_background()
        raise
    finally:
        runner.jsonl.close()
        table = runner.table(checks)
        print(table, flush=True)
        (out_dir / "summary.txt").write_text(table + "\n", encoding="utf-8")
        if temporary and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r["status"] == "fail" for r in runner.results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

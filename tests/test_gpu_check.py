"""benchmarks/gpu_check.sh, the prepared GPU check, run end to end on this CPU.

``--device cpu`` on a tiny Multi30k-shaped folder made here: every check prints its JSON line with
the status a CPU run must give (the CUDA-only ones skipped), its figures are there and positive,
and the table is printed and kept beside results.jsonl. A ``--device cuda`` run on a machine
without CUDA fails its environment check, still reports every other check (skipped, with the
reason), prints the table and exits 1.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import sentences, subprocess_env

from mtkit.utils import cpu_has_native_bf16

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
CHECKS = ["environment", "cuda_tests", "data", "train_transformer", "decode_match", "train_speed", "decode_speed",
          "ct2_speed", "rnn_families", "ddp", "oom_backoff"]
HAS_CT2 = importlib.util.find_spec("ctranslate2") is not None
CPU_STATUS = {
    "environment": "pass", "cuda_tests": "pass" if torch.cuda.is_available() else "skip", "data": "pass",
    "train_transformer": "pass", "decode_match": "skip", "train_speed": "pass", "decode_speed": "pass",
    "ct2_speed": "pass" if HAS_CT2 else "skip", "rnn_families": "pass", "ddp": "pass", "oom_backoff": "skip",
}
TEST_LINES = 40


def multi30k_like(root: Path) -> Path:
    """train / val / test_2016_flickr .en/.de.gz as the Multi30k folder holds them, tiny."""
    root.mkdir(parents=True)
    for split, n, seed in (("train", 300, 0), ("val", 20, 1), ("test_2016_flickr", TEST_LINES, 2)):
        src = sentences(n, seed)
        for lang, lines in (("en", src), ("de", [s.upper() for s in src])):
            with gzip.open(root / f"{split}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))
    return root


def run_script(*args: object, timeout: float) -> subprocess.CompletedProcess:
    env = subprocess_env()
    env["PYTHON"] = sys.executable
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def results(stdout: str) -> dict[str, dict]:
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    found = {r["check"]: r for r in lines}
    assert len(found) == len(lines), "a check reported twice"
    return found


def assert_table(stdout: str, device: str, by_name: dict[str, dict]) -> None:
    counts = {s: sum(r["status"] == s for r in by_name.values()) for s in ("pass", "fail", "skip")}
    assert re.search(rf"^mtkit GPU check on {device}: {len(CHECKS)} checks in \d+ s: {counts['pass']} pass, "
                     rf"{counts['fail']} fail, {counts['skip']} skip$", stdout, re.M), stdout
    for name, r in by_name.items():
        assert re.search(rf"^{name}\s+{r['status']}\s+\d+\.\d\s+\S", stdout, re.M), f"no table row for {name}"


@pytest.mark.slow
def test_cpu_run_reports_every_check_with_figures_and_a_table(tmp_path):
    data = multi30k_like(tmp_path / "m30k")
    out = tmp_path / "out"
    res = run_script("--device", "cpu", "--data-dir", data, "--vocab-size", 60, "--out-dir", out, timeout=1200)
    by_name = results(res.stdout)
    assert sorted(by_name) == sorted(CHECKS), res.stdout + res.stderr[-3000:]
    wrong = {n: (r["status"], r["reason"]) for n, r in by_name.items() if r["status"] != CPU_STATUS[n]}
    assert not wrong, wrong
    assert res.returncode == 0, res.stderr[-3000:]
    for r in by_name.values():
        assert r["device"] == "cpu" and r["seconds"] >= 0
        assert r["summary"] if r["status"] == "pass" else r["reason"]
    assert_table(res.stdout, "cpu", by_name)
    assert (out / "results.jsonl").read_text().splitlines() == [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert (out / "summary.txt").read_text().startswith("mtkit GPU check on cpu:")
    assert (out / "logs" / "train_transformer.log").is_file()
    fig = {n: r["figures"] for n, r in by_name.items()}

    assert fig["environment"]["torch"] == torch.__version__ and fig["environment"]["cpus"] > 0
    assert fig["cuda_tests"]["tests"] >= 20 and fig["cuda_tests"]["failed"] == 0
    assert 200 <= fig["data"]["train_pairs"] <= 300 and fig["data"]["test_lines"] == TEST_LINES

    trained = fig["train_transformer"]
    assert trained["updates"] == 40 and math.isfinite(trained["valid_loss"]) and trained["tgt_tokens_per_s_median"] > 0

    bf16 = fig["train_speed"]["bf16"]
    native = cpu_has_native_bf16()  # without bf16 instructions the trainer falls back to float32
    assert bf16["autocast"] == ("bfloat16" if native else "None") and bf16["updates"] > 0 and bf16["tgt_tokens_per_s"] > 0
    assert bf16["peak_rss_gib"] > 0 and bf16["parameters"] > 0 and math.isfinite(bf16["last_loss"])
    assert fig["train_speed"]["fp16"]["status"] == "skip"

    rows = fig["decode_speed"]["rows"]
    assert [(r["dtype"], r["batch_sentences"], r["batches"]) for r in rows] == [
        ("float32", 16, 3), ("float32", 64, 1), ("bfloat16", 64, 1)]
    assert all(r["sentences"] == TEST_LINES and r["sentences_per_s"] > 0 and r["tgt_pieces_per_s"] > 0 for r in rows)

    if HAS_CT2:
        ct2 = fig["ct2_speed"]["rows"]
        assert [r["engine"] for r in ct2] == ["mtkit float32", "ctranslate2 float32", "ctranslate2 int8"]
        assert all(r["tgt_pieces_per_s"] > 0 for r in ct2)
        for r in ct2[1:]:
            assert 0 <= r["same_as_mtkit_float32"] <= 1 and r["mtkit_over_ct2"]["mtkit float32"] > 0

    for preset in ("lstm_tiny", "bahdanau_tiny", "luong_tiny", "gnmt_tiny"):
        family = fig["rnn_families"][preset]
        assert family["status"] == "pass" and family["tgt_tokens_per_s"] > 0 and family["decoded"] == 30, preset
        assert family["updates"] == 20 and family["decode_sentences_per_s"] > 0

    ddp = fig["ddp"]
    assert ddp["backend"] == "gloo" and ddp["one_rank_process_group"]["all_reduce"] == "ok"
    one = ddp["torchrun_1_rank_resumed_vs_single_process"]
    assert one["updates"] == [8, 8] and one["losses_compared"] == 8 and one["weights_rel_diff"] <= 1e-5
    two = ddp["two_ranks_vs_update_freq_2"]
    assert two["world_sizes"] == [2, 1] and two["updates"] == [4, 4] and two["losses_compared"] == 4
    assert two["weights_rel_diff"] <= 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="the failure path of a machine without CUDA")
def test_cuda_run_without_cuda_fails_cleanly_and_reports_every_check(tmp_path):
    data = multi30k_like(tmp_path / "m30k")
    res = run_script("--device", "cuda", "--data-dir", data, "--out-dir", tmp_path / "out", timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    by_name = results(res.stdout)
    assert sorted(by_name) == sorted(CHECKS)
    env = by_name["environment"]
    assert env["status"] == "fail" and "sees no CUDA device" in env["reason"] and env["device"] == "cuda"
    for name in CHECKS[1:]:
        assert by_name[name]["status"] == "skip" and by_name[name]["reason"].startswith("needs "), by_name[name]
    assert_table(res.stdout, "cuda", by_name)

"""benchmarks/time_split.py on entry points made here: the matrix products and the other operations land
in their own classes, and a failing entry's exit status (from either of its two runs) is passed on without
a split."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import subprocess_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "time_split.py"

ENTRIES = '''
import sys
import torch

def products():
    a = torch.randn(256, 256)
    for _ in range(20):
        a = torch.tanh(a @ a.t() / 256)
    torch.exp(torch.randn(512, 512))

def fails():
    sys.exit(3)

RUNS = []

def fails_second_time():  # as a command that refuses to overwrite what its first run made
    RUNS.append(1)
    torch.randn(8, 8) @ torch.randn(8, 8)
    if len(RUNS) > 1:
        sys.exit(2)
'''


def run(tmp_path: Path, entry: str) -> tuple[int, dict]:
    (tmp_path / "split_entries.py").write_text(ENTRIES)
    env = subprocess_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env.get('PYTHONPATH', '')}"
    env["THREADS"] = "1"
    res = subprocess.run([sys.executable, str(SCRIPT), f"split_entries:{entry}", "--"], capture_output=True,
                         text=True, env=env, timeout=120)
    return res.returncode, json.loads(res.stdout.strip().splitlines()[-1])


def test_products_and_other_operations_are_split(tmp_path: Path) -> None:
    code, row = run(tmp_path, "products")
    assert code == 0 and row["exit"] == 0 and row["threads"] == 1
    assert row["gemm"] > 0 and row["other_ops"] > 0 and row["rnn_kernels"] == 0
    assert "aten::tanh" in row["top_other_ops"] and "aten::exp" in row["top_other_ops"]
    assert not any("mm" in name for name in row["top_other_ops"])  # products are never "other"
    assert row["profiled_wall_s"] > 0 and row["gemm_share"] > 0  # profiled seconds may exceed plain ones


def test_failing_entry_passes_its_status_on(tmp_path: Path) -> None:
    code, row = run(tmp_path, "fails")
    assert code == 1 and row["exit"] == 3
    assert "gemm" not in row and "profiled_wall_s" not in row


def test_second_run_failing_prints_no_split(tmp_path: Path) -> None:
    code, row = run(tmp_path, "fails_second_time")
    assert code == 1 and row["exit"] == 2
    assert "gemm" not in row and "wall_s" not in row

import os

import pytest
import torch

from mtkit.errors import MtkitError
from mtkit.training import checkpoint as ck


def _payload(value: float = 1.0) -> dict:
    return {"config": {"model": {"arch": "x"}}, "model": {"w": torch.full((4, 3), value)}, "update": 7}


def test_round_trip(tmp_path):
    p = tmp_path / "c.pt"
    ck.save_checkpoint(p, _payload(2.5))
    out = ck.load_checkpoint(p)
    assert torch.equal(out["model"]["w"], torch.full((4, 3), 2.5))
    assert out["update"] == 7 and out["format_version"] == ck.FORMAT_VERSION
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_truncated_file_is_rejected(tmp_path):
    p = tmp_path / "c.pt"
    ck.save_checkpoint(p, _payload())
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(MtkitError, match="corrupt or truncated"):
        ck.load_checkpoint(p)


def test_flipped_byte_is_rejected(tmp_path):
    p = tmp_path / "c.pt"
    ck.save_checkpoint(p, _payload())
    data = bytearray(p.read_bytes())
    data[-100] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(MtkitError, match="checksum"):
        ck.load_checkpoint(p)


def test_foreign_file_is_rejected(tmp_path):
    p = tmp_path / "c.pt"
    torch.save({"model": {}}, p)
    with pytest.raises(MtkitError, match="not an mtkit checkpoint"):
        ck.load_checkpoint(p)
    with pytest.raises(MtkitError, match="not found"):
        ck.load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(MtkitError, match="directory"):
        ck.load_checkpoint(tmp_path)


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    p = tmp_path / "c.pt"
    ck.save_checkpoint(p, _payload(1.0))

    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", disk_full)
    with pytest.raises(MtkitError, match="No space left"):
        ck.save_checkpoint(p, _payload(9.0))
    monkeypatch.undo()
    assert torch.equal(ck.load_checkpoint(p)["model"]["w"], torch.full((4, 3), 1.0))
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    p = tmp_path / "c.pt"
    ck.save_checkpoint(p, _payload(1.0))

    def killed(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(p, _payload(9.0))
    monkeypatch.undo()
    assert torch.equal(ck.load_checkpoint(p)["model"]["w"], torch.full((4, 3), 1.0))


def test_temp_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "checkpoint_last.pt"
    stale = tmp_path / f"checkpoint_last.pt.tmp-{dead.pid}"
    live = tmp_path / f"checkpoint_last.pt.tmp-{os.getppid()}"  # a writer that still runs
    other = tmp_path / f"checkpoint_10.pt.tmp-{dead.pid}"  # another checkpoint's: left to its writer
    for f in (stale, live, other):
        f.write_bytes(b"partial")
    ck.save_checkpoint(path, _payload())
    assert not stale.exists() and live.exists() and other.exists()
    assert torch.equal(ck.load_checkpoint(path)["model"]["w"], torch.ones(4, 3))

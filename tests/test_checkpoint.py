import os

import pytest
import torch

from mtkit import checkpoint as ck
from mtkit.errors import MtkitError


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


def test_build_payload_names_the_entries_and_drops_missing_ones():
    state = {"w": torch.ones(2)}
    payload = ck.build_payload({"model": {}}, state, spm=None, vocab={"src_size": 5}, update=3, epoch=None)
    assert payload == {"config": {"model": {}}, "vocab": {"src_size": 5}, "model": state, "update": 3}
    with pytest.raises(ValueError, match="unknown checkpoint payload entries: updates"):
        ck.build_payload({}, state, updates=3)


def test_subword_entries_take_special_ids_from_the_target_model():
    from mtkit.data.subword import train_sentencepiece

    src = train_sentencepiece([f"a b c {i}" for i in range(50)], vocab_size=20, num_threads=1)
    tgt = train_sentencepiece([f"x y z w {i}" for i in range(50)], vocab_size=24, num_threads=1)
    entries = ck.subword_entries(src, tgt)
    assert entries["spm"] == {"src": src.model_bytes, "tgt": tgt.model_bytes}
    assert entries["vocab"] == {"src_size": src.size, "tgt_size": tgt.size, "pad": tgt.pad, "bos": tgt.bos,
                                "eos": tgt.eos, "unk": tgt.unk, "joint": False}
    assert ck.subword_entries(src, src)["vocab"]["joint"] is True


def test_load_model_names_weights_that_do_not_fit_the_config(tmp_path):
    from mtkit.config import load_config
    from mtkit.data.subword import train_sentencepiece
    from mtkit.models import build_model

    spm = train_sentencepiece([f"a b c {i}" for i in range(50)], vocab_size=20, num_threads=1)
    cfg = load_config("transformer_tiny", ["model.d_model=16", "model.ffn_dim=32", "model.heads=2"])
    model = build_model(cfg.model, spm.size, spm.size, spm.pad)
    state = model.state_dict()
    name = next(k for k, v in state.items() if v.dim() == 2)
    state[name] = torch.zeros(3, 3)
    path = tmp_path / "c.pt"
    ck.save_checkpoint(path, ck.build_payload(cfg.to_dict(), state, **ck.subword_entries(spm, spm)))
    with pytest.raises(MtkitError, match="does not match its model config"):
        ck.load_model(path)
    ck.save_checkpoint(path, ck.build_payload(cfg.to_dict(), model.state_dict(), **ck.subword_entries(spm, spm)))
    rebuilt, cfg2, _, _ = ck.load_model(path)
    assert cfg2.to_dict() == cfg.to_dict() and not rebuilt.training

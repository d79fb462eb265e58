from __future__ import annotations

import pytest

from mtkit.utils import atomic_path, atomic_write_text


def test_atomic_write_replaces_the_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old\n", encoding="utf-8")
    assert atomic_write_text(path, "new\n") == path
    assert path.read_text(encoding="utf-8") == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old\n", encoding="utf-8")
    with pytest.raises(OSError, match="disk full"), atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith("out.txt.tmp-")
        tmp.write_text("half a new fi", encoding="utf-8")
        raise OSError("disk full")
    assert path.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_an_interrupted_write_of_a_new_file_leaves_nothing(tmp_path):
    path = tmp_path / "new.txt"
    with pytest.raises(KeyboardInterrupt), atomic_path(path) as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_temp_file_left_by_this_process_is_replaced(tmp_path):
    path = tmp_path / "out.txt"
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"first")
    tmp.write_bytes(b"left over")  # e.g. a write killed before its cleanup ran
    with atomic_path(path) as again:
        assert again == tmp and not again.exists()
        again.write_bytes(b"whole")
    assert path.read_bytes() == b"whole" and not tmp.exists()


def test_an_atomic_write_that_never_writes_fails_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError), atomic_path(path):
        pass
    assert path.read_text(encoding="utf-8") == "old\n"

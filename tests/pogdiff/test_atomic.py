"""The one atomic-write helper: whole file or old file, shared mode, nothing left behind on failure."""

from __future__ import annotations

import stat

import pytest

from pogdiff.atomic import TMP_SUFFIX, write_atomic, write_bytes_atomic, write_folder_atomic, write_text_atomic


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_file_is_written_whole_with_the_shared_mode(tmp_path):
    path = write_text_atomic(tmp_path / "sub" / "a.txt", "hello")
    assert path.read_text() == "hello"
    assert _mode(path) == 0o644
    write_bytes_atomic(path, b"again")
    assert path.read_bytes() == b"again"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "a.txt", "old")

    def half(handle):
        handle.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half)
    assert path.read_text() == "old"
    assert not list(tmp_path.glob(f".*{TMP_SUFFIX}"))


def test_folder_is_swapped_in_whole_and_replaces_the_old_one(tmp_path):
    target = tmp_path / "model"

    def first(folder):
        (folder / "weights").write_bytes(b"1")
        (folder / "extra").write_bytes(b"x")

    write_folder_atomic(target, first)
    assert sorted(p.name for p in target.iterdir()) == ["extra", "weights"]
    assert _mode(target) == 0o755
    write_folder_atomic(target, lambda folder: (folder / "weights").write_bytes(b"2"))
    assert sorted(p.name for p in target.iterdir()) == ["weights"]  # replaced, not merged
    assert (target / "weights").read_bytes() == b"2"

    def broken(folder):
        (folder / "weights").write_bytes(b"3")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_folder_atomic(target, broken)
    assert (target / "weights").read_bytes() == b"2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

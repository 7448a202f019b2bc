"""pkvm._files.atomic_output: the one writer of whole output files."""

from __future__ import annotations

import os
import tempfile

import pytest

from pkvm._files import atomic_output


def _refuse_in(monkeypatch, directory):
    mkstemp = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and os.path.realpath(dir) == os.path.realpath(directory):
            raise PermissionError(13, "Permission denied", os.path.join(dir, ".pkvm-x"))
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)


def test_a_regular_file_is_replaced_whole(tmp_path):
    out = tmp_path / "r.json"
    out.write_text("old")
    with atomic_output(out) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)
        with open(tmp, "w") as f:
            f.write("new")
    assert out.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_a_failed_block_leaves_the_file_as_it_was(tmp_path):
    out = tmp_path / "r.json"
    out.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(out) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("writer failed")
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_a_writable_file_in_a_locked_directory_is_written_in_place(tmp_path, monkeypatch):
    """A file the user may write in a directory the user may not: no temporary file can go
    beside it, so it is written in place (it used to fail with EACCES)."""
    out = tmp_path / "r.json"
    out.write_text("old")
    ino = os.stat(out).st_ino
    _refuse_in(monkeypatch, tmp_path)
    with atomic_output(out) as tmp:
        assert os.path.dirname(tmp) != str(tmp_path)
        with open(tmp, "w") as f:
            f.write("new")
    assert out.read_text() == "new"
    assert os.stat(out).st_ino == ino  # the same file, written in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_a_new_file_in_a_locked_directory_is_refused(tmp_path, monkeypatch):
    _refuse_in(monkeypatch, tmp_path)
    with pytest.raises(PermissionError), atomic_output(tmp_path / "new.json"):
        pass
    assert list(tmp_path.iterdir()) == []

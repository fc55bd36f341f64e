"""Atomic writes: outputs appear complete or not at all; inputs are never touched."""

from __future__ import annotations

import pytest

from ctp2mri.errors import InputError
from ctp2mri.io.atomic import atomic_dir, atomic_path, ensure_writable_dir


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_path_appears_only_on_success(tmp_path):
    target = tmp_path / "out" / "img.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".nii.gz")
        assert tmp.name.startswith(".")  # hidden while incomplete
        tmp.write_bytes(b"complete")
        assert not target.exists()
    assert target.read_bytes() == b"complete"
    assert _listing(target.parent) == ["img.nii.gz"]


def test_atomic_path_failure_keeps_old_file_and_leaves_no_partial(tmp_path):
    target = tmp_path / "img.nrrd"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"old"
    assert _listing(tmp_path) == ["img.nrrd"]


def test_atomic_dir_success_failure_and_overwrite(tmp_path):
    target = tmp_path / "case"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not target.exists()
    assert _listing(target) == ["a.txt"]

    with pytest.raises(InputError, match="already exists and is not empty"):
        with atomic_dir(target):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(target, overwrite=True) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("crash")
    assert _listing(target) == ["a.txt"] and _listing(tmp_path) == ["case"]

    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert _listing(target) == ["b.txt"] and _listing(tmp_path) == ["case"]


def test_atomic_dir_into_existing_empty_folder(tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("x")
    assert _listing(target) == ["x"]


def test_atomic_dir_overwriting_a_file_removes_it(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file where the folder should go")
    with pytest.raises(InputError, match="already exists"):
        with atomic_dir(target):
            pass
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "x").write_text("x")
    assert target.is_dir() and _listing(tmp_path) == ["out"]


def test_ensure_writable_dir(tmp_path):
    made = ensure_writable_dir(tmp_path / "a" / "b")
    assert made.is_dir() and _listing(made) == []  # the write probe is cleaned up
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="exists and is a file; give a folder"):
        ensure_writable_dir(tmp_path / "afile")
    # root ignores permission bits, so block with a file in the path instead of chmod
    with pytest.raises(InputError, match="afile exists and is a file"):
        ensure_writable_dir(tmp_path / "afile" / "out")
    with pytest.raises(InputError, match="cannot write to output folder"):
        ensure_writable_dir("/proc/ctp2mri-test")

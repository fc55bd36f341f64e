"""Atomic writes: a file or folder either appears complete or not at all.

Everything is first written next to its final place (same file system) under a hidden
temporary name, then moved into place with ``os.replace``. A crash, a full disk or a
cancelled run therefore never leaves a half-written NIfTI that a later run would trust.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from ctp2mri.errors import InputError


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove it is writable, or raise a clear `InputError`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"output {path} exists and is a file; give a folder")
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise InputError(
            f"cannot create output folder {path}: {blocker} exists and is a file; "
            "choose another output folder"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".ctp2mri-write-test-"):
            pass
    except OSError as exc:
        raise InputError(
            f"cannot write to output folder {path}: {exc.strerror or exc}. "
            "Choose a folder you have write permission for."
        ) from None
    return path


def _suffix(path: Path) -> str:
    """Full suffix, so that ``x.nii.gz`` keeps ``.nii.gz`` (writers pick format from it)."""
    name = path.name
    for compound in (".nii.gz", ".tar.gz"):
        if name.endswith(compound):
            return compound
    return path.suffix


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path``.

    The temporary name keeps the extension, so format-sniffing writers (nibabel,
    SimpleITK) write the intended format.
    """
    path = Path(path)
    ensure_writable_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial{_suffix(path)}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it becomes ``path``.

    An existing ``path`` is refused unless ``overwrite``; then it is swapped out only after
    the new folder is complete, so the old content survives any failure.
    """
    path = Path(path)
    if path.exists() and not overwrite and (path.is_file() or any(path.iterdir())):
        raise InputError(f"{path} already exists and is not empty; pass overwrite to replace it")
    ensure_writable_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:  # overwriting a file with a folder: rmtree would silently leave it behind
                old.unlink()
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

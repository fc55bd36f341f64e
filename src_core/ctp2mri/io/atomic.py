"""Atomic writes: a file or folder either appears complete or not at all.

Everything is first written next to its final place (same file system) under a hidden
temporary name, then moved into place with ``os.replace``. A crash, a full disk or a
cancelled run therefore never leaves a half-written NIfTI that a later run would trust.

Three more guarantees:

* **One writer per output.** `claim_output` takes an exclusive lock beside the output
  (``.<name>.ctp2mri-lock``, an OS file lock the kernel drops when its process dies) for as
  long as a run works towards that output; a second run into the same place is refused at
  once instead of silently replacing the first one's result (the lock files:
  `ctp2mri.io.locks`). `atomic_dir` takes the claim itself, and a new folder is moved into
  place only if nothing else appeared there meanwhile.
* **No stale leftovers.** The temporary names carry the writer's process id and host
  (``.<name>.<uuid>.<pid>-<host>.partial``); a run that was killed (SIGKILL, power loss)
  leaves one behind, and the next write to the same place removes it once that process is
  gone.
* **Clear errors.** A full disk or a missing permission while writing becomes an
  `InputError` naming the path and the space needed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ctp2mri.errors import (
    DISK_FULL,
    NOT_PERMITTED,
    InputError,
    OutputWriteError,
    disk_full_message,
    permission_message,
)
from ctp2mri.interrupts import deferred
from ctp2mri.io.locks import acquire_lock, lock_path, release_lock, remove_empty

__all__ = ["atomic_dir", "atomic_path", "claim_output", "clean_stale_partials", "ensure_writable_dir"]

_log = logging.getLogger(__name__)


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
        if exc.errno in DISK_FULL:
            raise InputError(disk_full_message(path)) from None
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


# writers and stale leftovers ---------------------------------------------------------------
def _host_tag() -> str:
    """4 hex digits naming this machine: a pid means nothing on another host sharing the disk."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:4]


def _writer_tag() -> str:
    return f"{os.getpid()}-{_host_tag()}"


def _temp_name(path: Path, kind: str, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.{_writer_tag()}.{kind}{suffix}")


def _pid_alive(pid: int) -> bool:
    try:
        import psutil

        return psutil.pid_exists(pid)
    except ImportError:  # pragma: no cover - psutil is a dependency
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def clean_stale_partials(path: str | os.PathLike, legacy: bool = False) -> list[Path]:
    """Remove the temporary files/folders that killed writers left beside ``path``.

    A leftover is stale when its writer (the pid and host in its name) is a process of this
    machine that no longer runs. ``legacy`` also removes leftovers without a writer tag (from
    older versions); only pass it while holding `claim_output` on ``path``, which proves no
    writer is active there. A stale ``.old`` (a previous result being swapped out when its
    writer died) is moved back to ``path`` if nothing took its place. Returns what was removed.
    """
    path = Path(path)
    tagged = r"(?:\.(\d+)-([0-9a-f]{4}))?"  # .<pid>-<host>, absent in older versions' names
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.[0-9a-f]{{8}}{tagged}\.(?:partial|old)")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    host = _host_tag()
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None:
            continue
        pid, tag = match.group(1), match.group(2)
        stale = (legacy if pid is None else tag == host and int(pid) != os.getpid() and not _pid_alive(int(pid)))
        if not stale:
            continue
        leftover = Path(entry.path)
        if entry.name.endswith(".old") and not os.path.lexists(path):
            # the writer died between its two renames: this is the only copy of the previous result
            try:
                os.rename(leftover, path)
                _log.warning("restored %s from %s, left by an interrupted run", path, leftover.name)
            except OSError:
                pass  # never delete it
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                leftover.unlink()
        removed.append(leftover)
    if removed:
        _log.info("removed %d leftover(s) of interrupted runs beside %s", len(removed), path)
    return removed


# claims ----------------------------------------------------------------------------------
@dataclass
class _Claim:
    thread: int
    fd: int | None
    lock: Path
    created: list[Path] = field(default_factory=list)
    depth: int = 1


_CLAIMS: dict[str, _Claim] = {}
_CLAIMS_LOCK = threading.Lock()


@contextlib.contextmanager
def claim_output(path: str | os.PathLike) -> Iterator[Path]:
    """Hold ``path`` (a file or folder to be written) for this run, or raise `InputError` when
    another run holds it.

    The claim lasts until the context exits; the operating system drops it if the process
    dies. Nested claims of the same path from the same thread are allowed (the CLI claims a
    run's output, the core function and `atomic_dir` claim it again); another thread is
    refused like another process. Missing parent folders are created and removed again on
    exit if nothing was written into them.
    """
    given = Path(path)
    path = Path(os.path.abspath(given))  # "out/.." and "." name their folder, not "" or ".."
    if not path.name:  # a file-system root: nothing beside it to lock
        yield given
        return
    key = os.path.join(os.path.realpath(path.parent), path.name)
    with _CLAIMS_LOCK:
        claim = _CLAIMS.get(key)
        if claim is not None:
            if claim.thread != threading.get_ident():
                raise InputError(f"{path} is being written by another task of this program; wait for it to "
                                 "finish, or choose another output folder")
            claim.depth += 1
        else:
            fd, created = acquire_lock(path)
            claim = _CLAIMS[key] = _Claim(threading.get_ident(), fd, lock_path(path), created)
    try:
        yield given
    finally:
        with _CLAIMS_LOCK:
            claim.depth -= 1
            if claim.depth == 0:
                del _CLAIMS[key]
                release_lock(claim.fd, claim.lock)
                remove_empty(claim.created)


# atomic writes -----------------------------------------------------------------------------
def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


@contextlib.contextmanager
def _write_errors(path: Path, tmp: Path, needed: int | None) -> Iterator[None]:
    """A full disk or a refused write while filling ``tmp`` → an `OutputWriteError` whose message
    names ``path`` and the space needed (rather than a hidden temporary name)."""
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as exc:
        if exc.errno in DISK_FULL:
            size = needed if needed or not tmp.exists() else _tree_bytes(tmp)
            raise OutputWriteError(exc.errno, disk_full_message(path, size, at_least=not needed), path) from None
        if exc.errno in NOT_PERMITTED:
            raise OutputWriteError(exc.errno, permission_message(path, exc), path) from None
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path``.

    The temporary name keeps the extension, so format-sniffing writers (nibabel,
    SimpleITK) write the intended format. ``needed_bytes`` (the expected size) makes a
    full-disk message say how much space is needed.
    """
    path = Path(path)
    ensure_writable_dir(path.parent)
    clean_stale_partials(path)
    tmp = _temp_name(path, "partial", _suffix(path))
    try:
        with _write_errors(path, tmp, needed_bytes):
            yield tmp
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _occupied(path: Path) -> bool:
    return path.exists() and (path.is_file() or any(path.iterdir()))


def _move_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    """``tmp`` becomes ``path``; without ``overwrite`` only if ``path`` is still absent or empty."""
    if overwrite and path.exists():
        old = _temp_name(path, "old")
        try:
            with deferred():  # Ctrl-C between the two renames would leave neither result in place
                os.replace(path, old)
                try:
                    os.replace(tmp, path)
                except OSError:
                    os.replace(old, path)  # put the previous result back
                    raise
        finally:
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            elif os.path.lexists(old):  # overwriting a file with a folder: rmtree would leave it behind
                old.unlink()
        return
    try:
        # rename replaces an empty folder but fails on a non-empty one: a result that another
        # writer put there meanwhile is never lost
        os.rename(tmp, path)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise InputError(f"{path} was written by another run while this one was working; nothing was "
                             "replaced. Choose another output folder, or pass overwrite to replace it") from None
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False,
               needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it becomes ``path``.

    An existing ``path`` is refused unless ``overwrite``; then it is swapped out only after
    the new folder is complete, so the old content survives any failure. ``path`` is claimed
    (`claim_output`) while the folder is written, and leftovers of killed writers beside it
    are removed first. ``needed_bytes`` (the expected size) makes a full-disk message say how
    much space is needed.
    """
    path = Path(path)
    with claim_output(path):
        clean_stale_partials(path, legacy=True)
        if _occupied(path) and not overwrite:
            raise InputError(f"{path} already exists and is not empty; pass overwrite to replace it")
        ensure_writable_dir(path.parent)
        tmp = _temp_name(path, "partial")
        try:
            with _write_errors(path, tmp, needed_bytes):
                tmp.mkdir()
                yield tmp
                _move_into_place(tmp, path, overwrite)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

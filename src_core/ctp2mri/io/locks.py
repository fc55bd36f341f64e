"""Lock files beside an output: the operating-system half of `ctp2mri.io.atomic.claim_output`.

The lock file ``.<name>.ctp2mri-lock`` carries an exclusive OS file lock (``flock``; one locked
byte on Windows), which the kernel drops when its process dies, and a note naming its holder
for the message that refuses a second run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import socket
import sys
from pathlib import Path

from ctp2mri.errors import (
    DISK_FULL,
    NOT_PERMITTED,
    InputError,
    disk_full_message,
    os_error_message,
    permission_message,
)

try:  # POSIX; Windows locks a byte with msvcrt instead
    import fcntl
except ImportError:  # pragma: no cover - exercised on Windows only
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_SUFFIX", "acquire_lock", "lock_path", "release_lock", "remove_empty"]

LOCK_SUFFIX = ".ctp2mri-lock"
# errors meaning "this file system has no locks": claims then rely on the exclusive rename alone
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def lock_path(path: Path) -> Path:
    """The lock file of ``path``: ``.<name>.ctp2mri-lock`` beside it."""
    return path.with_name(f".{path.name}{LOCK_SUFFIX}")


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created (deepest last)."""
    missing = []
    here = folder
    while not here.exists() and here != here.parent:
        missing.append(here)
        here = here.parent
    if here.exists() and not here.is_dir():
        raise InputError(f"cannot create output folder {folder}: {here} exists and is a file, not a "
                         "writable folder; choose another output folder")
    created = []
    for p in reversed(missing):
        try:
            p.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            remove_empty(created)
            raise InputError(_write_failure(p, exc)) from None
        created.append(p)
    return created


def remove_empty(created: list[Path]) -> None:
    """Remove the folders a claim created (deepest first), if nothing was written into them."""
    for p in reversed(created):
        with contextlib.suppress(OSError):
            p.rmdir()


def _write_failure(path: Path, exc: OSError) -> str:
    if exc.errno in DISK_FULL:
        return disk_full_message(path)
    if exc.errno in NOT_PERMITTED:
        return permission_message(path, exc)
    return f"cannot write {path}: {os_error_message(exc)}"


def _try_lock(fd: int) -> bool:
    """Lock ``fd`` without waiting: True when locked, False when another process holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    return True


def _owner(fd: int) -> str:
    """Who holds a lock, from the note its holder wrote (best effort)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        note = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"pid {note['pid']} on {note['host']}, started {note['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "process unknown"


def acquire_lock(path: Path) -> tuple[int | None, list[Path]]:
    """Lock ``path``'s lock file, creating missing parent folders, or raise `InputError`
    naming the holder when another process has it.

    Returns
    -------
    fd, created
        The locked file's descriptor (None where the file system has no locks) and the
        folders created for it, for `remove_empty` once the claim ends.
    """
    lock = lock_path(path)
    created = _make_parents(lock.parent)
    try:
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = _try_lock(fd)
            except OSError as exc:
                os.close(fd)
                if exc.errno in _NO_LOCKS:
                    return None, created
                raise
            if not locked:
                owner = _owner(fd)
                os.close(fd)
                raise InputError(f"{path} is being written by another ctp2mri run ({owner}); wait for it to "
                                 "finish, or choose another output folder")
            # The previous holder deletes the file as it lets go: if it did so between our open
            # and our lock, we hold a lock on a deleted file. Open the current one again.
            try:
                current = os.stat(lock)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
                break
            os.close(fd)
        note = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": _dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(note).encode())
        return fd, created
    except InputError:
        remove_empty(created)
        raise
    except OSError as exc:
        remove_empty(created)
        raise InputError(_write_failure(lock.parent, exc)) from None


def release_lock(fd: int | None, lock: Path) -> None:
    """Delete ``lock`` and let go of it; ``fd`` None (a file system without locks) holds nothing."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        lock.unlink()  # unlink while still locked: see the re-open in `acquire_lock`
    with contextlib.suppress(OSError):
        if fcntl is not None:
            # explicit unlock: forked children (DataLoader workers) share the descriptor
            fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)

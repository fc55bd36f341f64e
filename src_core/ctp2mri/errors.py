"""Errors that speak to the user, and the one place that turns any error into one line.

`user_message` is what ``ctp2mri`` (`ctp2mri.cli.main`) prints for a failed command; the
napari widgets can show the same text. Core code raises `InputError` for what the user can
fix; a full disk or a permission problem arrives as an `OSError` and is described here, so
every command reports it alike.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

#: errno values that mean "the disk (or the user's quota) is full".
DISK_FULL = (errno.ENOSPC, errno.EDQUOT) if hasattr(errno, "EDQUOT") else (errno.ENOSPC,)
#: errno values that mean "not allowed to write there".
NOT_PERMITTED = (errno.EACCES, errno.EPERM, errno.EROFS)


class InputError(ValueError):
    """Input the user can fix: wrong shape, NaN voxels, mismatched grids, bad files.

    The message always says what is wrong and what to do about it; the CLI prints it
    without a traceback and napari shows it as a notification.
    """


class Cancelled(RuntimeError):
    """Raised inside long-running work when the user's cancel token is set.

    ``checkpoint`` and ``step`` are set when a training run saved a resumable checkpoint
    before stopping, so the caller can say how to resume it.
    """

    def __init__(self, message: str = "cancelled by the user", *, checkpoint: str | os.PathLike | None = None,
                 step: int | None = None) -> None:
        super().__init__(message)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.step = step


class OutputWriteError(OSError):
    """Writing an output failed for a reason outside the program (a full disk, no permission).

    Still an `OSError` (with its ``errno`` and ``filename``), but ``str()`` is a whole sentence
    naming the path and, for a full disk, the free and the needed space.
    """

    def __init__(self, code: int, message: str, path: str | os.PathLike) -> None:
        super().__init__(code, message, os.fspath(path))
        self.message = message

    def __str__(self) -> str:
        return self.message


def human_bytes(n: float) -> str:
    """``1536`` → ``"1.5 KiB"``: sizes in messages."""
    n = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop always returns


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space for unprivileged writes on the file system holding ``path`` (or its nearest
    existing parent), or None when it cannot be read."""
    here = Path(path).absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        return shutil.disk_usage(here).free
    except OSError:
        return None


def disk_full_message(path: str | os.PathLike, needed: int | None = None, at_least: bool = False) -> str:
    """What to say when writing ``path`` ran out of space.

    ``needed`` is the output's expected size, or with ``at_least`` what had been written when
    the disk filled (the output needs more than that).
    """
    free = free_bytes(path)
    have = f"{human_bytes(free)} free there" if free is not None else "the free space could not be read"
    need = ""
    if needed:
        need = f"; the output needs {'more than' if at_least else 'up to'} {human_bytes(needed)}"
    return (f"No space left on device writing {path} ({have}{need}); free some space or choose an output "
            "folder on another disk. Nothing was written.")


def permission_message(path: str | os.PathLike, exc: OSError) -> str:
    why = "the file system is read-only" if exc.errno == errno.EROFS else "permission denied"
    return f"cannot write {path}: {why}; choose a folder you can write to (or fix its permissions)"


def os_error_message(exc: OSError) -> str:
    """One line for an `OSError`: the path, what went wrong and what to do."""
    path = exc.filename if exc.filename is not None else "the output"
    if exc.errno in DISK_FULL:
        return disk_full_message(path)
    if exc.errno in NOT_PERMITTED:
        return permission_message(path, exc)
    if exc.errno == errno.EMFILE:
        return "too many open files; raise the limit (ulimit -n) and run again"
    return f"{exc.strerror or exc} ({path})"


def user_message(exc: BaseException) -> str | None:
    """The one-line message for an error the user can act on, or None for a bug (a traceback is
    then the right report)."""
    if isinstance(exc, InputError):
        return " ".join(str(exc).split())  # one line, whatever the message's layout
    if isinstance(exc, OutputWriteError):
        return " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.errno is not None:
        return " ".join(os_error_message(exc).split())
    if isinstance(exc, MemoryError):
        return ("out of memory; close other programs, use a machine with more memory, or lower "
                "--batch-size")
    return None

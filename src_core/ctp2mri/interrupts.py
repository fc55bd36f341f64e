"""Ctrl-C (SIGINT) and SIGTERM for the command line: stop cleanly, never mid-write.

`handle_interrupts` turns both signals into `Interrupted` (a `KeyboardInterrupt`), so a
``kill`` unwinds like Ctrl-C does: `ctp2mri.io.atomic` removes its temporary files and
releases its claims on the way out. Given a `CancelToken`, the first signal only sets it, so
that work which checks the token (training: after the current step) can finish what it is
doing, save, and raise `ctp2mri.errors.Cancelled`; a second signal stops at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

from ctp2mri.progress import CancelToken

__all__ = ["HANDLED_SIGNALS", "Interrupted", "deferred", "exit_code", "handle_interrupts"]

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_depth = 0  # nesting of `deferred` blocks
_pending: list[int] = []  # signals that arrived inside one


class Interrupted(KeyboardInterrupt):
    """Raised by the handler; ``signum`` is the signal received."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def exit_code(exc: BaseException) -> int:
    """The shell's convention for death by a signal: 128 + its number (130 for Ctrl-C)."""
    return 128 + getattr(exc, "signum", int(signal.SIGINT))


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Steps that must not be separated (swapping an old result for a new one: two renames)
    run to the end; a signal caught by `handle_interrupts` meanwhile takes effect after them."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if _depth == 0 and _pending:
        signum = _pending[0]
        _pending.clear()
        raise Interrupted(signum)


@contextlib.contextmanager
def handle_interrupts(token: CancelToken | None = None,
                      on_first: Callable[[int], None] | None = None) -> Iterator[None]:
    """SIGINT/SIGTERM inside the block raise `Interrupted`; with ``token`` the first one sets the
    token instead (and calls ``on_first(signum)``, e.g. to say what happens now).

    Signal handlers can only be installed from the main thread; elsewhere (napari's workers)
    this does nothing. The previous handlers are restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if token is not None and not token.cancelled:
            token.cancel()
            if on_first is not None:
                on_first(signum)
            return
        if _depth:
            _pending.append(signum)
            return
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)

"""One progress/cancel mechanism shared by the CLI (tqdm) and napari (thread_worker).

Long-running core functions take ``progress(step, total, info)`` and a ``CancelToken``;
they call the callback after each unit of work and ``token.raise_if_cancelled()`` before
the next, so the same loop drives a terminal progress bar and a napari progress widget.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Protocol

from ctp2mri.errors import Cancelled


class ProgressCallback(Protocol):
    def __call__(self, step: int, total: int, info: dict[str, Any]) -> None: ...


class CancelToken:
    """Thread-safe cancel flag, set from the GUI thread, read from the worker."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


def noop_progress(step: int, total: int, info: dict[str, Any]) -> None:
    """Default callback: report nothing."""


def tqdm_progress(desc: str, unit: str = "step") -> tuple[ProgressCallback, Callable[[], None]]:
    """A callback that drives a tqdm bar, and a function that closes the bar."""
    from tqdm.auto import tqdm

    bar: Optional[tqdm] = None

    def callback(step: int, total: int, info: dict[str, Any]) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit=unit)
        bar.total = total
        bar.n = step
        if info:
            bar.set_postfix({k: v for k, v in info.items() if isinstance(v, (int, float, str))}, refresh=False)
        bar.refresh()

    def close() -> None:
        if bar is not None:
            bar.close()

    return callback, close

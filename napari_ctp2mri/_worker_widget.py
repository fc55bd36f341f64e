"""The worker shell the synthesis, perfusion and post-training widgets share.

A long run happens in a napari worker thread (`napari.qt.threading.create_worker`). The core
reports through a plain ``progress(step, total, info)`` callback, called in that thread; the
callback only emits a Qt signal of a `QObject` relay that lives in the GUI thread, so Qt
queues each report to the event loop and the progress bar is updated there: the worker never
touches a widget. Cancel sets a `CancelToken` that the core checks between its steps.

`WorkerWidget` holds what every such widget does the same way: the relay, the busy state
(Run/Start disabled, Cancel enabled, the progress bar shown), errors and cancellation as
notifications (never a traceback in the event loop), the result's layers added one per
event-loop turn, and a widget closed mid-run that stops listening and cancels its run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from magicgui.widgets import Container
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtWidgets import QProgressBar

from ctp2mri.errors import Cancelled, InputError
from ctp2mri.progress import CancelToken, ProgressCallback

if TYPE_CHECKING:
    import napari

__all__ = ["PhaseEta", "PhaseProgressRelay", "ProgressRelay", "WorkerWidget", "format_eta"]

FAILED = "Failed: see the notification"


class ProgressRelay(QObject):
    """Carries the worker thread's progress reports to the GUI thread: (step, total, info)."""

    reported = Signal(int, int, object)


class PhaseProgressRelay(QObject):
    """Carries the worker's reports to the GUI thread: (phase, step, total, info)."""

    reported = Signal(str, int, int, object)


def format_eta(seconds: float) -> str:
    """``"ETA 42 s"``/``"ETA 3 min 05 s"``; empty while no estimate exists (first step)."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    s = round(seconds)
    return f"ETA {s} s" if s < 60 else f"ETA {s // 60} min {s % 60:02d} s"


class PhaseEta:
    """The remaining time of each phase of a run, from the rate since its first report.

    Timed from the phase's first report, not from its start: the first step also loads and
    warms up, which the steps after it do not repeat.
    """

    def __init__(self) -> None:
        self._anchors: dict[str, tuple[int, float]] = {}

    def reset(self) -> None:
        """Forget every phase (a new run)."""
        self._anchors.clear()

    def __call__(self, phase: str, step: int, total: int, seconds: float) -> str:
        """`format_eta` of the time left after ``step`` of ``total``, reported at ``seconds``."""
        anchor = self._anchors.setdefault(phase, (step, seconds))
        if step <= anchor[0]:
            return ""
        return format_eta((seconds - anchor[1]) / (step - anchor[0]) * (total - step))


class WorkerWidget(Container):
    """A form that runs one job at a time in a worker thread, with progress and Cancel.

    A subclass builds its fields, adds ``status`` (a Label), ``cancel_button`` and the
    buttons that start a run (`run_buttons`), calls `_add_progress_bar` where the bar goes,
    and implements ``_on_progress`` (connected to ``relay.reported``, with the relay's
    arguments) and the ``returned`` handlers it passes to `_start_worker`.

    Parameters
    ----------
    viewer
        The napari viewer (npe2 passes it).
    """

    #: what the notifications call a run: "<TASK> failed (…)", "<TASK> cancelled; …"
    TASK = "The run"
    relay_class: type[QObject] = ProgressRelay

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        # Parentless on purpose: it must outlive a widget closed mid-run, since the worker
        # still reports through it until the cancel takes effect.
        self.relay = self.relay_class()
        self.relay.reported.connect(self._on_progress)
        self.worker: Any = None  # the running worker, None when idle
        self.cancel_token: CancelToken | None = None  # the running run's token
        self.result: Any = None  # the last finished run's result
        self.run_buttons: list[Any] = []  # disabled while a run is going
        self._pending: list[Callable[[], None]] = []  # layer updates not yet made
        self._closed = False  # the Qt widget is gone: late worker signals are dropped
        self._hooks: list[tuple[Any, Callable[..., Any]]] = []
        # a closed widget must stop listening and stop its run: the worker would otherwise
        # report into deleted Qt objects
        self.native.destroyed.connect(self._on_destroyed)

    def _add_progress_bar(self) -> QProgressBar:
        """The run's progress bar, hidden while idle, added at the end of the form."""
        self.progress_bar = QProgressBar()
        self.progress_bar.setTextVisible(True)
        self.progress_bar.setVisible(False)
        self.native.layout().addWidget(self.progress_bar)
        return self.progress_bar

    def _listen(self, event: Any, callback: Callable[..., Any]) -> None:
        """Connect ``callback`` to an event outside the widget, until the widget closes."""
        event.connect(callback)
        self._hooks.append((event, callback))

    def _on_destroyed(self, *_args: Any) -> None:
        self._closed = True
        for event, callback in self._hooks:
            event.disconnect(callback)
        self._hooks = []
        self._stop_on_close()

    def _stop_on_close(self) -> None:
        if self.cancel_token is not None:
            self.cancel_token.cancel()

    # run --------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """True from Run (Start) until the run has ended and its layers, if any, are all in the
        viewer; or it failed or was cancelled."""
        return self.worker is not None or bool(self._pending)

    @property
    def cancelling(self) -> bool:
        """True once Cancel was pressed for the running run."""
        return self.cancel_token is not None and self.cancel_token.cancelled

    def _reporter(self) -> ProgressCallback:
        """The core's ``progress`` callback for a worker: it only emits the relay's signal."""
        emit = self.relay.reported.emit

        def report(step: int, total: int, info: dict[str, Any]) -> None:
            emit(step, total, dict(info))  # the GUI thread gets its own copy
        return report

    def _start_worker(self, work: Callable[[], Any], returned: Callable[[Any], None],
                      token: CancelToken, status: str) -> Any:
        """Run ``work`` in a worker thread, the widget busy until it ends; returns the worker."""
        self.cancel_token = token
        self._set_running(True)
        self.status.value = status
        # errored is connected at creation: a worker without an errored handler re-raises
        # its exception in the Qt event loop (a traceback instead of a notification)
        self.worker = create_worker(work, _start_thread=False, _connect={
            "returned": returned, "errored": self._on_error, "finished": self._on_finished})
        self.worker.start()
        return self.worker

    def cancel(self) -> None:
        """Ask the running job to stop; the core stops at its next step (or stage)."""
        if self.cancel_token is not None:
            self.cancel_token.cancel()
            self.status.value = "Cancelling…"

    def _set_running(self, running: bool) -> None:
        for button in self.run_buttons:
            button.enabled = not running
        self.cancel_button.enabled = running
        self.progress_bar.setVisible(running)
        self.progress_bar.setRange(0, 0)  # busy until the first step is reported
        self.progress_bar.setFormat("")

    def _advance(self, step: int, total: int) -> bool:
        """Move the bar to ``step``; False (and nothing moved) for a report that was queued
        before the run ended, or reached a closed widget."""
        if self.worker is None or self._closed:
            return False
        self.progress_bar.setRange(0, total)
        self.progress_bar.setValue(step)
        return True

    def _accepts(self) -> bool:
        """Whether a returned result is to be shown: not once closed, nor once cancelled (a
        cancel after the last step keeps its promise: nothing added or changed)."""
        if self._closed:
            return False
        if self.cancelling:
            self._notify_cancelled()
            return False
        return True

    def _on_error(self, exc: Exception) -> None:
        if self._closed:
            return
        if isinstance(exc, Cancelled):
            self._notify_cancelled(exc)
            return
        self.status.value, message = self._error_text(exc)
        show_error(message)

    def _error_text(self, exc: Exception) -> tuple[str, str]:
        """The status line and the notification for a failed run."""
        if isinstance(exc, InputError):
            return FAILED, str(exc)
        # a bug, not the user's fault: still a notification, with its type
        return FAILED, f"{self.TASK} failed ({type(exc).__name__}): {exc}"

    def _notify_cancelled(self, exc: Cancelled | None = None) -> None:
        self.status.value = "Cancelled"
        show_info(f"{self.TASK} cancelled; no layers were added or changed")

    def _on_finished(self) -> None:
        self.worker, self.cancel_token = None, None
        if not self._pending and not self._closed:  # else the last layer step ends the run
            self._set_running(False)

    # layers -----------------------------------------------------------------------------
    def _apply_stepwise(self, steps: list[Callable[[], None]]) -> None:
        """Make the result's layer updates one per event-loop turn, then `_on_applied`.

        Creating a layer's visuals takes napari a good fraction of a second on a slow
        machine, and several at once would freeze the viewer. ``busy`` holds until the last.
        """
        self.cancel_button.enabled = False  # the result is in: nothing left to cancel
        self._pending = steps
        self._show_next()

    def _show_next(self) -> None:
        if self._closed:
            self._pending = []
            return
        if self._pending:
            try:
                self._pending[0]()
            finally:  # popped after the step, so `busy` holds until the last layer is in
                self._pending.pop(0)
            if self._pending:
                QTimer.singleShot(0, self._show_next)
                return
        self._on_applied()
        if self.worker is None:
            self._set_running(False)

    def _on_applied(self) -> None:
        """Called once the result's layers are all in the viewer (e.g. to say "Done")."""

"""What the README screenshot scripts share: waiting on a widget, and a clean shot."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable


def wait(app: Any, condition: Callable[[], bool], timeout_s: float, widget: Any = None) -> None:
    """Run the Qt event loop until ``condition()``; a timeout names the widget's status."""
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            status = f"; its status: {widget.status.value!r}" if widget is not None else ""
            raise TimeoutError("the widget did not get there in time" + status)
        app.processEvents()
        time.sleep(0.01)


def save(viewer: Any, app: Any, png: Path, settle_turns: int = 30) -> None:
    """Close the notifications (start-up warnings would cover the canvas), let everything
    repaint, and save the whole window to ``png``."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()
    for _ in range(settle_turns):
        app.processEvents()
        time.sleep(0.02)
    png.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(png), canvas_only=False, flash=False)

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


def synthesised_sample(window: tuple[int, int], samples: int = 1, dock: bool = True) -> tuple[Any, Any, Any]:
    """A viewer with the stroke-phantom sample synthesised by the bundled demo model on the
    CPU (the synthesis widget's defaults): ``(viewer, app, synthesis widget)``."""
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_ctp2mri._synthesis_widget import SynthesisWidget

    viewer = napari.Viewer(title="napari-ctp2mri")
    viewer.window._qt_window.resize(*window)
    viewer.open_sample("napari-ctp2mri", "stroke-phantom")
    app = QApplication.instance()
    widget = SynthesisWidget(viewer)
    if dock:
        viewer.window.add_dock_widget(widget, name="Synthesise DWI/ADC from CTP")
    if widget.model.value is None:
        raise SystemExit("no bundled model is installed (resources/models/demo)")
    widget.device.value = "cpu"
    widget.samples.value = samples
    if widget.run() is None:
        raise SystemExit("the synthesis widget refused to run; see the notification above")
    wait(app, lambda: not widget.busy, 600)
    return viewer, app, widget


def show_largest_lesion_slice(viewer: Any) -> None:
    """Step the viewer to the axial slice with the most voxels of the 'lesion' layer."""
    import numpy as np

    lesion = viewer.layers["lesion"]
    z = int(np.argmax(lesion.data.sum(axis=tuple(range(1, lesion.ndim)))))
    viewer.dims.set_point(viewer.dims.ndim - 3, lesion.data_to_world((z, 0, 0))[0])

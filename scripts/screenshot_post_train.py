"""Screenshot of the post-training widget mid-run, for the README.

    xvfb-run -a .venv/bin/python scripts/screenshot_post_train.py [--model CLDM_FOLDER]

Opens the stroke-phantom sample, corrects its lesion with the Labels brush (as a user would),
docks the post-training widget and starts a run; once the loss plot shows some steps, saves
``viewer.screenshot(canvas_only=False)`` to resources/screenshots/post_train_widget.png, then
cancels the run. The README's shot post-trains the bundled base
(``--model resources/models/demo/cldm_base``); without ``--model`` it post-trains a tiny
randomly initialised cLDM (the test suite's), which is enough to show the widget at work.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _screenshot import save, wait

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PNG = ROOT / "resources" / "screenshots" / "post_train_widget.png"
WINDOW = (1400, 900)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="base cLDM checkpoint (default: a tiny random one)")
    parser.add_argument("--png", type=Path, default=DEFAULT_PNG, help=f"output (default {DEFAULT_PNG})")
    parser.add_argument("--points", type=int, default=70, help="steps in the plot when the shot is taken")
    args = parser.parse_args()

    import napari
    import numpy as np
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_ctp2mri._post_train_widget import PostTrainWidget

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="ctp2mri-screenshot-"))
    base = args.model
    if base is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from _helpers_cldm import save_tiny_cldm

        base = save_tiny_cldm(tmp / "tiny-cldm")

    viewer = napari.Viewer(title="napari-ctp2mri")
    viewer.window._qt_window.resize(*WINDOW)
    viewer.open_sample("napari-ctp2mri", "stroke-phantom")
    app = QApplication.instance()
    lesion, dwi = viewer.layers["lesion"], viewer.layers["DWI"]
    dwi.visible = True
    viewer.layers["CTP"].visible = False
    # show the lesion's largest slice, and correct the lesion there with the brush
    z = int(np.argmax(lesion.data.sum(axis=(1, 2))))
    viewer.dims.set_point(1, lesion.data_to_world((z, 0, 0))[0])
    y, x = np.argwhere(lesion.data[z]).mean(axis=0).round().astype(int)
    lesion.brush_size = 8
    lesion.paint((z, y - 14, x + 6), 1)
    lesion.contour = 1
    viewer.layers.selection.active = lesion
    lesion.mode = "paint"

    widget = PostTrainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Post-train (lesion-aware)")
    widget.model.value = None
    widget.checkpoint.value = base
    widget.output.value = tmp / "post-trained"
    widget.model_name.value = "phantom post-trained"
    widget.device.value = "cpu"
    widget.steps.value = 400
    widget.batch_size.value = 4
    wait(app, lambda: not widget.prefetching, 120)
    if widget.start() is None:
        raise SystemExit("the widget refused to start; see the notification above")
    wait(app, lambda: len(widget.loss_plot.steps) >= args.points or not widget.busy, 600, widget)
    if not widget.busy:
        raise SystemExit(f"the run ended before the shot: {widget.status.value}")
    widget.loss_plot.redraw()
    wait(app, widget.loss_plot.idle, 30, widget)
    save(viewer, app, args.png, settle_turns=20)
    print(f"wrote {args.png} at step {widget.last_step}")
    widget.cancel()
    wait(app, lambda: not widget.busy, 120)
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

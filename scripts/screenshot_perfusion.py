"""Screenshot of a perfusion analysis in napari, for the README.

    xvfb-run -a .venv/bin/python scripts/screenshot_perfusion.py [--seed 5]

Opens a stroke-phantom case (by default the sample, seed 5: a left-MCA stroke with a 68 ml
core), docks the perfusion widget and runs it with its defaults (automatic AIF); once the
layers are in, shows CBF, CBV, MTT and Tmax side by side on the slice with the most lesion,
each outlined with the perfusion core (magenta) and the hypoperfused tissue (white), with the
widget's volumes and AIF/VOF curves; saves ``viewer.screenshot(canvas_only=False)`` to
resources/screenshots/perfusion_widget.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _screenshot import save, show_largest_lesion_slice, wait

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PNG = ROOT / "resources" / "screenshots" / "perfusion_widget.png"
WINDOW = (1500, 900)
MAPS = ("CBF", "CBV", "MTT", "Tmax")  # grid cells, row by row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=None, help="phantom seed (default: the sample's)")
    parser.add_argument("--png", type=Path, default=DEFAULT_PNG, help=f"output (default {DEFAULT_PNG})")
    args = parser.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_ctp2mri._perfusion_widget import PerfusionWidget
    from napari_ctp2mri._sample_data import SAMPLE_SEED, stroke_phantom_case

    viewer = napari.Viewer(title="napari-ctp2mri")
    viewer.window._qt_window.resize(*WINDOW)
    for data, kwargs, kind in stroke_phantom_case(SAMPLE_SEED if args.seed is None else args.seed):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    app = QApplication.instance()
    widget = PerfusionWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Perfusion maps and core/penumbra")
    if widget.run() is None:
        raise SystemExit("the perfusion widget refused to run; see the notification above")
    wait(app, lambda: not widget.busy, 600, widget)
    if widget.result is None:
        raise SystemExit(f"the analysis failed: {widget.status.value}")

    # napari draws a layer in one grid cell only: each map gets its own outline layers,
    # sharing the masks' arrays (as the compare widget does)
    outlines = [widget.own_layer(key) for key in ("hypoperfusion", "core")]
    order = []
    for name in MAPS:
        order.append(viewer.layers[name])
        for mask in outlines:
            copy = viewer.add_labels(mask.data, name=f"{mask.name} ({name})", scale=mask.scale,
                                     translate=mask.translate, colormap=mask.colormap, units=mask.units)
            copy.contour = 2
            order.append(copy)
    for layer in viewer.layers:
        layer.visible = layer in order
    for position, layer in enumerate(order):
        viewer.layers.move(viewer.layers.index(layer), position)
    grid = viewer.canvas.grid if hasattr(getattr(viewer, "canvas", None), "grid") else viewer.grid
    grid.stride, grid.shape, grid.enabled = 3, (2, 2), True
    show_largest_lesion_slice(viewer)
    viewer.reset_view()
    save(viewer, app, args.png, settle_turns=30)
    print(f"wrote {args.png}: {widget.status.value}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Screenshot of a synthesis result in napari, for the README.

    xvfb-run -a .venv/bin/python scripts/screenshot_synthesis.py [--samples 2]

Opens the stroke-phantom sample, docks the synthesis widget with the bundled post-trained demo
model selected (its default), runs it, and once the synthetic layers are in shows
the synthetic ADC with the true lesion's contour (red) and the core estimated from it
(yellow); saves ``viewer.screenshot(canvas_only=False)`` to
resources/screenshots/synthesis_widget.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _screenshot import save, show_largest_lesion_slice, synthesised_sample

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PNG = ROOT / "resources" / "screenshots" / "synthesis_widget.png"
WINDOW = (1500, 900)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1, help="samples per slice (2+: uncertainty layers)")
    parser.add_argument("--png", type=Path, default=DEFAULT_PNG, help=f"output (default {DEFAULT_PNG})")
    args = parser.parse_args()

    from napari_ctp2mri._synthesis_widget import LAYER_NAMES

    viewer, app, _ = synthesised_sample(WINDOW, samples=args.samples)
    lesion = viewer.layers["lesion"]
    lesion.contour = 1
    core = viewer.layers[LAYER_NAMES["core"]]
    core.contour = 1
    for layer in viewer.layers:  # synthetic ADC with the true lesion (red) and its core (yellow)
        layer.visible = layer.name == LAYER_NAMES["adc"] or layer in (lesion, core)
    for layer in (lesion, core):  # contours on top of the image
        viewer.layers.move(viewer.layers.index(layer), len(viewer.layers))
    show_largest_lesion_slice(viewer)
    save(viewer, app, args.png, settle_turns=30)
    print(f"wrote {args.png}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

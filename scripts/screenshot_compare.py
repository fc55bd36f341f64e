"""Screenshot of the compare widget on a real synthesis, for the README.

    xvfb-run -a .venv/bin/python scripts/screenshot_compare.py

Opens the stroke-phantom sample, synthesises DWI/ADC with the bundled post-trained demo model
(the synthesis widget's default), docks the compare widget (it picks the sample's and the
synthetic layers by name), computes the metrics, shows the lesion contours side by side on the
slice with the most lesion and saves ``viewer.screenshot(canvas_only=False)`` to
resources/screenshots/compare_widget.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _screenshot import save, show_largest_lesion_slice, synthesised_sample, wait

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PNG = ROOT / "resources" / "screenshots" / "compare_widget.png"
WINDOW = (1500, 980)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--png", type=Path, default=DEFAULT_PNG, help=f"output (default {DEFAULT_PNG})")
    args = parser.parse_args()

    from napari_ctp2mri._compare_widget import CompareWidget

    from ctp2mri.evaluation.compare import table_rows

    viewer, app, synthesis = synthesised_sample(WINDOW, dock=False)
    synthesis.close()
    show_largest_lesion_slice(viewer)
    compare = CompareWidget(viewer)
    viewer.window.add_dock_widget(compare, name="Compare")
    # the perfusion core is optional: this shot compares the synthesis with the truth only
    missing = [key for key, picked in compare.selected().items() if picked is None and key != "perfusion_core"]
    if missing:
        raise SystemExit(f"the compare widget did not find the layers for {missing}")
    if compare.compute() is None:
        raise SystemExit("the compare widget refused to compute; see the notification above")
    wait(app, lambda: getattr(compare, "table", None) is not None
          and compare.table.get("slice_index") == compare.current_slice(), 300)
    compare.show_side_by_side(True)
    save(viewer, app, args.png, settle_turns=50)
    print(f"wrote {args.png}; whole volume (the figures the README quotes):")
    for row in table_rows(compare.table):
        print(f"  {row['label']}: {row['whole_volume']:.3f}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

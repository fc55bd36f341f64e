"""The synthesis widget over a folder of case folders (run under xvfb-run): a damaged case is
reported, the others are written with a summary, and a rerun skips them."""

from __future__ import annotations

import csv
import shutil

import pytest
from _helpers_napari import errors

from ctp2mri.casefolder import Case, write_case
from ctp2mri.io.volume import Volume
from napari_ctp2mri._synthesis_widget import SynthesisWidget

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("one_thread")]
WAIT_MS = 60_000


def _cases(case, root, n=3, damaged=1):
    """``n`` case folders of six slices of ``case`` (the session's ``held_out_case``), one damaged."""
    affine = case.ctp.affine.copy()
    affine[:3, 3] += affine[:3, 2] * 14

    def cut(volume):
        return Volume(volume.array[:, :, 14:20].copy(), affine, frame_times=volume.frame_times)

    first = write_case(Case(ctp=cut(case.ctp), mask=cut(case.mask)), root / "case_000")
    for i in range(1, n):
        shutil.copytree(first, root / f"case_{i:03d}")
    bad = root / f"case_{damaged:03d}" / "ctp.nii.gz"
    bad.write_bytes(bad.read_bytes()[:100])
    return root


def test_run_folder_writes_each_case_and_reports_the_bad_one(make_napari_viewer, qtbot, held_out_case, tiny_cldm,
                                                            tmp_path, notes):
    cases = _cases(held_out_case, tmp_path / "cases")
    viewer = make_napari_viewer()
    widget = SynthesisWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Synthesis")
    widget.model.value = None
    widget.checkpoint.value = tiny_cldm
    widget.device.value = "cpu"
    widget.steps.value = 2

    assert widget.run_folder() is None  # no folder chosen yet
    assert "Case folders" in errors(notes)[-1]
    widget.folder.value = tmp_path  # holds no case folders itself
    widget.folder_out.value = tmp_path / "out"
    assert widget.run_folder() is None and "holds no case folders" in errors(notes)[-1]

    widget.folder.value = cases
    for expected in ("2 ok, 0 skipped", "0 ok, 2 skipped"):  # the rerun skips the finished cases
        assert widget.run_folder() is not None
        assert not widget.run_button.enabled and not widget.run_folder_button.enabled
        qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
        assert widget.run_folder_button.enabled and expected in widget.status.value
        warnings = [m for s, m in notes if s == "warning"]
        assert warnings and warnings[-1].startswith("case_001 failed:")
    with open(tmp_path / "out" / "summary.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["skipped", "failed", "skipped"]
    assert len(viewer.layers) == 0  # a folder run writes files, it adds no layers

"""The plugin inside a real napari viewer (needs a display: run under xvfb-run)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctp2mri.casefolder import Case, write_case
from ctp2mri.io.volume import Volume

pytestmark = pytest.mark.gui

PLUGIN = "napari-ctp2mri"
SHAPE = (10, 12, 4)
N_FRAMES = 5
CASE_LAYERS_SHOWN = [
    ("CTP", "Image"), ("DWI", "Image"), ("ADC", "Image"),
    ("brain mask", "Labels"), ("lesion", "Labels"),
]
# Anisotropic, off-origin, LPS-stored: the geometry a DICOM conversion typically gives.
AFFINE = np.array(
    [[-0.8, 0.0, 0.0, 95.0], [0.0, -1.2, 0.0, -120.5], [0.0, 0.0, 5.0, -40.0], [0.0, 0.0, 0.0, 1.0]]
)


@pytest.fixture
def case_dir(tmp_path) -> Path:
    rng = np.random.default_rng(11)
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:8, 2:10, :] = 1
    lesion = np.zeros(SHAPE, np.uint8)
    lesion[4:6, 5:7, 1:3] = 1
    ctp = np.stack([np.full(SHAPE, 10.0 * t) for t in range(N_FRAMES)], axis=-1)  # HU = 10·frame
    case = Case(
        ctp=Volume(ctp, AFFINE, frame_times=np.arange(N_FRAMES) * 2.0),
        dwi=Volume(rng.gamma(3.0, 40.0, SHAPE).astype(np.float32), AFFINE),
        adc=Volume(rng.normal(780, 40, SHAPE).astype(np.float32), AFFINE),
        lesion=Volume(lesion, AFFINE),
        mask=Volume(mask, AFFINE),
    )
    return write_case(case, tmp_path / "case001")


def test_open_edit_save_reopen_case_then_sample(make_napari_viewer, case_dir, tmp_path):
    """One viewer for the whole story: creating a viewer is the slow part of these tests."""
    viewer = make_napari_viewer()
    viewer.open(str(case_dir), plugin=PLUGIN)
    assert [(layer.name, type(layer).__name__) for layer in viewer.layers] == CASE_LAYERS_SHOWN
    ctp = viewer.layers["CTP"]
    assert ctp.data.shape == (N_FRAMES, 4, 12, 10)
    np.testing.assert_allclose(ctp.scale, [1.0, 5.0, 1.2, 0.8], rtol=1e-6)
    for name in ("DWI", "ADC", "brain mask", "lesion"):
        np.testing.assert_allclose(viewer.layers[name].scale, ctp.scale[1:], rtol=1e-6)
    assert viewer.layers["lesion"].visible and viewer.layers["lesion"].contour == 0

    # a time slider over the frames, and moving it shows the next frame (HU = 10·frame)
    assert viewer.dims.ndim == 4
    assert viewer.dims.axis_labels == ("t", "z", "y", "x")
    assert viewer.dims.nsteps[0] == N_FRAMES
    viewer.dims.set_current_step(0, 3)
    ctp.refresh()
    assert np.all(np.asarray(ctp._slice.image.raw) == 30)

    # File > Save Selected Layer: an edited lesion goes back onto the file's own grid
    lesion = viewer.layers["lesion"]
    lesion.data[1, 3, 4] = 1  # an edit the user paints
    out = tmp_path / "lesion_edited.nii.gz"
    [written] = lesion.save(str(out), plugin=PLUGIN)
    saved = nib.load(written)
    assert np.array_equal(saved.affine, nib.load(case_dir / "lesion.nii.gz").affine)
    # display (k, j, i) = (1, 3, 4) of an LPS file is file index (i, j, k) = (4, 3, 1)
    assert np.asanyarray(saved.dataobj)[4, 3, 1] == 1

    [reopened] = viewer.open(written, plugin=PLUGIN)
    assert type(reopened).__name__ == "Labels"
    assert np.array_equal(reopened.data, lesion.data)
    np.testing.assert_allclose(reopened.translate, lesion.translate, atol=1e-6)

    # File > Open Sample > Stroke phantom case (demo): the same layers as a case folder
    viewer.layers.clear()
    viewer.open_sample(PLUGIN, "stroke-phantom")
    assert [layer.name for layer in viewer.layers] == [name for name, _ in CASE_LAYERS_SHOWN]
    assert viewer.dims.ndim == 4 and viewer.dims.nsteps[0] == 15

"""Arteries and sinuses of the phantom's CT perfusion: partial volume, timing, conservation,
the starved arteries of an occlusion, and the truth/ maps each case folder carries."""

from __future__ import annotations

import numpy as np
import pytest

from ctp2mri.casefolder import TRUTH_DIR, read_case, read_truth, write_case
from ctp2mri.phantom import generate_case, lesion_truth, simulate_case
from ctp2mri.phantom.generate import TRUTH_MAPS
from ctp2mri.phantom.perfusion import arterial_input, draw_perfusion_params
from ctp2mri.phantom.vessels import (
    ARTERY,
    VEIN,
    VESSEL_TREE,
    VesselParams,
    blood_curves,
    centre_lines,
    transit_density,
)


def _first_seed(territory: str) -> int:
    from ctp2mri.phantom.generate import _draw
    from ctp2mri.profiles import get_profile

    for seed in range(200):
        plan = _draw(seed, get_profile("demo")).plan
        if plan.territory == territory and lesion_truth(seed)["core"].array.sum() > 200:
            return seed
    raise AssertionError(f"no {territory} case with a sizeable core among 200 seeds")


@pytest.fixture(scope="module")
def mca():
    return simulate_case(_first_seed("MCA"))


def test_every_case_has_arteries_and_sinuses_with_partial_volume(mca):
    fraction = mca.maps["vessel_fraction"].array
    kind = mca.maps["vessels"].array
    assert fraction.min() >= 0 and fraction.max() <= 1
    np.testing.assert_array_equal(kind > 0, fraction > 0)
    for label in (ARTERY, VEIN):
        inside = fraction[kind == label]
        assert inside.size > 50
        assert inside.max() > 0.9  # the ICA and the sagittal sinus fill whole 2 mm voxels
        assert ((inside > 0.1) & (inside < 0.9)).sum() > 20  # and their edges are partial
    # The blood displaces tissue: the truth CBF of a voxel falls with its blood fraction.
    cbf = mca.maps["cbf"].array
    brain = mca.maps["ctp_brain"].array > 0
    full = brain & (fraction > 0.99)
    assert full.any() and np.all(cbf[full] < 1e-3)


def test_arteries_peak_early_and_high_sinuses_later(mca):
    case, maps = mca.case, mca.maps
    ctp, times = case.ctp.array, case.ctp.frame_times
    fraction, kind = maps["vessel_fraction"].array, maps["vessels"].array
    enhancement = ctp - ctp[..., :2].mean(axis=-1, keepdims=True)
    artery = enhancement[(kind == ARTERY) & (fraction > 0.8)].mean(axis=0)
    vein = enhancement[(kind == VEIN) & (fraction > 0.8)].mean(axis=0)
    brain = enhancement[(maps["ctp_brain"].array > 0) & (fraction == 0)].mean(axis=0)
    assert times[artery.argmax()] < times[vein.argmax()]
    assert artery.max() > 150 and vein.max() > 100  # HU: a dense bolus
    assert brain.max() < 40  # tissue enhances by tens of HU at most
    # sinus voxels read the VOF recorded in case.json times their blood fraction (noise averages out)
    share = fraction[(kind == VEIN) & (fraction > 0.8)].mean()
    np.testing.assert_allclose(vein, share * np.asarray(case.info["vof_hu"]) * case.info["gain"], atol=4.0)


def test_venous_output_conserves_the_indicator_and_arteries_follow_the_aif():
    params = draw_perfusion_params(np.random.default_rng(3))
    dt = 0.1
    t = np.arange(0.0, 120.0, dt)
    aif = arterial_input(t, params)
    vessels = VesselParams(venous_delay_s=6.0, venous_dispersion=6.0, collateral_gain=0.4,
                           collateral_delay_s=5.0, radius_scale=1.0)

    class _Map:  # the segment list is all blood_curves reads
        segments = centre_lines().segments

    curves = blood_curves(_Map(), aif, dt, t, vessels, "MCA", "right")
    names = [(seg.name, side) for seg, side in _Map.segments]
    vein = curves[names.index(("superior sagittal sinus", "midline"))]
    np.testing.assert_allclose(vein.sum() * dt, aif.sum() * dt, rtol=0.02)  # ∫VOF = ∫AIF
    assert t[vein.argmax()] - t[aif.argmax()] > 3.0
    ica = curves[names.index(("ICA", "left"))]
    np.testing.assert_allclose(ica, aif, atol=1e-9)  # delay 0 at the ICA
    # the occluded (right) MCA's branches fill late and weakly, the left ones normally
    right = curves[names.index(("M2 inferior", "right"))]
    left = curves[names.index(("M2 inferior", "left"))]
    assert right.max() < 0.7 * left.max()
    assert t[right.argmax()] - t[left.argmax()] > 3.0
    np.testing.assert_allclose(transit_density(t, 6.0, 6.0).sum() * dt, 1.0, rtol=1e-3)


def test_starved_arteries_of_an_mca_occlusion_in_the_case(mca):
    """The lateral arteries (distal M1 and the M2 trunks, |x| > 33 mm) enhance less on the
    lesion's side than on the other."""
    side = mca.case.info["hemisphere"]
    ctp = mca.case.ctp.array
    enhancement = ctp - ctp[..., :2].mean(axis=-1, keepdims=True)
    fraction, kind = mca.maps["vessel_fraction"].array, mca.maps["vessels"].array
    affine = mca.case.ctp.affine
    x = (affine[0, 0] * np.arange(ctp.shape[0]) + affine[0, 3])[:, None, None]
    lateral = (kind == ARTERY) & (fraction > 0.3) & (np.abs(x) > 33)
    peak = {name: enhancement[lateral & where].mean(axis=0).max()
            for name, where in (("right", x > 0), ("left", x < 0))}
    other = "left" if side == "right" else "right"
    assert peak[side] < 0.8 * peak[other]
    assert len(centre_lines().segments) == sum(2 if s.bilateral else 1 for s in VESSEL_TREE)


def test_case_folder_carries_truth_maps_that_are_not_inputs(tmp_path):
    case = generate_case(5)
    assert set(case.truth) == set(TRUTH_MAPS)
    folder = write_case(case, tmp_path / "c")
    truth = read_truth(folder)
    assert set(truth) == set(TRUTH_MAPS)
    np.testing.assert_allclose(truth["cbf"].array, case.truth["cbf"].array, rtol=1e-6)
    np.testing.assert_array_equal(truth["vessels"].array, case.truth["vessels"].array)
    assert truth["cbf"].same_grid(case.ctp)
    assert read_case(folder).truth == {}  # reading a case never loads them
    assert read_truth(folder, ["tmax"]).keys() == {"tmax"}
    (folder / TRUTH_DIR / "cbf.nii.gz").unlink()
    assert "cbf" not in read_truth(folder)
    bare = tmp_path / "bare"
    case.truth = {}
    write_case(case, bare)
    assert not (bare / TRUTH_DIR).exists() and read_truth(bare) == {}

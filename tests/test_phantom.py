"""The digital stroke phantom: geometry, indicator-dilution physics, diffusion contrast, lesions.

Every check is a physical or geometric fact from docs/phantom.md, measured on real
generated cases (demo profile) with the noise averaged out over many voxels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctp2mri.errors import InputError
from ctp2mri.phantom import case_seed, frame_times, generate_case, lesion_truth, simulate_case
from ctp2mri.phantom.anatomy import model_grid
from ctp2mri.phantom.lesions import draw_lesion_plan
from ctp2mri.phantom.perfusion import (
    MTT_TABLE,
    PerfusionParams,
    ResidueTable,
    arterial_input,
    draw_perfusion_params,
    gamma_variate,
    ischaemic_parameters,
)

DEMO_VOXEL_ML = 2 * 2 * 5 / 1000


def _seed_with_stroke(min_core_ml: float, min_penumbra_ml: float) -> int:
    """First seed whose case has at least this much core and penumbra (cheap: masks only)."""
    for seed in range(100):
        truth = lesion_truth(seed)
        core = truth["core"].array.sum() * DEMO_VOXEL_ML
        penumbra = truth["penumbra"].array.sum() * DEMO_VOXEL_ML
        if core >= min_core_ml and penumbra >= min_penumbra_ml:
            return seed
    raise AssertionError("no phantom case with a stroke among the first 100 seeds")


@pytest.fixture(scope="module")
def stroke():
    """A case with a sizeable core inside a larger penumbra, and its ground-truth maps."""
    return simulate_case(_seed_with_stroke(5.0, 15.0))


def _mean_curve(ctp: np.ndarray, select: np.ndarray, times: np.ndarray, bolus_arrival: float):
    """Mean enhancement curve (HU above the pre-bolus baseline) of the selected voxels."""
    curve = ctp[select].mean(axis=0)
    return curve - curve[times < bolus_arrival].mean()


# geometry and contract -------------------------------------------------------------------------
def test_case_shapes_frames_and_grid(stroke):
    case = stroke.case.validate()
    assert case.ctp.array.shape == (96, 112, 37, 15)
    np.testing.assert_array_equal(case.ctp.frame_times, np.arange(15) * 3.0)
    for name in ("dwi", "adc", "lesion", "mask"):
        vol = getattr(case, name)
        assert vol.array.shape == (96, 112, 37), name
        assert vol.same_grid(case.ctp), name
    assert case.lesion.array.dtype == np.uint8 and case.mask.array.dtype == np.uint8
    assert case.adc.array.dtype == np.float32 and case.dwi.array.dtype == np.float32
    assert case.ctp.orientation == "RAS"
    assert case.ctp.spacing == pytest.approx((2.0, 2.0, 5.0))
    # The brain sits inside the field of view: no brain voxel on the in-plane border.
    brain = case.mask.array.astype(bool)
    assert not brain[[0, -1]].any() and not brain[:, [0, -1]].any()
    assert 900 < brain.sum() * DEMO_VOXEL_ML < 2600  # ml, an adult brain (MNI152 is a large one)
    # Skull-stripped like the paper's registered data: nothing outside the brain.
    outside = ~brain
    assert not case.dwi.array[outside].any() and not case.adc.array[outside].any()
    assert not case.lesion.array[outside].any()


def test_paper_grid_geometry():
    shape, affine = model_grid("paper")
    assert shape == (192, 224, 37)
    np.testing.assert_allclose(np.diag(affine)[:3], (1.0, 1.0, 5.0))
    # Same field of view as the demo grid, so one seed is the same patient on both.
    demo_shape, demo_affine = model_grid("demo")
    centre = lambda s, a: a[:3, :3] @ ((np.array(s) - 1) / 2) + a[:3, 3]  # noqa: E731
    np.testing.assert_allclose(centre(shape, affine), centre(demo_shape, demo_affine))


def test_info_is_json_ground_truth(stroke):
    info = stroke.case.info
    json.dumps(info)  # plain JSON, no custom encoder needed
    for key in ("seed", "profile", "phantom_version", "lesion_ml", "penumbra_ml", "territory",
                "bolus_arrival_s", "noise_sigma_hu", "gain", "offset_hu", "frame_times",
                "misalignment"):
        assert key in info, key
    core = stroke.case.lesion.array.sum() * DEMO_VOXEL_ML
    penumbra = stroke.maps["penumbra"].array.sum() * DEMO_VOXEL_ML
    assert info["lesion_ml"] == info["core_ml"] == pytest.approx(core, abs=1e-3)
    assert info["penumbra_ml"] == pytest.approx(penumbra, abs=1e-3)
    # The lesion comes out at the volume drawn for it, to within a voxel.
    assert abs(info["lesion_ml"] - info["planned_core_ml"]) <= DEMO_VOXEL_ML
    assert 5.0 <= info["noise_sigma_hu"] <= 15.0
    assert 5.0 <= info["bolus_arrival_s"] <= 10.0


def test_misalignment_under_a_voxel(stroke):
    info, maps, case = stroke.case.info, stroke.maps, stroke.case
    shift = np.abs(info["misalignment"]["shift_mm"])
    assert np.all(shift <= np.array([1.0, 1.0, 1.0]) + 1e-9)
    mri = case.mask.array.astype(bool)
    ctp = maps["ctp_brain"].array.astype(bool)
    assert 2 * (mri & ctp).sum() / (mri.sum() + ctp.sum()) > 0.9
    centroid = lambda m: np.argwhere(m).mean(axis=0) * np.array([2.0, 2.0, 5.0])  # noqa: E731
    assert np.linalg.norm(centroid(mri) - centroid(ctp)) < 2.0  # mm: under one 2 mm voxel
    # The CT has data in its brain and in the vessels (some sinus lies outside the brain):
    # 0 HU (stripped) elsewhere.
    assert not case.ctp.array[~(ctp | (maps["vessel_fraction"].array > 0))].any()


# CT perfusion ----------------------------------------------------------------------------------
def test_indicator_dilution_curves(stroke):
    case, maps = stroke.case, stroke.maps
    ctp, times = case.ctp.array, case.ctp.frame_times
    normal = (maps["tmax"].array < 3) & maps["ctp_brain"].array.astype(bool)
    gm = normal & (maps["gm"].array > 0.9)
    wm = normal & (maps["wm"].array > 0.9)
    assert gm.sum() > 200 and wm.sum() > 200
    t0 = case.info["bolus_arrival_s"]
    for select, low, high in ((gm, 15.0, 30.0), (wm, 5.0, 10.0)):
        curve = _mean_curve(ctp, select, times, t0)
        peak = int(np.argmax(curve))
        assert low <= curve[peak] <= high, (low, curve)
        assert 0 < peak < len(times) - 1  # rises, then falls
        assert np.all(np.diff(curve[: peak + 1])[times[1 : peak + 1] > t0 + 3] > 0)
        assert curve[-1] < 0.5 * curve[peak]  # washed out by the end of the window
        assert abs(curve[times < t0]).max() < 1.0  # flat before the bolus
    # Unenhanced grey matter is denser than white matter (≈ 38 vs 29 HU).
    base = lambda s: ctp[s][:, times < t0].mean()  # noqa: E731
    assert 33 < base(gm) < 44 and 24 < base(wm) < 35 and base(gm) - base(wm) > 5


def test_noise_level_matches_info(stroke):
    case = stroke.case
    gm = (stroke.maps["gm"].array > 0.9) & (stroke.maps["tmax"].array < 3)
    pre = case.ctp.frame_times < case.info["bolus_arrival_s"]
    # Frame-to-frame differences before the bolus are pure noise (σ√2).
    diffs = np.diff(case.ctp.array[gm][:, pre], axis=1)
    assert np.std(diffs) / np.sqrt(2) == pytest.approx(case.info["noise_sigma_hu"], rel=0.08)


def test_penumbra_peaks_later_than_contralateral_grey_matter(stroke):
    case, maps = stroke.case, stroke.maps
    ctp, times = case.ctp.array, case.ctp.frame_times
    x_world = case.ctp.affine[0, 0] * np.arange(ctp.shape[0]) + case.ctp.affine[0, 3]
    lesion_side = 1.0 if case.info["hemisphere"] == "right" else -1.0
    contralateral = (lesion_side * x_world < -10)[:, None, None]
    normal_gm = contralateral & (maps["gm"].array > 0.9) & (maps["tmax"].array < 3)
    penumbra = maps["penumbra_ctp"].array.astype(bool)
    t0 = case.info["bolus_arrival_s"]
    ttp = lambda s: times[np.argmax(_mean_curve(ctp, s, times, t0))]  # noqa: E731
    assert ttp(penumbra) >= ttp(normal_gm) + 4.0
    # Ground-truth perfusion maps: the penumbra is delayed 6–10 s, the core ≥ 10 s.
    tmax = maps["tmax"].array
    assert np.all((tmax[penumbra] >= 6.0 - 1e-4) & (tmax[penumbra] < 10.0 + 1e-4))
    assert np.median(tmax[normal_gm]) <= 2.0
    # Hypoperfused: penumbra CBF well below contralateral tissue of the same kind.
    cbf = maps["cbf"].array
    assert cbf[penumbra & (maps["gm"].array > 0.9)].mean() < 0.75 * cbf[normal_gm].mean()


def test_ischaemia_levels_follow_the_clinical_definitions():
    plan = draw_lesion_plan(np.random.default_rng(3))
    level = np.linspace(0.0, 3.0, 301)
    rel_cbf, rel_cbv, tmax = ischaemic_parameters(level, plan, normal_tmax=1.0)
    penumbra, core = (level >= 1) & (level < 2), level >= 2
    assert np.all((rel_cbf[penumbra] > 0.3) & (rel_cbf[penumbra] <= 0.7))
    assert np.all((tmax[penumbra] >= 6) & (tmax[penumbra] < 10))
    assert np.all(rel_cbv[penumbra] >= 1.0)  # normal or raised
    assert np.all(rel_cbf[core] <= 0.3) and np.all(tmax[core] >= 10) and np.all(rel_cbv[core] < 1.0)
    assert rel_cbf[0] == 1.0 and tmax[0] == 1.0


def test_gamma_variate_and_residue_convolution_conserve_the_bolus():
    t = np.arange(0.0, 120.0, 0.01)
    g = gamma_variate(t, t0=7.0, alpha=3.0, beta=1.5, peak=300.0)
    assert g.max() == pytest.approx(300.0, rel=1e-4)
    assert t[np.argmax(g)] == pytest.approx(7.0 + 3.0 * 1.5, abs=0.01)
    assert not g[t <= 7.0].any()
    params = draw_perfusion_params(np.random.default_rng(0))
    table = ResidueTable.build(params, t_end=300.0)
    # ∫ (AIF ⊛ e^(−τ/MTT)) dt = MTT · ∫ AIF dt: the central volume principle, CBV = CBF · MTT.
    fine = np.arange(table.values.shape[1]) * table.dt
    aif_area = np.sum(arterial_input(fine, params)) * table.dt
    for mtt in (2.0, 4.4, 12.0):
        row = np.argmin(abs(MTT_TABLE - mtt))
        area = table.values[row].sum() * table.dt
        assert area == pytest.approx(MTT_TABLE[row] * aif_area, rel=0.02)
    assert isinstance(params, PerfusionParams)


# frames ----------------------------------------------------------------------------------------
def test_frame_times_defaults_and_other_counts():
    np.testing.assert_allclose(frame_times(), np.arange(15) * 3.0)
    np.testing.assert_allclose(frame_times(8), np.linspace(0.0, 42.0, 8))
    np.testing.assert_allclose(frame_times(20, 2.0), np.arange(20) * 2.0)
    bad_calls = ((1, None), (0, None), (15, 0.0), (15, -3.0), (15, float("nan")), (100, 5.0),
                 (500, None))
    for bad in bad_calls:
        with pytest.raises(InputError):
            frame_times(*bad)


def test_other_frame_counts_sample_the_same_physics(stroke):
    """Denser sampling of the same case agrees with the 15 frames at their common times."""
    seed = stroke.case.info["seed"]
    dense = simulate_case(seed, n_frames=29)  # every 1.5 s over the same 42 s
    assert dense.case.ctp.array.shape == (96, 112, 37, 29)
    np.testing.assert_allclose(dense.case.ctp.frame_times, np.arange(29) * 1.5)
    gm = (stroke.maps["gm"].array > 0.9) & stroke.maps["ctp_brain"].array.astype(bool)
    coarse_curve = stroke.case.ctp.array[gm].mean(axis=0)
    dense_curve = dense.case.ctp.array[gm].mean(axis=0)
    np.testing.assert_allclose(dense_curve[::2], coarse_curve, atol=0.6)  # HU, noise averaged
    np.testing.assert_array_equal(dense.case.lesion.array, stroke.case.lesion.array)


# diffusion -------------------------------------------------------------------------------------
def test_core_dark_on_adc_penumbra_normal(stroke):
    adc = stroke.case.adc.array
    core = stroke.case.lesion.array.astype(bool)
    penumbra = stroke.maps["penumbra"].array.astype(bool)
    assert core.any() and penumbra.any() and not (core & penumbra).any()
    assert adc[core].mean() < 620
    assert adc[penumbra].mean() > 650
    assert 400 <= np.median(stroke.maps["adc_true"].array[core]) <= 620


def test_normal_adc_values(stroke):
    adc, maps = stroke.case.adc.array, stroke.maps
    normal = maps["ischaemia_level"].array == 0
    brain = stroke.case.mask.array.astype(bool)
    assert 690 < adc[normal & brain & (maps["wm"].array > 0.95)].mean() < 760  # WM ≈ 720
    # GM ≈ 800, a little more from CSF partial volume in 2 × 2 × 5 mm voxels
    assert 760 < adc[normal & brain & (maps["gm"].array > 0.95)].mean() < 900
    assert adc[brain & (maps["csf"].array > 0.95)].mean() > 2500  # free water ≈ 3000
    assert adc.min() >= 0 and adc.max() <= 4000


def test_core_bright_on_dwi(stroke):
    """DWI in the core exceeds what normal tissue of the same composition shows."""
    case, maps = stroke.case, stroke.maps
    dwi = case.dwi.array
    fractions = np.stack([maps[k].array for k in ("gm", "wm", "csf")], axis=-1)
    normal = case.mask.array.astype(bool) & (maps["ischaemia_level"].array == 0)
    coef, *_ = np.linalg.lstsq(fractions[normal], dwi[normal], rcond=None)
    core = case.lesion.array.astype(bool)
    expected = fractions[core] @ coef
    assert dwi[core].mean() > 1.25 * expected.mean()
    penumbra = maps["penumbra"].array.astype(bool)
    assert dwi[penumbra].mean() == pytest.approx((fractions[penumbra] @ coef).mean(), rel=0.1)
    # Rician noise: b0 around its noise-free value with the SNR from the info.
    sigma = case.info["dwi_noise_sigma"]
    gm_signal = dwi[normal & (maps["gm"].array > 0.95)].mean()
    assert 15 < gm_signal / sigma < 40


# determinism, lesions --------------------------------------------------------------------------
def test_same_seed_same_arrays_other_seed_differs():
    first, again, other = generate_case(11), generate_case(11), generate_case(12)
    for name in ("ctp", "dwi", "adc", "lesion", "mask"):
        np.testing.assert_array_equal(getattr(first, name).array, getattr(again, name).array)
    assert first.info == again.info
    assert not np.array_equal(first.ctp.array, other.ctp.array)
    assert not np.array_equal(first.mask.array, other.mask.array)  # a different head


def test_lesion_statistics_over_a_dataset():
    """Like the paper's data: about a tenth of slices hold core, some cases none, long tail."""
    cores, slice_hits, n_slices, larger_penumbra = [], 0, 0, 0
    for i in range(20):
        truth = lesion_truth(case_seed(0, i))
        core = truth["core"].array.astype(bool)
        cores.append(core.sum() * DEMO_VOXEL_ML)
        slice_hits += int(core.any(axis=(0, 1)).sum())
        n_slices += core.shape[2]
        larger_penumbra += truth["penumbra"].array.sum() > core.sum() > 0
        assert not (core & ~truth["mask"].array.astype(bool)).any()
    cores = np.array(cores)
    assert 0.05 <= slice_hits / n_slices <= 0.20
    assert (cores == 0).any() and (cores > 0).sum() >= 10
    assert larger_penumbra == (cores > 0).sum()
    assert cores.max() > 4 * np.median(cores[cores > 0])  # heavy-tailed sizes


def test_lesion_in_one_hemisphere(stroke):
    core = stroke.case.lesion.array.astype(bool)
    x = np.argwhere(core)[:, 0] * 2.0 + stroke.case.lesion.affine[0, 3]
    side = 1.0 if stroke.case.info["hemisphere"] == "right" else -1.0
    assert np.mean(side * x > 0) > 0.95  # the head may be rotated a few degrees


def test_same_patient_on_the_paper_grid(stroke):
    seed = stroke.case.info["seed"]
    paper = lesion_truth(seed, "paper")["core"]
    demo = stroke.case.lesion
    assert paper.array.shape == (192, 224, 37)
    paper_ml = paper.array.sum() * 0.005
    assert paper_ml == pytest.approx(demo.array.sum() * DEMO_VOXEL_ML, rel=0.1)
    def centroid(v):
        return v.affine[:3, :3] @ np.argwhere(v.array).mean(axis=0) + v.affine[:3, 3]

    assert np.linalg.norm(centroid(paper) - centroid(demo)) < 3.0  # mm


# bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [dict(seed=-1), dict(seed=1.5), dict(seed=True), dict(seed=0, profile="huge"),
     dict(seed=0, n_frames=1), dict(seed=0, frame_interval=0.0)],
)
def test_bad_arguments_raise_input_error(kwargs):
    with pytest.raises(InputError):
        generate_case(**kwargs)


@pytest.mark.slow
def test_templates_match_nilearn_loaders():
    """The fast path reads the very maps nilearn's load_mni152_* functions return."""
    from nilearn import datasets

    from ctp2mri.phantom.anatomy import _load_mni152

    maps, affine = _load_mni152()
    expected = {
        "t1": datasets.load_mni152_template(resolution=1),
        "gm": datasets.load_mni152_gm_template(resolution=1),
        "wm": datasets.load_mni152_wm_template(resolution=1),
        "mask": datasets.load_mni152_brain_mask(resolution=1),
    }
    for name, img in expected.items():
        np.testing.assert_allclose(maps[name], img.get_fdata(), atol=1e-6, err_msg=name)
        np.testing.assert_allclose(affine, img.affine)

"""Perfusion analysis: the pieces on curves with known answers, the whole analysis on phantom
cases against their truth and against the plain reference, bad input, and the CLI's files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ctp2mri.casefolder import read_case, write_case
from ctp2mri.cli import main
from ctp2mri.errors import InputError
from ctp2mri.io.nifti import load_nifti, save_nifti
from ctp2mri.io.volume import Volume
from ctp2mri.perfusion import (
    Deconvolver,
    PerfusionSettings,
    RegionSettings,
    analyse_perfusion,
    gamma_variate,
    hemispheres,
    ischaemic_regions,
    oscillation_index,
    remove_islands,
)
from ctp2mri.perfusion.aif import fit_first_pass, gamma_area, partial_volume_scale
from ctp2mri.perfusion.analysis import K_H, RHO
from ctp2mri.perfusion.curves import bolus_arrival
from ctp2mri.perfusion.deconvolution import residue_peak
from ctp2mri.perfusion.validation import score_reference, score_result
from ctp2mri.phantom import case_seed, generate_case

TIMES = np.arange(15) * 3.0


# curves and input functions --------------------------------------------------------------------
def test_gamma_variate_fit_recovers_the_bolus_and_its_area():
    truth = (8.0, 400.0, 3.0, 2.5)
    t = np.arange(0.0, 60.0, 0.01)
    assert gamma_area(*truth) == pytest.approx(np.trapezoid(gamma_variate(t, *truth), t), rel=1e-3)
    fit = fit_first_pass(gamma_variate(TIMES, *truth), TIMES)
    assert fit is not None
    np.testing.assert_allclose(fit, truth, rtol=0.02, atol=0.05)
    assert fit_first_pass(np.zeros(15), TIMES) is None


def test_bolus_arrival_finds_the_first_enhancing_frame_and_refuses_flat_series():
    rng = np.random.default_rng(0)
    hu = 35.0 + rng.normal(0.0, 10.0, (40, 40, 4, 15))
    region = np.ones(hu.shape[:3], dtype=bool)
    hu[:3, :3, :, :] += gamma_variate(TIMES, 10.0, 300.0, 3.0, 2.5)  # an artery from 10 s
    index, time = bolus_arrival(hu, region, TIMES)
    assert (index, time) == (4, 12.0)  # first frame after 10 s
    with pytest.raises(InputError, match="no contrast bolus"):
        bolus_arrival(35.0 + rng.normal(0.0, 10.0, (40, 40, 4, 15)), region, TIMES)


def test_partial_volume_scale_is_the_area_ratio_clipped_to_one_and_above():
    from ctp2mri.perfusion.aif import InputFunction

    aif = InputFunction(gamma_variate(TIMES, 8.0, 200.0, 3.0, 2.5), np.zeros((1, 3), int), TIMES,
                        (8.0, 200.0, 3.0, 2.5))
    vof = InputFunction(gamma_variate(TIMES, 12.0, 260.0, 3.0, 2.5), np.zeros((1, 3), int), TIMES,
                        (12.0, 260.0, 3.0, 2.5))
    assert partial_volume_scale(aif, vof) == pytest.approx(1.3)
    assert partial_volume_scale(vof, aif) == 1.0  # never scaled down
    assert partial_volume_scale(aif, None) == 1.0


# deconvolution ---------------------------------------------------------------------------------
def _tissue(aif_fine, t_fine, cbf, mtt, delay):
    """Noise-free tissue curve of an exponential residue on the frames (phantom convention)."""
    dt = t_fine[1] - t_fine[0]
    residue = np.exp(-np.clip(t_fine - delay, 0, None) / mtt) * (t_fine >= delay)
    curve = RHO / K_H / 6000.0 * cbf * np.convolve(aif_fine, residue)[: t_fine.size] * dt
    return np.interp(TIMES, t_fine, curve)


@pytest.mark.parametrize("method", ["osvd", "tikhonov"])
def test_block_circulant_deconvolution_is_delay_insensitive(method):
    t_fine = np.arange(0.0, 42.0 + 1e-9, 1.0)
    fine = np.arange(0.0, 42.0 + 1e-9, 0.05)
    aif = gamma_variate(t_fine, 9.0, 420.0, 3.0, 2.5)
    decon = Deconvolver.build(aif, t_fine, TIMES, method=method, oi_target=0.05, tikhonov=0.1)
    aif_fine = gamma_variate(fine, 9.0, 420.0, 3.0, 2.5)
    curves = np.stack([_tissue(aif_fine, fine, 50.0, 4.0, d) for d in (0.0, 3.0, 6.0)])
    height, delay = residue_peak(decon.residues(curves), decon.dt)
    cbf = 6000.0 * K_H / RHO * height
    # a delayed bolus keeps its CBF (a truncated, non-circulant inverse loses it)
    assert np.ptp(cbf) < 0.15 * cbf.mean()
    assert np.all(np.diff(delay) > 2.0)  # the residue's peak moves with the delay
    np.testing.assert_allclose(delay - delay[0], [0.0, 3.0, 6.0], atol=1.0)


def test_oscillation_index_of_a_smooth_and_a_zigzag_residue():
    smooth = np.exp(-np.arange(30) / 5.0)[None]
    zigzag = (smooth * (1 + 0.5 * (-1) ** np.arange(30)))
    assert oscillation_index(smooth)[0] < 0.01
    assert oscillation_index(zigzag)[0] > 10 * oscillation_index(smooth)[0]


# regions ---------------------------------------------------------------------------------------
def test_core_hypoperfusion_mismatch_islands_and_the_healthy_side():
    shape = (40, 40, 6)
    affine = np.diag([2.0, 2.0, 5.0, 1.0])
    brain = np.zeros(shape, bool)
    brain[4:36, 4:36, :] = True
    cbf = np.where(brain, 40.0, 0.0).astype(np.float32)
    tmax = np.where(brain, 1.0, 0.0).astype(np.float32)
    lesion = np.zeros(shape, bool)
    lesion[25:33, 10:20, 1:4] = True  # right side (+x in RAS), 8·10·3 voxels
    cbf[lesion] = 8.0  # 20 % of 40
    tmax[lesion] = 12.0
    penumbra = np.zeros(shape, bool)
    penumbra[22:35, 8:25, 1:5] = True
    tmax[penumbra & ~lesion] = 8.0
    speck = (6, 30, 2)  # a one-voxel island on the left
    cbf[speck], tmax[speck] = 5.0, 9.0
    regions = ischaemic_regions(cbf, tmax, brain, brain, affine, RegionSettings(min_island_ml=0.1))
    voxel_ml = 2 * 2 * 5 / 1000
    assert regions.healthy_side == "left"
    assert regions.reference_cbf == pytest.approx(40.0)
    np.testing.assert_array_equal(regions.core, lesion)  # the speck is an island: removed
    assert regions.core_ml == pytest.approx(lesion.sum() * voxel_ml)
    assert regions.hypoperfusion_ml == pytest.approx(penumbra.sum() * voxel_ml)
    assert regions.mismatch_ml == pytest.approx((penumbra & ~lesion).sum() * voxel_ml)
    assert regions.mismatch_ratio == pytest.approx(penumbra.sum() / lesion.sum())
    assert remove_islands(lesion, 0.0, voxel_ml) is lesion
    # the same head stored left-right flipped (LPS-like x axis) still finds the right side
    flipped = np.diag([-2.0, 2.0, 5.0, 1.0])
    right = hemispheres(brain, flipped)
    assert right[5, 20, 2] and not right[34, 20, 2]
    with pytest.raises(InputError):
        RegionSettings(core_rcbf=float("nan"))
    with pytest.raises(InputError):
        RegionSettings(min_island_ml=-1.0)


# the whole analysis on phantom cases -----------------------------------------------------------
HELD_OUT_CASES = (0, 1, 9)  # of `ctp2mri phantom --seed 7`: the 92.8, 36.2 and 23.8 ml lesions


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Three cases of the held-out phantom set, written as case folders, with their analyses."""
    root = tmp_path_factory.mktemp("heldout")
    out = []
    for i in HELD_OUT_CASES:
        folder = write_case(generate_case(case_seed(7, i)), root / f"case_{i:03d}")
        case = read_case(folder, require=("ctp", "mask"))
        out.append((folder, analyse_perfusion(case.ctp, case.mask)))
    return out


def test_automatic_aif_lies_in_an_artery(held_out):
    for folder, result in held_out:
        assert score_result(result, folder)["aif_in_artery"] == 1.0, folder.name
        assert result.aif.scale >= 1.0 and result.vof is not None
        assert result.vof.time_to_peak_s > result.aif.time_to_peak_s


def test_maps_beat_the_plain_reference_with_the_true_aif(held_out):
    """On every figure, averaged over the cases: the automatic pipeline against truncated SVD
    with the case's true arterial input (the perfusion module's docs give the per-case table)."""
    ours = [score_result(result, folder) for folder, result in held_out]
    reference = [score_reference(folder) for folder, _ in held_out]

    def mean(rows, key):
        return float(np.nanmean([r[key] for r in rows]))

    assert mean(ours, "cbf_r") > mean(reference, "cbf_r")
    assert mean(ours, "cbv_r") > mean(reference, "cbv_r")
    assert mean(ours, "tmax_mae_s") < mean(reference, "tmax_mae_s")
    assert mean(ours, "core_dice") > mean(reference, "core_dice")


def test_user_placed_aif_region(held_out):
    folder, result = held_out[0]
    case = read_case(folder, require=("ctp", "mask"))
    artery = tuple(result.aif.voxels[0])
    region = np.zeros(case.ctp.spatial_shape, np.uint8)
    region[artery[0] - 2:artery[0] + 3, artery[1] - 2:artery[1] + 3, artery[2]] = 1
    placed = analyse_perfusion(case.ctp, case.mask, Volume(region, case.ctp.affine))
    assert all(region[tuple(v)] for v in placed.aif.voxels)
    tissue_only = np.zeros_like(region)
    z = int(np.argmax(result.tissue.sum(axis=(0, 1))))
    inside = np.argwhere(result.tissue[:, :, z])[0]
    tissue_only[inside[0], inside[1], z] = 1
    with pytest.raises(InputError, match="no artery"):
        analyse_perfusion(case.ctp, case.mask, Volume(tissue_only, case.ctp.affine))
    outside = np.zeros_like(region)
    outside[0, 0, 0] = 1
    with pytest.raises(InputError, match="outside the brain"):
        analyse_perfusion(case.ctp, case.mask, Volume(outside, case.ctp.affine))


# bad input and the command line ----------------------------------------------------------------
def _small_ctp(case, tmp_path, frames=15, flat=False, nan=False):
    """Six slices of ``case`` (the session's ``held_out_case``) as a CTP file."""
    ctp = case.ctp.array[:, :, 14:20, :frames].copy()
    if flat:
        ctp[:] = ctp[..., :1]
    if nan:
        ctp[10, 10, 2, 3] = np.nan
    affine = case.ctp.affine.copy()
    path = tmp_path / "ctp.nii.gz"
    save_nifti(Volume(ctp, affine, frame_times=case.ctp.frame_times[:frames]), path)
    return path


@pytest.mark.parametrize("kind, message", [
    ("3d", "needs 4"), ("frames", "time points"), ("flat", "no contrast bolus"), ("nan", "NaN"),
])
def test_bad_input_gets_one_line_and_no_output(held_out_case, tmp_path, capsys, kind, message):
    if kind == "3d":
        path = tmp_path / "ctp.nii.gz"
        save_nifti(Volume(np.full((20, 20, 5), 30.0, np.float32), np.eye(4)), path)
    else:
        path = _small_ctp(held_out_case, tmp_path, frames=5 if kind == "frames" else 15, flat=kind == "flat",
                          nan=kind == "nan")
    out = tmp_path / "out"
    assert main(["perfusion", str(path), "--out", str(out), "--no-figure"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]  # the rest is the progress bar
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert not out.exists()


def test_cli_writes_maps_on_the_ctp_grid_and_a_strict_report(held_out_case, tmp_path, capsys):
    path = _small_ctp(held_out_case, tmp_path)
    ctp = load_nifti(path)
    out = tmp_path / "perf"
    assert main(["perfusion", str(path), "--out", str(out), "--min-island-ml", "0.2"]) == 0
    printed = capsys.readouterr().out
    assert "core (rCBF < 0.3)" in printed and "wrote" in printed
    report = json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    for name in ("cbf", "cbv", "mtt", "tmax", "ttp", "core", "hypoperfusion", "aif", "vof"):
        vol = load_nifti(out / f"{name}.nii.gz")
        assert vol.spatial_shape == ctp.spatial_shape and np.allclose(vol.affine, ctp.affine, atol=1e-4)
    core = load_nifti(out / "core.nii.gz").array
    voxel_ml = float(np.prod(ctp.spacing)) / 1000
    assert report["core_ml"] == pytest.approx(core.sum() * voxel_ml, abs=1e-3)
    assert report["settings"]["regions"]["min_island_ml"] == 0.2
    assert len(report["aif"]["curve_hu"]) == 15 and report["aif"]["peak_hu"] > 100
    assert (out / "perfusion.png").stat().st_size > 10_000
    assert math.isfinite(report["reference_cbf"])
    # a second run into the same folder is refused, the first run's files stay
    assert main(["perfusion", str(path), "--out", str(out)]) == 2
    assert (out / "report.json").is_file()


def test_a_finer_ct_grid_is_analysed_on_blocks_and_written_back_on_its_own_grid(held_out_case):
    """A clinical CT is finer than the working grid: the maps come back on the CT's voxels."""
    case = held_out_case
    coarse = case.ctp.array[:, :, 14:20]
    fine = np.repeat(np.repeat(coarse, 2, axis=0), 2, axis=1)  # 1 × 1 mm in-plane
    affine = case.ctp.affine.copy()
    affine[:3, :2] /= 2
    affine[:3, 3] -= affine[:3, :2].sum(axis=1) / 2  # keep the field of view where it was
    ctp = Volume(fine, affine, frame_times=case.ctp.frame_times)
    mask = np.repeat(np.repeat(case.mask.array[:, :, 14:20], 2, axis=0), 2, axis=1)
    result = analyse_perfusion(ctp, Volume(mask, affine))
    assert result.factors == (2, 2, 1)
    cbf, core = result.on_ctp_grid("cbf"), result.on_ctp_grid("core")
    assert cbf.spatial_shape == fine.shape[:3] and np.allclose(cbf.affine, affine)
    assert set(np.unique(core.array)) <= {0, 1}
    working = result.volume("cbf").array
    # block means of the written map give back the working map inside the brain
    blocks = cbf.array.reshape(working.shape[0], 2, working.shape[1], 2, -1).mean(axis=(1, 3))
    inside = working > 0
    assert np.corrcoef(blocks[inside], working[inside])[0, 1] > 0.95


def test_settings_are_validated():
    for bad in ({"smoothing_mm": -1.0}, {"smoothing_mm": float("nan")}, {"method": "fft"}, {"tissue_hu": (50, 10)}):
        with pytest.raises(InputError):
            PerfusionSettings(**bad)


def test_new_thresholds_reread_the_same_maps(held_out):
    _, result = held_out[0]
    stricter = result.with_regions(RegionSettings(core_rcbf=0.2, hypoperfusion_tmax_s=8.0))
    assert stricter.maps is result.maps
    assert stricter.regions.core_ml <= result.regions.core_ml
    assert stricter.regions.hypoperfusion_ml < result.regions.hypoperfusion_ml
    assert stricter.report()["settings"]["regions"]["core_rcbf"] == 0.2
    assert result.settings.regions.core_rcbf == 0.3  # the original is unchanged

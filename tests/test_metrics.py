"""Metrics against direct numpy computations, known answers and MONAI's own MS-SSIM."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import MultiScaleSSIMMetric
from monai.metrics.regression import compute_ssim_and_cs
from scipy import ndimage

from ctp2mri.evaluation import lesion_metrics as L
from ctp2mri.evaluation import metrics as M
from ctp2mri.evaluation import tables as T
from ctp2mri.errors import InputError


def brain_slices(n: int, h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth textured "brains" (ellipses) in [−1, 1] with a 0 background, and their masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    brain = ((yy - h / 2) / (0.42 * h)) ** 2 + ((xx - w / 2) / (0.42 * w)) ** 2 < 1
    texture = ndimage.gaussian_filter(rng.normal(size=(n, h, w)), (0, 2, 2))
    texture = np.clip(texture / np.abs(texture).max(), -1, 1)
    masks = np.broadcast_to(brain, (n, h, w)).copy()
    return np.where(masks, texture, 0.0), masks


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# MAE, lesion MAE, PSNR ---------------------------------------------------------------------
def test_mae_and_psnr_match_numpy_with_and_without_mask():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(-1, 1, (2, 5, 6, 7))
    mask = rng.random((5, 6, 7)) < 0.4
    assert M.mae(x, y) == pytest.approx(np.mean(np.abs(x - y)), rel=1e-12)
    assert M.mae(x, y, mask) == pytest.approx(np.abs(x - y)[mask].mean(), rel=1e-12)
    assert M.psnr(x, y) == pytest.approx(10 * np.log10(4 / np.mean((x - y) ** 2)), rel=1e-12)
    mse_in = np.mean((x - y)[mask] ** 2)
    assert M.psnr(x, y, mask=mask) == pytest.approx(10 * np.log10(4 / mse_in), rel=1e-12)
    assert M.psnr(x, y, data_range=1.0) == pytest.approx(M.psnr(x, y) - 20 * np.log10(2), rel=1e-12)
    # torch tensors (any dtype) give the same numbers
    assert M.mae(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask)) == pytest.approx(
        M.mae(x, y, mask), rel=1e-12)


def test_identical_and_constant_offset_known_answers():
    x, _ = brain_slices(2, 96, 112)
    assert M.mae(x, x) == 0.0
    assert M.psnr(x, x) == math.inf
    assert M.ms_ssim(x, x) == pytest.approx(1.0, abs=1e-6)
    c = 0.1
    assert M.mae(x, x + c) == pytest.approx(c)
    assert M.psnr(x, x + c) == pytest.approx(20 * np.log10(2 / c))  # 26.02 dB
    assert M.psnr(x, x - c) == pytest.approx(26.0206, abs=1e-4)


def test_lesion_mae_is_the_papers_definition():
    x = np.zeros((4, 4))
    y = np.zeros((4, 4))
    lesion = np.zeros((4, 4), np.uint8)
    lesion[1:3, 1:3] = 1
    y[1, 1], y[1, 2] = 0.4, -0.2  # errors inside the lesion: 0.4 + 0.2 over 4 voxels
    y[0, 0] = 5.0  # an error outside the lesion does not count
    assert M.lesion_mae(x, y, lesion) == pytest.approx((0.4 + 0.2) / 4)
    direct = np.sum(lesion * np.abs(x - y)) / np.sum(lesion)
    assert M.lesion_mae(x, y, lesion) == pytest.approx(direct)


def test_empty_masks_give_nan_without_warnings(no_warnings):
    x, y = np.ones((3, 8, 8)), np.zeros((3, 8, 8))
    empty = np.zeros((3, 8, 8), bool)
    assert math.isnan(M.lesion_mae(x, y, empty))
    assert math.isnan(M.mae(x, y, empty))
    assert math.isnan(M.psnr(x, y, mask=empty))
    assert np.nanmean([M.lesion_mae(x, y, empty), 0.25]) == 0.25


def test_bad_shapes_raise_input_error():
    with pytest.raises(InputError, match="shapes"):
        M.mae(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(InputError, match="mask"):
        M.lesion_mae(np.zeros((4, 4)), np.zeros((4, 4)), np.ones((3, 3)))


# MS-SSIM -----------------------------------------------------------------------------------
def test_ms_ssim_equals_monai_five_scales_on_paper_grid():
    x, _ = brain_slices(2, 192, 224)
    y = x + 0.05 * np.random.default_rng(2).normal(size=x.shape)
    ours = M.ms_ssim(x, y, reduction="none")
    monai = MultiScaleSSIMMetric(spatial_dims=2, data_range=2.0, reduction="none")(
        torch.from_numpy(y[:, None]).float(), torch.from_numpy(x[:, None]).float())
    assert M.max_ms_ssim_scales(x.shape) == 5
    np.testing.assert_allclose(ours, monai.numpy().ravel(), rtol=1e-5)
    # four scales = MONAI with the coarsest four standard weights renormalised
    w4 = np.array(M.MS_SSIM_WEIGHTS[1:]) / sum(M.MS_SSIM_WEIGHTS[1:])
    monai4 = MultiScaleSSIMMetric(spatial_dims=2, data_range=2.0, weights=tuple(w4),
                                  reduction="none")(
        torch.from_numpy(y[:, None]).float(), torch.from_numpy(x[:, None]).float())
    np.testing.assert_allclose(M.ms_ssim(x, y, scales=4, reduction="none"),
                               monai4.numpy().ravel(), rtol=1e-5)


def test_ms_ssim_on_demo_grid_is_the_paper_metric_without_its_finest_scale():
    """On the paper grid MS-SSIM₅(x) = cs₁(x)^w₁ · MS-SSIM₄(x pooled ×½)^(1 − w₁): the
    demo grid's 4-scale value measures the paper's scales 2–5."""
    x, _ = brain_slices(2, 192, 224, seed=3)
    y = x + 0.08 * np.random.default_rng(3).normal(size=x.shape)
    xt, yt = (torch.from_numpy(a[:, None]).float() for a in (x, y))
    _, cs = compute_ssim_and_cs(xt, yt, spatial_dims=2, kernel_size=(11, 11),
                                kernel_sigma=(1.5, 1.5), data_range=2.0)
    cs1 = cs.flatten(1).mean(1).double().numpy()
    pooled = [torch.nn.functional.avg_pool2d(t, 2)[:, 0].numpy() for t in (xt, yt)]
    assert pooled[0].shape[1:] == (96, 112)
    ms4 = M.ms_ssim(*pooled, reduction="none")  # auto: 4 scales on 96×112
    w1 = M.MS_SSIM_WEIGHTS[0]
    np.testing.assert_allclose(M.ms_ssim(x, y, reduction="none"), cs1 ** w1 * ms4 ** (1 - w1),
                               rtol=1e-5)


def test_ms_ssim_demo_grid_works_and_falls_monotonically_with_noise():
    x, brain = brain_slices(2, 96, 112, seed=4)
    assert M.max_ms_ssim_scales(x.shape) == 4
    with pytest.raises(ValueError):  # why we do not call MultiScaleSSIMMetric directly here
        xt = torch.from_numpy(x[:, None])
        MultiScaleSSIMMetric(spatial_dims=2, data_range=2.0)(xt, xt)
    noise = np.random.default_rng(5).normal(size=x.shape)
    scores = [M.ms_ssim(x, np.where(brain, x + s * noise, 0.0))
              for s in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4)]
    assert scores[0] == pytest.approx(1.0, abs=1e-6)
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert 0 < scores[-1] < 0.9
    # symmetric, channels are separate images, shapes (H, W) and (B, C, H, W) accepted
    y = np.where(brain, x + 0.1 * noise, 0.0)
    assert M.ms_ssim(y, x) == pytest.approx(M.ms_ssim(x, y), rel=1e-6)
    assert M.ms_ssim(x[0], y[0]) == pytest.approx(M.ms_ssim(x[:1], y[:1]), rel=1e-6)
    as_channels = M.ms_ssim(x.reshape(1, 2, 96, 112), y.reshape(1, 2, 96, 112))
    assert as_channels == pytest.approx(M.ms_ssim(x, y), rel=1e-6)


def test_ms_ssim_refuses_impossible_scales():
    x = np.zeros((2, 96, 112))
    with pytest.raises(InputError, match="at most 4"):
        M.ms_ssim(x, x, scales=5)
    assert M.ms_ssim(x, x, scales=5, kernel_size=5, kernel_sigma=0.75) == pytest.approx(1.0)
    with pytest.raises(InputError, match="at most 0"):
        M.ms_ssim(np.zeros((8, 8)), np.zeros((8, 8)))
    with pytest.raises(InputError, match="between 1 and 5"):
        M.ms_ssim(x, x, scales=0)


# per-channel evaluation --------------------------------------------------------------------
def test_channel_metrics_slices_and_volume_agree_with_direct_computation(no_warnings):
    n, h, w = 5, 96, 112
    dwi, brain = brain_slices(n, h, w, seed=6)
    adc, _ = brain_slices(n, h, w, seed=7)
    target = np.stack([dwi, adc], axis=1)  # (B, 2, H, W)
    rng = np.random.default_rng(8)
    pred = np.where(brain[:, None], target + 0.1 * rng.normal(size=target.shape), 0.0)
    pred[:, :, 0, 0] = 0.7  # stray background: not in MAE/PSNR (outside brain), masked for MS-SSIM
    lesion = np.zeros_like(brain)
    lesion[2, 40:50, 50:60] = True
    brain[0] = False  # a slice without brain: MS-SSIM skips it

    out = M.channel_metrics(pred, target, brain, lesion)
    assert list(out) == ["DWI", "ADC"]
    for c, name in enumerate(("DWI", "ADC")):
        err = pred[:, c] - target[:, c]
        assert out[name]["mae"] == pytest.approx(np.abs(err)[brain].mean(), rel=1e-12)
        assert out[name]["lesion_mae"] == pytest.approx(np.abs(err)[lesion].mean(), rel=1e-12)
        mse = np.mean(err[brain] ** 2)
        assert out[name]["psnr"] == pytest.approx(10 * np.log10(4 / mse), rel=1e-12)
        masked = [np.where(brain, a[:, c], 0.0)[1:] for a in (target, pred)]
        assert out[name]["ms_ssim"] == pytest.approx(M.ms_ssim(*masked), rel=1e-6)

    # the same data as a (2, X, Y, Z) volume, axial slices along Z; (B, 1, H, W) masks; tensors
    vol = lambda a: np.moveaxis(a, 0, -1)  # noqa: E731
    as_volume = M.channel_metrics(vol(pred), vol(target), vol(brain), vol(lesion))
    as_tensors = M.channel_metrics(*(torch.from_numpy(a) for a in
                                     (pred, target, brain[:, None], lesion[:, None])))
    for other in (as_volume, as_tensors):
        for name in out:
            for k, v in out[name].items():
                assert other[name][k] == pytest.approx(v, rel=1e-6)

    no_lesion = M.channel_metrics(pred, target, brain, np.zeros_like(lesion))
    assert math.isnan(no_lesion["ADC"]["lesion_mae"])
    assert no_lesion["ADC"]["mae"] == out["ADC"]["mae"]
    assert M.flat_metrics(out)["ADC_lesion_mae"] == out["ADC"]["lesion_mae"]


def test_channel_metrics_rejects_mismatched_masks():
    pred = np.zeros((3, 2, 96, 112))
    with pytest.raises(InputError, match="neither"):
        M.channel_metrics(pred, pred, np.ones((3, 96, 100)), None)
    with pytest.raises(InputError, match="lesion"):
        M.channel_metrics(pred, pred, np.ones((3, 96, 112)), np.ones((3, 96, 100)))


def test_lesion_contrast_is_rdwi_radc(no_warnings):
    brain = np.zeros((2, 10, 10), bool)
    brain[:, 1:9, 1:9] = True
    adc = np.where(brain, 800.0, 0.0)
    adc[:, 1:3, 1:9] = 3000.0  # CSF: 32 of the 128 brain voxels, which a mean would follow
    lesion = np.zeros_like(brain)
    lesion[0, 5:7, 5:7] = True
    adc[lesion] = 400.0
    assert L.lesion_contrast(adc, lesion, brain) == pytest.approx(0.5)  # the median is tissue
    dwi = np.where(brain, 100.0, 0.0)
    dwi[lesion] = 180.0
    assert L.lesion_contrast(torch.from_numpy(dwi), lesion, brain) == pytest.approx(1.8)
    # invisible: the lesion is the tissue around it
    assert L.lesion_contrast(np.where(brain, 800.0, 0.0), lesion, brain) == pytest.approx(1.0)
    assert math.isnan(L.lesion_contrast(adc, np.zeros_like(lesion), brain))  # no lesion
    assert math.isnan(L.lesion_contrast(adc, brain, brain))  # no brain outside it
    with pytest.raises(InputError, match="lesion contrast"):
        L.lesion_contrast(adc, lesion[:, :5], brain)


# infarct core ------------------------------------------------------------------------------
def test_dice_cases():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros_like(a)
    assert L.dice(a, b) == 1.0  # both empty: agreement on "no core"
    a[0, 0, :4] = True
    assert L.dice(a, b) == 0.0  # one empty
    assert L.dice(a, a) == 1.0
    b[0, 0, :2] = True
    assert L.dice(a, b) == pytest.approx(2 * 2 / (4 + 2))
    c = np.zeros_like(a)
    c[3, 3, 3] = True
    assert L.dice(a, c) == 0.0  # disjoint


def test_volume_ml_with_anisotropic_spacing():
    mask = np.zeros((10, 10, 4), np.uint8)
    mask[:5, :2, :1] = 1  # 10 voxels of 2 × 2 × 5 mm = 200 mm³
    assert L.volume_ml(mask, (2.0, 2.0, 5.0)) == pytest.approx(0.2)
    assert L.volume_ml(mask, (1.0, 1.0, 5.0)) == pytest.approx(0.05)
    with pytest.raises(InputError, match="spacing"):
        L.volume_ml(mask, (1.0, 1.0))


def test_core_mask_from_synthetic_adc_keeps_blob_and_drops_speck():
    spacing = (2.0, 2.0, 5.0)
    shape = (40, 48, 14)
    ii, jj, kk = np.indices(shape)
    brain = ((ii - 20) / 17.0) ** 2 + ((jj - 24) / 21.0) ** 2 + ((kk - 7) / 5.5) ** 2 < 1
    adc = np.where(brain, 800.0, 0.0)  # normal tissue; background 0 must not become core
    # a sphere of radius 9 mm
    blob = ((ii - 14) * 2.0) ** 2 + ((jj - 24) * 2.0) ** 2 + ((kk - 7) * 5.0) ** 2 < 9.0 ** 2
    adc[blob] = 500.0
    adc[28, 30, 7] = 400.0  # one-voxel speck: 0.02 ml < 0.2 ml
    assert brain[28, 30, 7] and not blob[28, 30, 7]
    # a diagonal chain of 12 noise voxels (0.24 ml if chained): no two share a face
    chain = (np.arange(22, 34), np.arange(12, 24), np.full(12, 6))
    adc[chain] = 600.0
    assert brain[chain].all() and not blob[chain].any()

    core = L.core_mask_from_adc(adc, brain, spacing=spacing)
    assert core.dtype == bool
    np.testing.assert_array_equal(core, blob)
    assert L.volume_ml(core, spacing) == pytest.approx(blob.sum() * 0.02)
    kept = L.core_mask_from_adc(adc, brain, spacing=spacing, min_component_ml=0.0)
    assert kept.sum() == blob.sum() + 1 + 12
    assert not L.core_mask_from_adc(adc, brain, spacing=spacing, threshold=450.0).any()

    # a partial-volume rim along the brain's edge (resampled zero background) and its guard
    edge = brain & ~ndimage.binary_erosion(brain)
    rimmed = adc.copy()
    rimmed[edge] = 300.0
    assert L.core_mask_from_adc(rimmed, brain, spacing=spacing).sum() > blob.sum() + 100
    guarded = L.core_mask_from_adc(rimmed, brain, spacing=spacing, exclude_rim_mm=5.0)
    np.testing.assert_array_equal(guarded, blob)

    cmp = L.core_comparison(core, blob[:, :, :] & (ii < 14), spacing)  # truth: half the blob
    assert cmp["true_ml"] < cmp["pred_ml"] == pytest.approx(L.volume_ml(blob, spacing))
    assert cmp["volume_diff_ml"] == pytest.approx(cmp["pred_ml"] - cmp["true_ml"])
    assert cmp["volume_diff_ml"] > 0  # overestimate is positive
    assert cmp["abs_volume_diff_ml"] == pytest.approx(abs(cmp["volume_diff_ml"]))
    assert cmp["dice"] == pytest.approx(2 * cmp["true_ml"] / (cmp["pred_ml"] + cmp["true_ml"]))


def test_core_mask_refuses_adc_in_wrong_units():
    brain = np.ones((8, 8, 4), bool)
    with pytest.raises(InputError, match="10⁻⁶ mm²/s"):
        L.core_mask_from_adc(np.full((8, 8, 4), 0.0008), brain, spacing=(1, 1, 5))
    with pytest.raises(InputError, match="same grid"):
        L.core_mask_from_adc(np.full((8, 8, 4), 800.0), brain[:, :, :2], spacing=(1, 1, 5))


# aggregation and Table 1 -------------------------------------------------------------------
def test_summarise_skips_nan_and_groups_by_model(no_warnings):
    nan = math.nan
    rows = [
        {"case": "a", "model": "cLDM", "DWI_mae": 0.1, "DWI_lesion_mae": nan, "DWI_psnr": 25.0},
        {"case": "b", "model": "cLDM", "DWI_mae": 0.3, "DWI_lesion_mae": 0.2, "DWI_psnr": math.inf},
        {"case": "c", "model": "cLDM", "DWI_mae": 0.2, "DWI_lesion_mae": nan, "DWI_psnr": 27.0},
        {"case": "a", "model": "cLDM-PT", "DWI_mae": 0.05, "DWI_lesion_mae": nan},
    ]
    s = T.summarise(rows)
    assert list(s) == ["cLDM", "cLDM-PT"]
    assert s["cLDM"]["DWI_mae"]["mean"] == pytest.approx(0.2)
    assert s["cLDM"]["DWI_mae"]["std"] == pytest.approx(np.std([0.1, 0.3, 0.2], ddof=1))
    assert s["cLDM"]["DWI_mae"]["n"] == 3
    lesion = s["cLDM"]["DWI_lesion_mae"]
    assert lesion["mean"] == pytest.approx(0.2) and lesion["n"] == 1 and math.isnan(lesion["std"])
    assert s["cLDM"]["DWI_psnr"]["mean"] == math.inf
    none = s["cLDM-PT"]["DWI_lesion_mae"]
    assert none["n"] == 0 and math.isnan(none["mean"])
    assert "case" not in s["cLDM"]


def test_format_table1_shape_and_best_marks():
    rows = []
    rng = np.random.default_rng(9)
    for model, quality in (("cLDM", 0.0), ("cLDM-PT", 0.1)):
        for case in range(3):
            out = {ch: {"mae": 0.08 - quality / 5 + 0.01 * rng.random(),
                        "lesion_mae": 0.2 - quality / 5,
                        "psnr": 27 + 10 * quality + rng.random(),
                        "ms_ssim": 0.85 + quality / 10}
                   for ch in ("DWI", "ADC")}
            rows.append({"case": str(case), "model": model, **M.flat_metrics(out)})
    table = T.format_table1(T.summarise(rows), ["cLDM", "cLDM-PT"])
    lines = table.splitlines()
    assert len(lines) == 2 + 2
    assert all(line.count("|") == 1 + 1 + 8 for line in lines)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["Model", "DWI MAE↓", "DWI Lesion MAE↓", "DWI PSNR↑", "DWI MS-SSIM↑",
                      "ADC MAE↓", "ADC Lesion MAE↓", "ADC PSNR↑", "ADC MS-SSIM↑"]
    assert lines[3].startswith("| cLDM-PT |") and lines[3].count("**") == 2 * 8  # best everywhere
    assert "±" in lines[2] and "**" not in lines[2]
    with pytest.raises(InputError, match="Pix2Pix"):
        T.format_table1(T.summarise(rows), ["Pix2Pix"])


def test_lesion_auc_equals_monai_roc_auc_with_ties_and_direction():
    import torch
    from monai.metrics import compute_roc_auc

    from ctp2mri.evaluation.lesion_metrics import lesion_auc

    rng = np.random.default_rng(4)
    image = np.round(rng.normal(0.0, 1.0, (12, 10, 3)), 1)  # rounded: many ties
    lesion = np.zeros(image.shape, bool)
    lesion[3:7, 2:6, 1] = True
    image[lesion] += 1.0
    brain = np.ones(image.shape, bool)
    brain[0] = False
    ours = lesion_auc(image, lesion, brain, higher_is_lesion=True)
    inside = brain | lesion
    reference = compute_roc_auc(torch.as_tensor(image[inside]), torch.as_tensor(lesion[inside].astype(np.int64)))
    assert ours == pytest.approx(float(reference), abs=1e-12)
    assert lesion_auc(-image, lesion, brain, higher_is_lesion=False) == pytest.approx(ours)
    assert lesion_auc(image, lesion, brain, higher_is_lesion=False) == pytest.approx(1.0 - ours)
    perfect = np.where(lesion, 5.0, 0.0)
    assert lesion_auc(perfect, lesion, brain, True) == 1.0
    assert lesion_auc(np.zeros(image.shape), lesion, brain, True) == 0.5  # all tied: chance
    assert math.isnan(lesion_auc(image, np.zeros(image.shape, bool), brain, True))
    with pytest.raises(InputError):
        lesion_auc(image, lesion[:5], brain, True)

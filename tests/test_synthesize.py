"""The synthesis engine: geometry round trip, skipped slices, K samples, seeding, samplers,
progress/cancel, out-of-memory retries, bad input and the written files."""

from __future__ import annotations

import json
import re
from dataclasses import FrozenInstanceError, replace

import nibabel as nib
import numpy as np
import pytest
import torch
from _helpers_cldm import NORMALISATION, save_tiny_cldm

from ctp2mri.errors import Cancelled, InputError
from ctp2mri.io.nifti import load_nifti, save_nifti
from ctp2mri.io.volume import Volume
from ctp2mri.preprocessing.preprocess import resample_to_grid
from ctp2mri.progress import CancelToken
from ctp2mri.settings import DEFAULT_SAMPLER, SAMPLER_STEPS
from ctp2mri.synthesis.batch_size import auto_batch_size
from ctp2mri.synthesis.inference import sample_slices
from ctp2mri.synthesis.lesion_head import has_lesion_head, lesion_probability
from ctp2mri.synthesis.loading import load_model
from ctp2mri.synthesis.sample_settings import SampleSettings
from ctp2mri.synthesis.synthesize import run_synthesize, synthesize, write_outputs

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 2
DWI_RANGE = (NORMALISATION["dwi"]["lo"], NORMALISATION["dwi"]["hi"])
ADC_RANGE = (NORMALISATION["adc"]["lo"], NORMALISATION["adc"]["hi"])


@pytest.fixture(scope="module")
def model(tiny_cldm):
    return load_model(tiny_cldm, "cpu")


@pytest.fixture(scope="module")
def case():
    from ctp2mri.phantom import generate_case

    return generate_case(5, profile="demo")  # on the demo model's own grid, skull-stripped


def _oblique_grid(reference: Volume, spacing=(1.5, 1.5, 4.0), shape=(120, 140, 44),
                  angle_deg=12.0) -> np.ndarray:
    """An LPS-like (x and y flipped), rotated grid centred on ``reference``."""
    th = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-spacing[0], -spacing[1], spacing[2]])
    centre = reference.affine @ np.append((np.array(reference.spatial_shape) - 1) / 2, 1)
    affine[:3, 3] = centre[:3] - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return affine


@pytest.fixture(scope="module")
def oblique(case):
    """The phantom CTP (and its lesion) on a 1.5 × 1.5 × 4 mm oblique LPS grid: not the model's."""
    shape = (120, 140, 44)
    affine = _oblique_grid(case.ctp, shape=shape)
    ctp = resample_to_grid(case.ctp, affine, shape, "linear")
    lesion = resample_to_grid(case.lesion, affine, shape, "nearest")
    return ctp, lesion


@pytest.fixture(scope="module")
def oblique_result(oblique, model):
    ctp, lesion = oblique
    return synthesize(ctp, model, steps=STEPS, samples=3, ground_truth_lesion=lesion)


def test_outputs_lie_on_the_input_grid_with_values_in_the_models_units(oblique, oblique_result):
    ctp, _ = oblique
    r = oblique_result
    for v in (r.dwi, r.adc, r.core, r.brain, *r.uncertainty.values()):
        assert v.spatial_shape == ctp.spatial_shape and not v.is_4d
        assert np.array_equal(v.affine, ctp.affine)
    brain = r.brain.array > 0
    assert r.core.array.dtype == np.uint8 and r.brain.array.dtype == np.uint8
    # the output's brain is the CTP's brain (~1.35 l), less at most a thin rim
    assert 1200 < r.report["brain_mask"]["volume_ml"] < 1500
    assert r.report["brain_mask"]["rim_voxels_without_model_data"] < 0.01 * brain.sum()
    # [−1, 1] maps onto the model's stored ranges; interpolation keeps values inside them
    for vol, (lo, hi) in ((r.dwi, DWI_RANGE), (r.adc, ADC_RANGE)):
        inside = vol.array[brain]
        assert inside.min() >= lo - 1e-3 and inside.max() <= hi + 1e-3
        assert inside.std() > 1.0
        assert (vol.array[~brain] == 0).all()
    # core = ADC < 620 inside the brain (components ≥ 0.2 ml)
    core = r.core.array > 0
    assert not (core & ~brain).any() and (r.adc.array[core] < 620).all()
    voxel_ml = np.prod(ctp.spacing) / 1000
    assert r.report["core_volume_ml"] == pytest.approx(core.sum() * voxel_ml)
    assert set(r.report["core"]["ground_truth"]) >= {"dice", "volume_diff_ml", "true_ml"}
    assert r.report["core"]["ground_truth"]["true_ml"] > 0


def test_input_on_another_profiles_grid_gets_a_notice(case, model):
    affine = _oblique_grid(case.ctp, spacing=(1.0, 1.0, 5.0), shape=(176, 200, 30), angle_deg=0)
    paper_grid = resample_to_grid(case.ctp, affine, (176, 200, 30), "linear")
    r = synthesize(paper_grid, model, steps=1)
    assert any("'paper' profile" in n for n in r.report["notices"])
    assert r.dwi.spatial_shape == (176, 200, 30)


def test_uncertainty_is_the_spread_of_the_k_samples(oblique_result, case, model):
    r = oblique_result
    brain = r.brain.array > 0
    for what in ("dwi", "adc"):
        sd = r.uncertainty[what].array
        assert (sd >= 0).all() and (sd[~brain] == 0).all() and sd[brain].mean() > 0.1
    assert r.report["samples"] == 3
    single = synthesize(case.ctp, model, steps=STEPS, samples=1, brain_mask=case.mask)
    assert single.uncertainty is None


def test_slices_without_brain_are_not_sampled(case, model):
    mask = case.mask.array.copy()
    z_brain = np.flatnonzero(mask.any(axis=(0, 1)))
    gap = z_brain[10:14]
    mask[:, :, gap] = 0  # four slices inside the brain's extent hold no brain
    r = synthesize(case.ctp, model, steps=STEPS, batch_size=4, brain_mask=case.mask.with_array(mask))
    n = z_brain.size - gap.size
    assert r.report["slices_sampled"] == n and r.report["slices_skipped"] == gap.size
    assert r.report["network_calls"] == -(-n // 4) * STEPS  # only the sampled slices' batches
    assert (r.dwi.array[:, :, gap] == 0).all() and (r.adc.array[:, :, gap] == 0).all()
    # on the model's own grid the result is exact: brain voxels keep their mask
    assert np.array_equal(r.brain.array > 0, mask > 0)


def test_seed_determines_the_result(case, model):
    kw = {"steps": STEPS, "brain_mask": case.mask}
    a, b = synthesize(case.ctp, model, seed=4, **kw), synthesize(case.ctp, model, seed=4, **kw)
    c = synthesize(case.ctp, model, seed=5, **kw)
    assert np.array_equal(a.dwi.array, b.dwi.array) and np.array_equal(a.adc.array, b.adc.array)
    brain = a.brain.array > 0
    assert np.abs(a.adc.array - c.adc.array)[brain].mean() > 1.0


def test_both_samplers_run_and_differ(case, model):
    kw = {"steps": STEPS, "brain_mask": case.mask, "batch_size": 64}
    ddim = synthesize(case.ctp, model, sampler="ddim", **kw)
    dpm = synthesize(case.ctp, model, sampler="dpm++2m", **kw)
    assert ddim.report["sampler"] == "ddim" and dpm.report["sampler"] == "dpm++2m"
    assert ddim.report["network_calls"] == dpm.report["network_calls"] == STEPS
    brain = ddim.brain.array > 0
    assert np.isfinite(ddim.adc.array).all() and np.isfinite(dpm.adc.array).all()
    assert np.abs(ddim.adc.array - dpm.adc.array)[brain].mean() > 1.0
    with pytest.raises(InputError, match="eta"):
        synthesize(case.ctp, model, sampler="dpm++2m", eta=0.5, steps=STEPS)
    with pytest.raises(InputError, match="unknown sampler"):
        synthesize(case.ctp, model, sampler="euler", steps=STEPS)


@pytest.mark.parametrize("fields, words", [
    ({"sampler": "euler"}, "unknown sampler 'euler'; choose one of dpm++2m, ddim"),
    ({"sampler": "dpm++2m", "eta": 0.5}, "eta = 0.5 applies to DDIM only; dpm++2m is deterministic"),
    ({"steps": 0}, "steps must be a whole number ≥ 1, got 0"),
    ({"steps": 2.5}, "steps must be a whole number ≥ 1, got 2.5"),
    ({"sampler": "ddim", "eta": 1.5}, "eta must be a finite number ≥ 0 and ≤ 1, got 1.5"),
    ({"sampler": "ddim", "eta": float("nan")}, "eta must be a finite number ≥ 0 and ≤ 1, got nan"),
    ({"samples": 0}, "samples must be a whole number ≥ 1, got 0"),
    ({"seed": -1}, "seed must be a whole number ≥ 0"),
    ({"batch_size": 0}, "batch size must be a whole number ≥ 1, got 0"),
    ({"precision": "fp8"}, "unknown precision 'fp8'; choose one of fp32, bf16, fp16"),
    ({"use_ema": "no"}, "use_ema must be True or False, got 'no'"),
    ({"core_threshold": 0}, "core threshold (ADC, 10⁻⁶ mm²/s) must be a finite number > 0"),
])
def test_sample_settings_refuse_a_bad_value_with_one_clear_line(fields, words):
    with pytest.raises(InputError, match=re.escape(words)) as caught:
        SampleSettings(**fields)
    assert "\n" not in str(caught.value)


def test_sample_settings_defaults_steps_and_overrides(case, model):
    default = SampleSettings()
    assert default.sampler == DEFAULT_SAMPLER and default.steps is None and default.batch_size is None
    assert default.n_steps == SAMPLER_STEPS[DEFAULT_SAMPLER]
    assert replace(default, sampler="ddim").n_steps == SAMPLER_STEPS["ddim"]  # unset steps follow the sampler
    assert replace(SampleSettings(steps=5), sampler="ddim").n_steps == 5  # given steps stay
    whole = SampleSettings(steps=7.0, seed=3.0, eta=0)
    assert type(whole.steps) is int and type(whole.seed) is int and type(whole.eta) is float
    with pytest.raises(FrozenInstanceError):
        default.seed = 1
    # keyword overrides are checked as a whole with the settings they replace, before any work
    with pytest.raises(InputError, match="applies to DDIM only"):
        synthesize(case.ctp, model, SampleSettings(sampler="ddim", eta=0.5), sampler="dpm++2m")
    with pytest.raises(TypeError, match="synthesize.. got unexpected keyword arguments: n_steps"):
        synthesize(case.ctp, model, n_steps=STEPS)


def test_settings_and_keyword_overrides_give_identical_output(case, model, tmp_path):
    fields = {"sampler": "ddim", "steps": STEPS, "eta": 0.5, "samples": 2, "seed": 3, "batch_size": 4}
    kw = {"brain_mask": case.mask}
    by_settings = synthesize(case.ctp, model, SampleSettings(**fields), **kw)
    by_keywords = synthesize(case.ctp, model, **fields, **kw)
    overridden = synthesize(case.ctp, model, SampleSettings(seed=9, samples=1), **fields, **kw)
    for other in (by_keywords, overridden):
        for name in ("dwi", "adc", "core", "brain"):
            assert np.array_equal(getattr(by_settings, name).array, getattr(other, name).array), name
        for name in ("dwi", "adc"):
            assert np.array_equal(by_settings.uncertainty[name].array, other.uncertainty[name].array)
        for key in ("sampler", "steps", "eta", "samples", "seed", "batch_size", "network_calls"):
            assert by_settings.report[key] == other.report[key], key
    src, mask = tmp_path / "ctp.nii.gz", tmp_path / "mask.nii.gz"
    save_nifti(case.ctp, src)
    save_nifti(case.mask, mask)
    run_synthesize(src, model, tmp_path / "settings", SampleSettings(**fields), mask=mask)
    run_synthesize(src, model, tmp_path / "keywords", mask=mask, **fields)
    for name in ("dwi", "adc", "uncertainty_adc"):
        assert np.array_equal(load_nifti(tmp_path / "settings" / f"{name}.nii.gz").array,
                              load_nifti(tmp_path / "keywords" / f"{name}.nii.gz").array), name


def test_progress_reports_every_step(case, model):
    calls = []
    r = synthesize(case.ctp, model, steps=STEPS, batch_size=8, brain_mask=case.mask,
                   progress=lambda step, total, info: calls.append((step, total, dict(info))))
    n = r.report["slices_sampled"]
    batches = -(-n // 8)
    assert [c[0] for c in calls] == list(range(1, batches * STEPS + 1))
    assert {c[1] for c in calls} == {batches * STEPS}
    last = calls[-1][2]
    assert last["slices_done"] == last["slices_total"] == n
    assert last["steps_done"] == last["steps_total"] == batches * STEPS and last["eta_s"] == 0
    assert {"slices_done", "slices_total", "steps_done", "steps_total", "eta_s"} <= set(calls[0][2])


def test_k_samples_share_batches_and_sample_zero_is_the_single_run(model):
    g = torch.Generator().manual_seed(0)
    cond = torch.rand((3, 15, 96, 112), generator=g) * 2 - 1
    single = sample_slices(model, cond, n_steps=STEPS, seed=2, sampler="dpm++2m")
    stats = {}
    many = sample_slices(model, cond, n_steps=STEPS, seed=2, sampler="dpm++2m", samples=4,
                         batch_size=12, stats=stats)
    assert many.shape == (12, 2, 96, 112) and stats["network_calls"] == STEPS  # one batch
    torch.testing.assert_close(many[::4], single, rtol=1e-5, atol=1e-5)
    assert (many[1::4] - single).abs().mean() > 1e-3


def test_gpu_out_of_memory_halves_the_batch(model, monkeypatch):
    """No GPU here: the denoiser raises CUDA's OOM error above 2 rows, as a full GPU would."""
    g = torch.Generator().manual_seed(1)
    cond = torch.rand((5, 15, 96, 112), generator=g) * 2 - 1
    reference = sample_slices(model, cond, n_steps=STEPS, batch_size=2)
    real = model.cldm.predict_noise

    def limited(z, t, c, alphas=None, limit=2):
        if z.shape[0] > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(z, t, c, alphas)

    monkeypatch.setattr(model.cldm, "predict_noise", limited)
    stats = {}
    out = sample_slices(model, cond, n_steps=STEPS, batch_size=8, stats=stats)
    assert stats["batch_size"] == 2 and stats["oom_retries"] == 2
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(model.cldm, "predict_noise", lambda z, t, c, alphas=None: limited(z, t, c, alphas, limit=0))
    with pytest.raises(InputError, match="out of GPU memory"):
        sample_slices(model, cond, n_steps=STEPS, batch_size=4)


def test_bad_input_is_refused(case, model):
    one_frame = Volume(case.ctp.array[..., :1], case.ctp.affine, frame_times=[0.0])
    with pytest.raises(InputError, match="only 1 time point"):
        synthesize(one_frame, model, steps=STEPS)
    nan = case.ctp.array.copy()
    nan[40, 50, 10, 3] = np.nan
    with pytest.raises(InputError, match="NaN|finite"):
        synthesize(case.ctp.with_array(nan), model, steps=STEPS)
    with pytest.raises(InputError, match="no brain found"):
        synthesize(case.ctp.with_array(np.full(case.ctp.array.shape, -1000, np.float32)), model,
                   steps=STEPS)
    with pytest.raises(InputError, match="4"):
        synthesize(case.ctp.with_array(case.ctp.array[..., 0]), model, steps=STEPS)


def test_cli_round_trip_keeps_the_affine_and_writes_every_file(oblique, tiny_cldm, tmp_path):
    ctp, _ = oblique
    src = save_nifti(ctp, tmp_path / "ctp.nii.gz")
    out = tmp_path / "out"
    run_synthesize(src, tiny_cldm, out, steps=STEPS, samples=2, device="cpu", seed=3)
    names = {"dwi.nii.gz", "adc.nii.gz", "core.nii.gz", "brain.nii.gz", "uncertainty_dwi.nii.gz",
             "uncertainty_adc.nii.gz", "report.json"}
    assert {p.name for p in out.iterdir()} == names
    affine_in = nib.load(src).affine
    for name in names - {"report.json"}:
        img = nib.load(out / name)
        assert np.array_equal(img.affine, affine_in) and img.shape == ctp.spatial_shape
    assert nib.load(out / "core.nii.gz").get_data_dtype() == np.uint8
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["path"] == str(src) and report["samples"] == 2
    assert report["files"]["uncertainty_adc"] == "uncertainty_adc.nii.gz"
    with pytest.raises(InputError, match="already exists"):
        run_synthesize(src, tiny_cldm, out, steps=STEPS, device="cpu")
    # overwrite replaces the folder; one sample writes no uncertainty
    run_synthesize(src, tiny_cldm, out, steps=STEPS, device="cpu", overwrite=True)
    assert not (out / "uncertainty_dwi.nii.gz").exists() and load_nifti(out / "adc.nii.gz").array.max() > 0


def test_cancel_stops_within_a_step_and_leaves_no_files(oblique, tiny_cldm, tmp_path):
    ctp, _ = oblique
    src = save_nifti(ctp, tmp_path / "ctp.nii.gz")
    token, calls = CancelToken(), []

    def progress(step, total, info):
        calls.append(step)
        token.cancel()

    with pytest.raises(Cancelled):
        run_synthesize(src, tiny_cldm, tmp_path / "out", steps=5, device="cpu", progress=progress,
                       cancel=token)
    assert calls == [1]  # no second network call
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctp.nii.gz"]


def test_write_outputs_is_atomic_on_failure(oblique_result, tmp_path, monkeypatch):
    import ctp2mri.synthesis.synthesize as engine

    def broken(volume, path, dtype=None):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(engine, "save_nifti", broken)
    with pytest.raises(OSError):
        write_outputs(oblique_result, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_model_with_a_lesion_head_also_maps_its_lesion_probability(case, model, tmp_path):
    """The perfusion encoder's lesion head, without sampling: 0–1 inside the brain, 0 outside,
    the encoder's own output carried onto the input grid, written beside the images."""
    from dataclasses import replace as replace_case

    from ctp2mri.data import normalise_case

    head = load_model(save_tiny_cldm(tmp_path / "head", condition_encoder="perfusion", condition_options={
        "out_channels": 8, "hidden_channels": 8, "down_channels": 8, "sigmas": [1.0], "latent_channels": 3}), "cpu")
    assert has_lesion_head(head) and not has_lesion_head(model)
    result = synthesize(case.ctp, head, steps=1, brain_mask=case.mask)
    write_outputs(result, tmp_path / "out")
    prob, brain = result.lesion_probability.array, result.brain.array > 0
    assert prob.shape == case.ctp.spatial_shape and np.allclose(result.lesion_probability.affine, case.ctp.affine)
    assert prob.min() >= 0 and prob.max() <= 1 and not prob[~brain].any() and prob[brain].std() > 0
    written = load_nifti(tmp_path / "out" / "lesion_probability.nii.gz")
    np.testing.assert_allclose(written.array, prob, atol=1e-6)
    assert "lesion_probability" in json.loads((tmp_path / "out" / "report.json").read_text())["files"]
    # With a mask over the whole field of view the model grid is the case's own (a demo-grid
    # case): the map equals the encoder's output on the case's normalised slices.
    full = case.mask.with_array(np.ones(case.mask.array.shape, np.uint8))
    on_grid = synthesize(case.ctp, head, steps=1, brain_mask=full).lesion_probability.array
    part = normalise_case(replace_case(case, mask=full), "case", "demo", min_brain_fraction=0.0)
    direct = np.moveaxis(lesion_probability(head, torch.from_numpy(part.cond), batch_size=5), 0, -1)
    np.testing.assert_allclose(on_grid[:, :, part.slices], direct, atol=1e-5)
    assert lesion_probability(model, torch.from_numpy(part.cond[:2])) is None


def test_auto_batch_size_is_bounded(model):
    assert 1 <= auto_batch_size(model, 96, 112, rows=5) <= 5
    assert 1 <= auto_batch_size(model, 96, 112, rows=1000) <= 32


@pytest.mark.slow  # ~6 s: a phantom case and five engine runs
def test_bench_synthesize_times_batched_and_naive_runs(tiny_cldm):
    from ctp2mri.bench import bench_synthesize, format_bench_synthesize

    r = bench_synthesize(model=tiny_cldm, steps=(2, 2), device="cpu", threads=1)
    assert [run["sampler"] for run in r["runs"]] == ["ddim", "dpm++2m"]
    for run in r["runs"]:
        assert run["naive"]["batch_size"] == 1 and run["batched"]["batch_size"] > 1
        assert run["naive"]["network_calls"] == r["slices"] * 2
        assert run["speedup_over_naive"] > 0 and run["batched"]["peak_memory_bytes"] > 0
    text = format_bench_synthesize(r)
    assert "DDIM-2" in text and "DPM-Solver++(2M)-2" in text and "one-slice-at-a-time" in text

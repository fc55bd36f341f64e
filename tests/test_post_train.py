"""Lesion-aware post-training (paper §2.2): gradients, frozen decoder, checkpoint record, resume."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from _helpers_cldm import LEGACY_NORMALISATION, save_tiny_cldm

from ctp2mri.checkpoints import load_checkpoint, read_config
from ctp2mri.data import SliceDataset
from ctp2mri.diffusion import NoiseSchedule
from ctp2mri.errors import Cancelled, InputError
from ctp2mri.losses import latent_loss
from ctp2mri.progress import CancelToken
from ctp2mri.training import post_train, post_training_loss
from ctp2mri.training.ldm import diffuse

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = {"device": "cpu", "num_workers": 0, "seed": 3, "log_every": 1, "batch_size": 4, "lr": 1e-3}


def _networks(base: Path):
    nets, _ = load_checkpoint(base)
    return nets["model"].train(), nets["autoencoder"].eval().requires_grad_(False)


def _batch(dataset: SliceDataset, lesion: bool, n: int = 4) -> dict:
    idx = torch.nonzero(dataset.has_lesion == lesion).flatten()[:n].tolist()
    samples = [dataset[i] for i in idx]
    return {k: torch.stack([s[k] for s in samples]) for k in ("target", "cond", "brain", "lesion")}


def _log(out: Path) -> list[dict[str, str]]:
    with open(out / "log.csv") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- one loss evaluation
@pytest.mark.parametrize("target", ["input", "reconstruction"])
def test_image_terms_reach_unet_and_rescaler_but_not_the_decoder(plain, tiny_cldm, target):
    model, autoencoder = _networks(tiny_cldm)
    batch = _batch(plain, lesion=True)
    schedule = NoiseSchedule()

    def grads(li, ll):
        model.zero_grad(set_to_none=True)
        loss, parts = post_training_loss(model, autoencoder, schedule, batch, torch.Generator().manual_seed(0),
                                         li, ll, target)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, parts

    plain_grads, _ = grads(0.0, 0.0)
    pt_grads, parts = grads(0.5, 1.0)
    assert parts["lesion_voxels"] > 0 and parts["lesion_loss"] > 0 and parts["image_loss"] > 0
    for prefix in ("unet.", "rescaler."):
        names = [n for n in pt_grads if n.startswith(prefix)]
        assert names
        diff = sum(float((pt_grads[n] - plain_grads[n]).abs().sum()) for n in names)
        assert diff > 0, prefix  # the image terms changed this network's gradient
        assert all(torch.isfinite(pt_grads[n]).all() for n in names)
    assert all(p.grad is None and not p.requires_grad for p in autoencoder.parameters())


def test_zero_lesion_batch_gives_zero_lesion_loss_and_finite_gradients(plain, tiny_cldm):
    model, autoencoder = _networks(tiny_cldm)
    batch = _batch(plain, lesion=False)
    assert batch["lesion"].sum() == 0
    loss, parts = post_training_loss(model, autoencoder, NoiseSchedule(), batch, torch.Generator().manual_seed(1),
                                     0.01, 0.02)
    assert parts["lesion_loss"] == 0.0 and parts["lesion_voxels"] == 0.0
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_lambda_zero_zero_is_exactly_the_eq4_loss(plain, tiny_cldm):
    model, autoencoder = _networks(tiny_cldm)
    batch = _batch(plain, lesion=True)
    schedule = NoiseSchedule()
    loss, _ = post_training_loss(model, autoencoder, schedule, batch, torch.Generator().manual_seed(2), 0.0, 0.0)
    _, t, eps, z_t = diffuse(autoencoder, schedule, batch["target"], torch.Generator().manual_seed(2), "fp32")
    assert torch.equal(loss, latent_loss(eps, model(z_t, t, batch["cond"])))


def test_a_scaled_base_decodes_its_one_step_estimate_over_the_scale(plain, tmp_path):
    """With scale s: z_0 = s·E(x), ẑ_0 by Eq. 5 on those latents, x̂ = D(ẑ_0 / s) (Eq. 6, 7)."""
    from ctp2mri.losses import image_loss, lesion_loss

    model, autoencoder = _networks(save_tiny_cldm(tmp_path / "scaled", scale_factor=3.0))
    model.eval()
    batch = _batch(plain, lesion=True)
    schedule = NoiseSchedule()
    with torch.no_grad():
        _, parts = post_training_loss(model, autoencoder, schedule, batch, torch.Generator().manual_seed(4),
                                      0.01, 0.02)
        _, t, _, z_t = diffuse(autoencoder, schedule, batch["target"], torch.Generator().manual_seed(4), "fp32",
                               3.0)
        x_hat = autoencoder.decode(schedule.predict_z0(z_t, t, model(z_t, t, batch["cond"])) / 3.0)
    assert parts["image_loss"] == pytest.approx(float(image_loss(batch["target"], x_hat, batch["brain"])), rel=1e-5)
    assert parts["lesion_loss"] == pytest.approx(float(lesion_loss(batch["target"], x_hat, batch["lesion"])),
                                                 rel=1e-5)


# --------------------------------------------------------------------------- whole runs
@pytest.mark.parametrize("target", ["input", "reconstruction"])
def test_post_train_writes_a_cldm_checkpoint_recording_base_lambdas_and_target(plain, tiny_cldm, tmp_path, target):
    out = post_train(plain, tiny_cldm, tmp_path / "pt", lambda_image=0.05, lambda_lesion=0.1, target=target, steps=2,
                     **COMMON)
    nets, config = load_checkpoint(out, kind="cldm")  # synthesis loads it like any cLDM
    base_nets, base_cfg = load_checkpoint(tiny_cldm)
    record = config["post_training"]
    assert record["base"]["path"] == str(tiny_cldm.resolve())
    assert record["base"]["provenance"]["command"] == base_cfg["provenance"]["command"]
    assert (record["lambda_image"], record["lambda_lesion"], record["target"]) == (0.05, 0.1, target)
    assert config["training"]["lambda_lesion"] == 0.1 and config["provenance"]["steps"] == 2
    assert config["normalisation"] == base_cfg["normalisation"] and config["schedule"] == base_cfg["schedule"]
    for k, v in base_nets["autoencoder"].state_dict().items():  # frozen: bitwise unchanged
        assert torch.equal(v, nets["autoencoder"].state_dict()[k]), k
    changed = [k for k, v in base_nets["model"].state_dict().items() if not torch.equal(v, nets["model"].state_dict()[k])]
    assert any(k.startswith("unet.") for k in changed) and any(k.startswith("rescaler.") for k in changed)
    rows = _log(out)
    assert len(rows) == 2 and all(float(r["image_loss"]) > 0 for r in rows)
    for r in rows:
        expected = float(r["latent_loss"]) + 0.05 * float(r["image_loss"]) + 0.1 * float(r["lesion_loss"])
        assert float(r["loss"]) == pytest.approx(expected, rel=1e-5)


def test_post_training_normalises_the_data_as_its_base_was_trained(plain, phantom_data, tiny_cldm, tmp_path):
    """ADC on the base's scale: the fixed window, or each case's quantiles for a base from
    before it (then a dataset on the window is refused)."""
    legacy = save_tiny_cldm(tmp_path / "legacy", normalisation=LEGACY_NORMALISATION)
    with pytest.raises(InputError, match="per-case quantiles"):
        post_train(plain, legacy, tmp_path / "refused", steps=1, **COMMON)
    for base, window in ((legacy, None), (tiny_cldm, [200.0, 2600.0])):
        out = post_train(phantom_data, base, tmp_path / f"pt_{base.parent.name}", steps=1, **COMMON)
        config = read_config(out)
        assert config["post_training"]["post_training_data_normalisation"]["adc_window"] == window
        assert config["normalisation"] == read_config(base)["normalisation"]


def test_a_bundled_base_without_training_weights_starts_from_its_ema(plain, tiny_cldm, tmp_path):
    from ctp2mri.recipes.train_demo import bundle_checkpoint

    bundled = bundle_checkpoint(tiny_cldm, tmp_path / "bundled", ["ema", "autoencoder"])  # as resources/models
    out = post_train(plain, bundled, tmp_path / "pt", steps=1, **{**COMMON, "lr": 1e-12})
    config = read_config(out)
    assert config["post_training"]["init"] == "ema" and config["training"]["init"] == "ema"
    nets, _ = load_checkpoint(out)
    base_ema = load_checkpoint(tiny_cldm, names=["ema"])[0]["ema"].state_dict()
    for k, v in nets["model"].state_dict().items():  # one step at lr 1e-12: still the base's EMA
        torch.testing.assert_close(v, base_ema[k], rtol=0, atol=1e-6)


def test_lesion_oversampling_is_recorded_and_raises_the_lesion_share(plain, tiny_cldm, tmp_path):
    out = post_train(plain, tiny_cldm, tmp_path / "pt", steps=3, lesion_oversample=20.0, **COMMON)
    sampling = read_config(out)["post_training"]["sampling"]
    natural = sampling["lesion_slice_fraction"]
    assert 0 < natural < 0.5
    assert sampling["effective_lesion_slice_fraction"] == pytest.approx(20 * natural / (20 * natural + 1 - natural))
    drawn = sum(float(r["lesion_slices"]) for r in _log(out)) / 3
    assert drawn > natural  # 12 slices drawn at an expected share of ~0.8 or more


def test_cancel_then_resume_retraces_the_uninterrupted_run(plain, tiny_cldm, tmp_path):
    kwargs = dict(steps=3, checkpoint_every=10, target="reconstruction", **COMMON)
    post_train(plain, tiny_cldm, tmp_path / "full", **kwargs)
    token = CancelToken()

    def progress(step, total, info):
        if step == 1:
            token.cancel()

    with pytest.raises(Cancelled, match="--resume"):
        post_train(plain, tiny_cldm, tmp_path / "cut", progress=progress, cancel=token, **kwargs)
    with pytest.raises(InputError, match="lambda_image"):
        post_train(plain, tiny_cldm, tmp_path / "cut", resume=True, **{**kwargs, "lambda_image": 0.5})
    post_train(plain, tiny_cldm, tmp_path / "cut", resume=True, **kwargs)
    full, cut = _log(tmp_path / "full"), _log(tmp_path / "cut")
    for column in ("loss", "image_loss", "lesion_loss"):
        assert [float(r[column]) for r in cut] == pytest.approx([float(r[column]) for r in full], abs=1e-6)


def test_bad_settings_are_refused(plain, tiny_cldm, tmp_path):
    with pytest.raises(InputError, match="target"):
        post_train(plain, tiny_cldm, tmp_path / "a", target="x", steps=1, **COMMON)
    with pytest.raises(InputError, match="lambda-lesion"):
        post_train(plain, tiny_cldm, tmp_path / "b", lambda_lesion=-1, steps=1, **COMMON)
    with pytest.raises(InputError, match="'cldm' checkpoint"):
        ae_only = load_checkpoint(tiny_cldm, names=["autoencoder"])[0]["autoencoder"]
        from ctp2mri.checkpoints import save_checkpoint

        ae_dir = save_checkpoint(tmp_path / "ae", {"model": ae_only}, {"kind": "autoencoder", "profile": "demo"})
        post_train(plain, ae_dir, tmp_path / "c", steps=1, **COMMON)


# --------------------------------------------------------------------------- the core term
def test_the_core_term_scores_the_estimates_adc_on_the_models_window_and_is_recorded(plain, tiny_cldm, tmp_path):
    from ctp2mri.losses import core_loss
    from ctp2mri.training.image_terms import core_threshold

    model, autoencoder = _networks(tiny_cldm)
    model.eval()
    batch = _batch(plain, lesion=True)
    schedule = NoiseSchedule()
    tau, width = core_threshold((200.0, 2600.0))
    assert (tau, width) == pytest.approx((-0.65, 1 / 30))  # 620 and 40 × 10⁻⁶ mm²/s on the window
    with torch.no_grad():
        loss, parts = post_training_loss(model, autoencoder, schedule, batch, torch.Generator().manual_seed(4),
                                         0.01, 0.02, lambda_core=0.5, core=(tau, width))
        _, t, _, z_t = diffuse(autoencoder, schedule, batch["target"], torch.Generator().manual_seed(4), "fp32")
        x_hat = autoencoder.decode(schedule.predict_z0(z_t, t, model(z_t, t, batch["cond"])))
    expected = core_loss(x_hat[:, 1:2], batch["lesion"], batch["brain"], tau, width)  # channel 1: ADC
    assert parts["core_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert float(loss) == pytest.approx(parts["latent_loss"] + 0.01 * parts["image_loss"] + 0.02 * parts["lesion_loss"]
                                        + 0.5 * parts["core_loss"], rel=1e-5)
    with pytest.raises(InputError, match="core threshold"):
        post_training_loss(model, autoencoder, schedule, batch, torch.Generator(), 0.01, 0.02, lambda_core=0.5)
    # whole run: logged, in the total, recorded; off (the paper's objective) by default
    out = post_train(plain, tiny_cldm, tmp_path / "pt", lambda_image=0.05, lambda_lesion=0.1, lambda_core=0.3,
                     steps=2, **COMMON)
    config = read_config(out)
    assert config["post_training"]["lambda_core"] == 0.3 and config["training"]["lambda_core"] == 0.3
    assert "λ_core" in config["training"]["loss"]
    for r in _log(out):
        assert 0 < float(r["core_loss"]) <= 1
        expected = (float(r["latent_loss"]) + 0.05 * float(r["image_loss"]) + 0.1 * float(r["lesion_loss"])
                    + 0.3 * float(r["core_loss"]))
        assert float(r["loss"]) == pytest.approx(expected, rel=1e-5)
    off = post_train(plain, tiny_cldm, tmp_path / "off", steps=1, **COMMON)
    assert "lambda_core" not in read_config(off)["post_training"] and _log(off)[0]["core_loss"] == ""


def test_the_core_term_needs_the_fixed_adc_window_and_a_nonnegative_lambda(plain, phantom_data, tmp_path):
    legacy = save_tiny_cldm(tmp_path / "legacy", normalisation=LEGACY_NORMALISATION)
    with pytest.raises(InputError, match="fixed ADC window.*--lambda-core 0"):
        post_train(phantom_data, legacy, tmp_path / "refused", lambda_core=0.5, steps=1, **COMMON)
    assert not (tmp_path / "refused").exists()  # nothing written
    with pytest.raises(InputError, match="lambda-core"):
        post_train(plain, legacy, tmp_path / "negative", lambda_core=-0.1, steps=1, **COMMON)

"""The levers for lesion fidelity: the learned perfusion encoder with its heads, the condition
loss, min-SNR weighting, the autoencoder's lesion term, the L1 reference regressor, and the
lesion AUC that evaluation reports."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from _helpers_cldm import TINY_AE, TINY_CLDM, TINY_D

from ctp2mri.checkpoints import load_checkpoint, read_config
from ctp2mri.errors import InputError
from ctp2mri.synthesis.inference import sample_slices
from ctp2mri.synthesis.loading import load_model, model_label
from ctp2mri.losses import condition_loss, lesion_reconstruction_loss, min_snr_weights, weighted_latent_loss
from ctp2mri.models import ConditionalLDM, model_config
from ctp2mri.models.conditioning import PerfusionEncoder, perfusion_features
from ctp2mri.training import train_autoencoder, train_ldm
from ctp2mri.training.pix2pix import train_pix2pix

TINY_ENCODER = {"out_channels": 8, "hidden_channels": 8, "down_channels": 8, "sigmas": [1.0]}
COMMON = {"device": "cpu", "num_workers": 0, "seed": 3, "log_every": 1}


# the encoder -----------------------------------------------------------------------------------
def test_perfusion_features_are_relative_and_brain_masked():
    torch.manual_seed(0)
    brain = torch.zeros(1, 1, 20, 24)
    brain[..., 4:16, 4:20] = 1
    hu = torch.full((1, 15, 20, 24), 35.0)
    hu[:, 5:9] += torch.tensor([10.0, 20.0, 15.0, 5.0])[None, :, None, None]  # a bolus in the tissue
    c = (hu.clamp(0, 200) / 100.0 - 1.0) * brain  # the data contract's normalisation
    f = perfusion_features(c, sigmas=(1.0,))
    relative, smooth, baseline, mask = f[:, :15], f[:, 15:30], f[:, 30:31], f[:, 31:32]
    torch.testing.assert_close(mask, brain)
    assert torch.all(f * (1 - brain) == 0)  # nothing outside the brain
    inside = brain[0, 0] > 0
    # the relative curve peaks at 1: enhancement over the peak of the slice's mean curve
    assert relative[0, 6][inside].max().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(smooth[0, 6][inside], relative[0, 6][inside], atol=1e-5, rtol=0)  # uniform: unchanged
    assert baseline[0, 0][inside].mean().item() == pytest.approx(0.35 - 1.0, abs=1e-5)
    # a doubled bolus (or scanner gain) leaves the relative curve unchanged
    c2 = ((35.0 + 2 * (hu - 35.0)).clamp(0, 200) / 100.0 - 1.0) * brain
    torch.testing.assert_close(perfusion_features(c2, sigmas=(1.0,))[:, :15], relative, atol=1e-5, rtol=0)


def test_encoder_heads_are_appended_and_read_back():
    enc = PerfusionEncoder(latent_channels=3, **TINY_ENCODER)
    c = torch.rand(2, 15, 32, 40) * 2 - 1
    c_tilde = enc(c)
    assert c_tilde.shape == (2, 8 + 3 + 1, 8, 10) and enc.out_channels == 12
    z0, logit = enc.heads(c_tilde)
    torch.testing.assert_close(z0, enc.condition_head(c_tilde[:, :8]))
    torch.testing.assert_close(logit, enc.lesion_head(c_tilde[:, :8]))
    with pytest.raises(InputError):
        PerfusionEncoder(**TINY_ENCODER).heads(c_tilde)


def test_condition_loss_terms():
    z0 = torch.zeros(2, 3, 4, 4)
    pred = torch.ones(2, 3, 4, 4)
    lesion = torch.zeros(2, 1, 16, 16)
    lesion[0, 0, :4, :4] = 1  # one latent pixel fully lesion
    logit = torch.zeros(2, 1, 4, 4)
    total, parts = condition_loss(pred, z0, logit, lesion)
    assert parts["condition_latent"] == pytest.approx(1.0)
    assert parts["condition_lesion"] == pytest.approx(1.0)  # squared error 1 per lesion element
    share = 1 / 32
    expected_bce = (math.log(2) * (1 - share) / share * 1 + math.log(2) * 31) / 32
    assert parts["condition_bce"] == pytest.approx(expected_bce, rel=1e-5)
    assert float(total) == pytest.approx(2.0 + expected_bce, rel=1e-5)
    _, empty = condition_loss(pred, z0, logit, torch.zeros_like(lesion))
    assert empty["condition_lesion"] == 0.0 and math.isfinite(empty["condition_bce"])
    # w = 0: the lesion-only term is logged but leaves the total (a calibrated ẑ_0 head)
    calibrated, parts0 = condition_loss(pred, z0, logit, lesion, lesion_weight=0.0)
    assert float(calibrated) == pytest.approx(1.0 + expected_bce, rel=1e-5) and parts0 == parts
    assert float(condition_loss(pred, z0, logit, lesion, lesion_weight=3.0)[0]) == pytest.approx(4.0 + expected_bce,
                                                                                                 rel=1e-5)


def test_min_snr_weights_cap_the_clean_steps():
    alphas = torch.tensor([0.999, 0.9, 5 / 6, 0.5, 0.01])  # SNR 999, 9, 5, 1, 0.0101
    w = min_snr_weights(alphas, gamma=5.0)
    torch.testing.assert_close(w, torch.tensor([5 / 999, 5 / 9, 1.0, 1.0, 1.0]), rtol=1e-5, atol=1e-6)
    eps, eps_hat = torch.zeros(5, 3, 2, 2), torch.ones(5, 3, 2, 2)
    assert float(weighted_latent_loss(eps, eps_hat, torch.ones(5))) == pytest.approx(1.0)
    assert float(weighted_latent_loss(eps, eps_hat, w)) == pytest.approx(float(w.mean()))


def test_lesion_reconstruction_loss():
    x, x_rec = torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4)
    x_rec[:, :, 0, 0] = 3.0
    lesion = torch.zeros(1, 1, 4, 4)
    lesion[:, :, :2, :2] = 1
    assert float(lesion_reconstruction_loss(x, x_rec, lesion)) == pytest.approx(6.0 / 8)
    assert float(lesion_reconstruction_loss(x, x_rec, torch.zeros_like(lesion))) == 0.0


# training with the levers ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ae_dir(plain, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ae"
    return train_autoencoder(plain, out, steps=2, batch_size=4, lr=1e-3, disc_start=10, lesion_weight=2.0,
                             autoencoder_config=TINY_AE, discriminator_config=TINY_D, **COMMON)


def test_autoencoder_lesion_weight_is_recorded_and_checked(ae_dir, plain):
    assert read_config(ae_dir)["training"]["lesion_weight"] == 2.0
    log = (ae_dir / "log.csv").read_text().splitlines()
    assert "lesion_rec_loss" in log[0]
    with pytest.raises(InputError, match="lesion_weight"):  # a resume must keep the setting
        train_autoencoder(plain, ae_dir, steps=3, batch_size=4, lr=1e-3, disc_start=10, resume=True,
                          autoencoder_config=TINY_AE, discriminator_config=TINY_D, **COMMON)
    with pytest.raises(InputError):
        train_autoencoder(plain, ae_dir.parent / "bad", steps=1, lesion_weight=float("nan"), **COMMON)


def test_perfusion_cldm_trains_with_condition_loss_and_samples(plain, ae_dir, tmp_path):
    config = {**TINY_CLDM, "condition_options": TINY_ENCODER}
    out = train_ldm(plain, ae_dir, tmp_path / "ldm", steps=2, batch_size=4, lr=1e-3, cldm_config=config,
                    condition="perfusion", loss_weighting="min-snr", condition_loss_weight=1.0, **COMMON)
    cfg = read_config(out)
    net_cfg = cfg["networks"]["ema"]["config"]
    assert net_cfg["condition_encoder"] == "perfusion"
    assert net_cfg["condition_options"]["latent_channels"] == 3  # heads for the condition loss
    assert cfg["training"]["loss_weighting"] == "min-snr" and cfg["training"]["condition_loss_weight"] == 1.0
    header = (out / "log.csv").read_text().splitlines()[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in (out / "log.csv").read_text().splitlines()[1:]]
    assert all(float(r["condition_bce"]) > 0 for r in rows)
    nets, _ = load_checkpoint(out, names=["ema"])
    assert isinstance(nets["ema"], ConditionalLDM) and nets["ema"].has_condition_head
    model = load_model(out, "cpu")
    cond = torch.as_tensor(plain.cond[:2], dtype=torch.float32)
    images = sample_slices(model, cond, n_steps=2, sampler="dpm++2m")
    assert images.shape == (2, 2, *cond.shape[-2:]) and torch.isfinite(images).all()
    with pytest.raises(InputError, match="perfusion encoder"):
        train_ldm(plain, ae_dir, tmp_path / "bad", steps=1, cldm_config=TINY_CLDM, condition="rescaler",
                  condition_loss_weight=1.0, **COMMON)
    with pytest.raises(InputError):
        train_ldm(plain, ae_dir, tmp_path / "bad2", steps=1, cldm_config=TINY_CLDM, loss_weighting="snr", **COMMON)


def test_paper_condition_stays_the_default(plain, ae_dir, tmp_path):
    out = train_ldm(plain, ae_dir, tmp_path / "paper", steps=1, batch_size=2, cldm_config=TINY_CLDM, **COMMON)
    cfg = read_config(out)
    assert "condition_encoder" not in cfg["networks"]["ema"]["config"]  # the paper's rescaler, as before
    assert "loss_weighting" not in cfg["training"] and "condition_loss_weight" not in cfg["training"]
    assert model_config("demo", "cldm").get("condition_encoder", "rescaler") == "rescaler"


def test_l1_reference_regressor(plain, tmp_path):
    tiny = {"in_channels": 15, "out_channels": 2, "channels": [8, 16, 16, 16, 16], "num_res_units": 0,
            "norm": "instance", "dropout": 0.0}
    out = train_pix2pix(plain, tmp_path / "ref", steps=2, batch_size=2, adversarial=False, lesion_oversample=4.0,
                        generator_config=tiny, **COMMON)
    cfg = read_config(out)
    assert cfg["training"]["adversarial"] is False and cfg["training"]["lesion_oversample"] == 4.0
    assert model_label(cfg) == "U-Net (L1)"
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["d_loss"] == "" and float(r["l1_loss"]) > 0 for r in rows)  # no discriminator
    images = sample_slices(load_model(out, "cpu"), torch.as_tensor(plain.cond[:1], dtype=torch.float32))
    assert images.shape[1] == 2 and np.isfinite(images.numpy()).all()


def test_z0_residual_model_starts_from_the_encoder_estimate():
    from ctp2mri.diffusion import NoiseSchedule, ddim_sample, dpm_solver_sample

    config = {**TINY_CLDM, "condition_encoder": "perfusion", "parameterization": "z0-residual",
              "condition_options": {**TINY_ENCODER, "latent_channels": 3}}
    torch.manual_seed(0)
    model = ConditionalLDM(**config).eval()
    schedule = NoiseSchedule()
    c = torch.rand(2, 15, 32, 32) * 2 - 1
    with torch.no_grad():
        c_tilde = model.encode_condition(c)
        estimate = model.encoder.heads(c_tilde)[0]

        def eps(z, t, ct):
            return model.predict_noise(z, t, ct, schedule.alphas_cumprod[t])

        # the output convolution starts at zero: every step's ẑ0 is the encoder's estimate
        for sample in (ddim_sample(eps, (2, 3, 8, 8), c_tilde, schedule, 10, 0.0),
                       dpm_solver_sample(eps, (2, 3, 8, 8), c_tilde, schedule, 10)):
            torch.testing.assert_close(sample, estimate, atol=1e-4, rtol=0)
        with pytest.raises(InputError, match="alphas_cumprod"):
            model.predict_noise(torch.zeros(2, 3, 8, 8), torch.tensor([5, 5]), c_tilde)
    with pytest.raises(InputError, match="heads"):
        ConditionalLDM(**{**TINY_CLDM, "parameterization": "z0-residual"})


def test_z0_residual_training_records_and_samples(plain, ae_dir, tmp_path):
    config = {**TINY_CLDM, "condition_options": TINY_ENCODER}
    out = train_ldm(plain, ae_dir, tmp_path / "resid", steps=2, batch_size=4, lr=1e-3, cldm_config=config,
                    condition="perfusion", parameterization="z0-residual", **COMMON)
    cfg = read_config(out)
    assert cfg["networks"]["ema"]["config"]["parameterization"] == "z0-residual"
    assert cfg["training"]["parameterization"] == "z0-residual"
    assert cfg["networks"]["ema"]["config"]["condition_options"]["latent_channels"] == 3
    images = sample_slices(load_model(out, "cpu"), torch.as_tensor(plain.cond[:1], dtype=torch.float32), n_steps=3)
    assert torch.isfinite(images).all()


def test_lesion_latent_loss_is_eq7_in_latent_space(plain, ae_dir, tmp_path):
    from ctp2mri.losses import lesion_latent_loss

    z0, z0_hat = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    z0_hat[0, :, 0, 0] = 2.0
    lesion = torch.zeros(2, 1, 16, 16)
    lesion[0, 0, :2, :4] = 1  # half of latent pixel (0, 0)
    # Σ m (z0 − ẑ0)² / (Σ m · C) = 0.5 · 3 · 4 / (0.5 · 3)
    assert float(lesion_latent_loss(z0, z0_hat, lesion)) == pytest.approx(4.0)
    assert float(lesion_latent_loss(z0, z0_hat, torch.zeros_like(lesion))) == 0.0
    config = {**TINY_CLDM, "condition_options": TINY_ENCODER}
    out = train_ldm(plain, ae_dir, tmp_path / "les", steps=2, batch_size=4, lr=1e-3, cldm_config=config,
                    condition="perfusion", parameterization="z0-residual", lesion_latent_weight=1.0, **COMMON)
    assert read_config(out)["training"]["lesion_latent_weight"] == 1.0
    with open(out / "log.csv") as f:
        assert all(r["lesion_latent_loss"] != "" for r in csv.DictReader(f))


def test_post_training_keeps_the_base_objective_and_parameterization(plain, ae_dir, tmp_path):
    from ctp2mri.training import post_train

    config = {**TINY_CLDM, "condition_options": TINY_ENCODER}
    base = train_ldm(plain, ae_dir, tmp_path / "base", steps=2, batch_size=4, lr=1e-3, cldm_config=config,
                     condition="perfusion", loss_weighting="min-snr", parameterization="z0-residual", **COMMON)
    out = post_train(plain, base, tmp_path / "pt", steps=2, batch_size=4, lr=1e-3, **COMMON)
    training = read_config(out)["training"]
    assert training["parameterization"] == "z0-residual"
    assert training["loss_weighting"] == "min-snr" and training["snr_gamma"] == 5.0
    assert read_config(out)["networks"]["ema"]["config"]["parameterization"] == "z0-residual"
    images = sample_slices(load_model(out, "cpu"), torch.as_tensor(plain.cond[:1], dtype=torch.float32), n_steps=2)
    assert torch.isfinite(images).all()


def test_post_training_keeps_the_bases_lesion_terms_unless_told_eq4(plain, ae_dir, tmp_path):
    from ctp2mri.training import post_train

    config = {**TINY_CLDM, "condition_options": TINY_ENCODER}
    base = train_ldm(plain, ae_dir, tmp_path / "base", steps=3, batch_size=4, lr=1e-3, cldm_config=config,
                     condition="perfusion", condition_loss_weight=1.0, lesion_latent_weight=1.0,
                     parameterization="z0-residual", **COMMON)

    def logged(run):
        with open(run / "log.csv") as f:
            return list(csv.DictReader(f))

    kept = post_train(plain, base, tmp_path / "kept", steps=2, batch_size=4, lr=1e-3, **COMMON)
    training = read_config(kept)["training"]
    assert training["latent_objective"] == "base"
    assert training["condition_loss_weight"] == 1.0 and training["lesion_latent_weight"] == 1.0
    rows = logged(kept)
    assert len(rows) == 2 and all(float(r["condition_loss"]) > 0 for r in rows)
    assert all(r["lesion_latent_loss"] not in ("", "nan") for r in rows)
    # the latent part of Eq. 8 now holds the condition loss: larger than the ε-loss alone
    assert all(float(r["latent_loss"]) > float(r["condition_loss"]) for r in rows)

    plain_eq4 = post_train(plain, base, tmp_path / "eq4", steps=2, batch_size=4, lr=1e-3,
                           latent_objective="eq4", **COMMON)
    training = read_config(plain_eq4)["training"]
    assert training["latent_objective"] == "eq4"
    assert "condition_loss_weight" not in training and "lesion_latent_weight" not in training
    assert all(r["condition_loss"] in ("", "nan") for r in logged(plain_eq4))
    with pytest.raises(InputError, match="latent objective"):
        post_train(plain, base, tmp_path / "bad", steps=1, latent_objective="latent", **COMMON)


def test_a_calibrated_condition_loss_is_trained_recorded_and_kept_by_post_training(plain, ae_dir, tmp_path):
    """condition_lesion_weight 0: the logged condition loss is the plain regression plus the BCE
    (its lesion-only term logged, not added), and post-training's "base" objective keeps it."""
    from ctp2mri.training import post_train

    config = {**TINY_CLDM, "condition_options": TINY_ENCODER}
    base = train_ldm(plain, ae_dir, tmp_path / "base", steps=2, batch_size=4, lr=1e-3, cldm_config=config,
                     condition="perfusion", condition_loss_weight=1.0, condition_lesion_weight=0.0,
                     parameterization="z0-residual", lesion_oversample=4.0, **COMMON)
    assert read_config(base)["training"]["condition_lesion_weight"] == 0.0
    with open(base / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(float(r["condition_lesion"]) > 0 for r in rows)
    for r in rows:
        assert float(r["condition_loss"]) == pytest.approx(float(r["condition_latent"]) + float(r["condition_bce"]),
                                                           rel=1e-5)
    kept = post_train(plain, base, tmp_path / "kept", steps=1, batch_size=4, lr=1e-3, **COMMON)
    assert read_config(kept)["training"]["condition_lesion_weight"] == 0.0


def test_post_training_continues_the_bases_ema(plain, ae_dir, tmp_path):
    """The EMA's update count carries over: its first post-training update keeps d of the base's
    average (d = min(decay, (1 + n)/(10 + n)) with n the base's steps + 1), not 10 %."""
    from ctp2mri.training import post_train

    base = train_ldm(plain, ae_dir, tmp_path / "base", steps=4, batch_size=4, lr=1e-3, cldm_config=TINY_CLDM,
                     **COMMON)
    out = post_train(plain, base, tmp_path / "pt", steps=1, batch_size=4, lr=1e-2, ema_decay=0.999,
                     lambda_lesion=0.0, **COMMON)
    state = json.loads((out / "training_state.json").read_text())
    assert state["ema"]["num_updates"] == 4 + 1
    nets, _ = load_checkpoint(base, names=["model", "ema"], kind="cldm")
    new, _ = load_checkpoint(out, names=["model", "ema"], kind="cldm")
    d = min(0.999, (1 + 5) / (10 + 5))
    for name, p_ema in new["ema"].named_parameters():
        expected = d * dict(nets["ema"].named_parameters())[name] + (1 - d) * dict(new["model"].named_parameters())[name]
        torch.testing.assert_close(p_ema, expected, rtol=1e-5, atol=1e-6)

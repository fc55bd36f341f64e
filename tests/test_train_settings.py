"""TrainSettings and PostTrainSettings: checked when made, options by name, one training record."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ctp2mri.checks import settings_with
from ctp2mri.errors import InputError
from ctp2mri.settings import EMA_DECAY, LDM_BASE_LR, SNR_GAMMA, WEIGHT_DECAY
from ctp2mri.training import PostTrainSettings, TrainSettings, train_bbdm, train_ldm
from ctp2mri.training.distributed import DistInfo
from ctp2mri.training.run_settings import RunSettings

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("steps", 0, "steps must be a whole number"),
    ("batch_size", 2.5, "batch size must be a whole number"),
    ("grad_accum", 0, "gradient accumulation must be a whole number"),
    ("seed", -1, "seed must be a whole number"),
    ("num_workers", -1, "num_workers must be a whole number"),
    ("checkpoint_every", 0, "checkpoint interval"),
    ("log_every", 0, "log interval"),
    ("lr", -1e-3, "learning rate must be a finite number"),
    ("lr", math.nan, "learning rate must be a finite number"),
    ("base_lr", 0.0, "base learning rate must be a finite number"),
    ("ema_decay", 1.5, "EMA decay must be a finite number"),
    ("weight_decay", math.inf, "weight decay must be a finite number"),
    ("grad_clip", 0.0, "gradient clipping norm"),
    ("precision", "fp64", "unknown precision 'fp64'"),
    ("lesion_oversample", 0, "--lesion-oversample must be a positive factor"),
    ("scale_factor", "big", "positive number or 'auto'"),
    ("scale_factor", -1.0, "positive number or 'auto'"),
    ("condition", "film", "unknown condition encoder 'film'"),
    ("loss_weighting", "snr", "unknown loss weighting 'snr'"),
    ("snr_gamma", 0.0, "the min-SNR γ must be positive"),
    ("snr_gamma", math.nan, "the min-SNR γ must be a finite number"),
    ("condition_loss_weight", -0.1, "the condition loss weight must be ≥ 0"),
    ("lesion_latent_weight", "heavy", "the lesion latent weight must be a number"),
    ("condition_lesion_weight", -1.0, "the condition loss's lesion weight must be ≥ 0"),
    ("condition_lesion_weight", 0.0, "weighs a term of the condition loss, which is off"),
    ("parameterization", "v", "unknown parameterization 'v'"),
])
def test_train_settings_refuse_a_bad_value_naming_it(field, value, message):
    with pytest.raises(InputError, match=message):
        TrainSettings(**{field: value})


def test_train_settings_default_to_the_paper_and_normalise_what_they_keep():
    paper = TrainSettings()
    assert (paper.base_lr, paper.weight_decay, paper.ema_decay, paper.snr_gamma) == (LDM_BASE_LR, WEIGHT_DECAY,
                                                                                     EMA_DECAY, SNR_GAMMA)
    assert paper.objective() == {"parameterization": "eps", "loss": "l2 (Eq. 4)"} and paper.cldm_only() == []
    s = TrainSettings(steps=3.0, grad_accum=2.0, lr=1, precision="FP32", scale_factor=" Auto ", lesion_oversample="4")
    assert (s.steps, s.grad_accum, s.lr, s.precision, s.scale_factor, s.lesion_oversample) == (3, 2, 1.0, "fp32",
                                                                                                "auto", 4.0)
    assert type(s.steps) is int and type(s.lr) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = 4  # type: ignore[misc]


def test_the_objective_records_only_what_differs_from_the_paper():
    s = TrainSettings(loss_weighting="min-snr", snr_gamma=4, condition="perfusion", condition_loss_weight=0.1,
                      lesion_latent_weight=0.5)
    assert s.objective() == {"parameterization": "eps", "loss": "l2 (Eq. 4)", "loss_weighting": "min-snr",
                             "snr_gamma": 4.0, "condition_loss_weight": 0.1, "lesion_latent_weight": 0.5}
    assert "snr_gamma" not in TrainSettings(snr_gamma=4).objective()  # γ only matters with min-SNR weighting
    assert s.cldm_only() == ["--condition", "--loss-weighting", "--condition-loss", "--lesion-latent-weight"]
    assert TrainSettings(condition="rescaler").cldm_only() == []  # the paper's F, which the cBBDM has too
    # the condition loss's lesion weight: recorded only with the condition loss on and off its default 1
    calibrated = TrainSettings(condition="perfusion", condition_loss_weight=1.0, condition_lesion_weight=0.0)
    assert calibrated.objective()["condition_lesion_weight"] == 0.0
    assert calibrated.cldm_only() == ["--condition", "--condition-loss", "--condition-lesion-weight"]
    assert "condition_lesion_weight" not in TrainSettings(condition_loss_weight=1.0).objective()


def test_options_replace_settings_fields_by_name():
    base = TrainSettings(steps=10, lr=1e-3)
    given = settings_with(TrainSettings, base, {"steps": 20}, "train_ldm")
    assert (given.steps, given.lr) == (20, 1e-3) and base.steps == 10
    assert settings_with(TrainSettings, None, {}, "train_ldm") == TrainSettings()
    with pytest.raises(TypeError, match="train_ldm\\(\\) got unexpected keyword arguments: stepz"):
        settings_with(TrainSettings, base, {"stepz": 3}, "train_ldm")
    with pytest.raises(TypeError, match="takes a TrainSettings, got a PostTrainSettings"):
        settings_with(TrainSettings, PostTrainSettings(), {}, "train_ldm")
    with pytest.raises(InputError, match="steps"):  # the replaced value is checked too
        settings_with(TrainSettings, base, {"steps": -1}, "train_ldm")


def test_latent_runs_and_post_training_record_the_same_optimisation():
    assert issubclass(TrainSettings, RunSettings) and issubclass(PostTrainSettings, RunSettings)
    shared = {f.name for f in dataclasses.fields(RunSettings)}
    train = TrainSettings(steps=5, lr=1e-4, grad_clip=1.0, num_workers=0)
    post = PostTrainSettings(steps=5, lr=1e-4, grad_clip=1.0, num_workers=0)
    assert {k: getattr(train, k) for k in shared} == {k: getattr(post, k) for k in shared}
    record = train.record("demo", "fp32", CPU)
    assert record == post.record("demo", "fp32", CPU)
    assert record["lr"] == 1e-4 and record["device"] == "cpu" and record["world_size"] == 1
    assert TrainSettings(batch_size=48).record("paper", "bf16", CPU)["lr"] == pytest.approx(9.6e-5)  # scale_lr


def test_the_cbbdm_refuses_cldm_only_settings_before_loading_anything(tmp_path):
    with pytest.raises(InputError, match="--scale-factor, --parameterization apply to the cLDM only"):
        train_bbdm(tmp_path / "data", tmp_path / "ae", tmp_path / "out", TrainSettings(scale_factor=2.0),
                   parameterization="z0-residual", device="cpu")
    with pytest.raises(TypeError, match="train_bbdm\\(\\) got unexpected keyword arguments: cldm_config"):
        train_bbdm(tmp_path / "data", tmp_path / "ae", tmp_path / "out", cldm_config={}, device="cpu")
    with pytest.raises(InputError, match="unknown loss weighting"):  # checked before anything is loaded
        train_ldm(tmp_path / "data", tmp_path / "ae", tmp_path / "out", loss_weighting="snr", device="cpu")
    assert not (tmp_path / "out").exists()

"""What a latent-model training run is asked to do, as settings objects checked when made.

`RunSettings` is the optimisation every latent-model run shares (steps, batch, learning rate,
accumulation, AdamW, EMA, clipping, lesion over-sampling, precision, seed, data loading, cadence)
and writes that part of the checkpoint's ``training`` record, which a resume compares with the
run's own. `TrainSettings` adds the base objective of `ctp2mri.training.train_ldm` and
`ctp2mri.training.train_bbdm`; `ctp2mri.training.post_train.PostTrainSettings` adds Eq. 8's.
The CLI, the widgets and the recipes build one; a trainer's keyword options replace its fields
(`ctp2mri.checks.settings_with`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ctp2mri.checks import number
from ctp2mri.errors import InputError
from ctp2mri.models.cldm import PARAMETERIZATIONS
from ctp2mri.models.conditioning import CONDITION_ENCODERS
from ctp2mri.settings import EMA_DECAY, LDM_BASE_LR, PRECISIONS, SNR_GAMMA, WEIGHT_DECAY
from ctp2mri.training.distributed import DistInfo
from ctp2mri.training.loop import check_run_numbers, effective_lr
from ctp2mri.training.sampling import check_lesion_oversample

__all__ = ["CLDM_ONLY", "LOSS_WEIGHTINGS", "RunSettings", "TrainSettings"]

LOSS_WEIGHTINGS = ("uniform", "min-snr")
#: `TrainSettings` fields that only the cLDM uses, with their command-line flags.
CLDM_ONLY = {"scale_factor": "--scale-factor", "condition": "--condition", "loss_weighting": "--loss-weighting",
             "condition_loss_weight": "--condition-loss", "parameterization": "--parameterization",
             "lesion_latent_weight": "--lesion-latent-weight", "condition_lesion_weight": "--condition-lesion-weight"}

@dataclass(frozen=True)
class RunSettings:
    """The optimisation of a latent-model run; the fields are described in `TrainSettings`."""

    steps: int = 1000
    batch_size: int = 16
    lr: float | None = None
    base_lr: float = LDM_BASE_LR
    scale_lr: bool = True
    grad_accum: int = 1
    weight_decay: float = WEIGHT_DECAY
    ema_decay: float = EMA_DECAY
    grad_clip: float | None = None
    lesion_oversample: float | None = None
    precision: str = "fp32"
    seed: int = 0
    num_workers: int = 1
    checkpoint_every: int = 500
    log_every: int = 10

    def __post_init__(self) -> None:
        check_run_numbers(steps=self.steps, batch_size=self.batch_size, seed=self.seed, num_workers=self.num_workers,
                          checkpoint_every=self.checkpoint_every, log_every=self.log_every, lr=self.lr,
                          grad_accum=self.grad_accum, ema_decay=self.ema_decay, weight_decay=self.weight_decay,
                          grad_clip=self.grad_clip)
        precision = str(self.precision).lower()
        if precision not in ("auto", *PRECISIONS):
            raise InputError(f"unknown precision {self.precision!r}; choose one of auto, {', '.join(PRECISIONS)}")
        self._normalise(steps=int(self.steps), batch_size=int(self.batch_size),
                        lr=None if self.lr is None else float(self.lr),
                        base_lr=number(self.base_lr, "base learning rate", above=0.0),
                        scale_lr=bool(self.scale_lr), grad_accum=int(self.grad_accum),
                        weight_decay=float(self.weight_decay), ema_decay=float(self.ema_decay),
                        lesion_oversample=check_lesion_oversample(self.lesion_oversample), precision=precision,
                        seed=int(self.seed), num_workers=int(self.num_workers),
                        checkpoint_every=int(self.checkpoint_every), log_every=int(self.log_every))

    def _normalise(self, **values: Any) -> None:
        """Store the checked values (ints as ints, numbers as floats): a frozen dataclass's own
        ``__post_init__`` is the one place that may."""
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def learning_rate(self, world_size: int) -> float:
        """The learning rate used: ``lr``, or ``base_lr`` scaled as CompVis (`loop.effective_lr`)."""
        return effective_lr(self.base_lr, self.batch_size, world_size, self.grad_accum, self.scale_lr, self.lr)

    def record(self, profile: str, precision: str, info: DistInfo) -> dict[str, Any]:
        """The optimisation as a checkpoint's ``training`` records it (the trainer adds the rest):
        ``precision`` as resolved for the device, the learning rate as used."""
        return {
            "profile": profile, "steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
            "world_size": info.world_size, "base_lr": self.base_lr, "scale_lr": self.scale_lr,
            "lr": self.learning_rate(info.world_size), "optimizer": "AdamW", "weight_decay": self.weight_decay,
            "ema_decay": self.ema_decay, "ema_warmup": True, "grad_clip": self.grad_clip, "precision": precision,
            "seed": self.seed, "num_workers": self.num_workers, "device": str(info.device),
            "checkpoint_every": self.checkpoint_every, "log_every": self.log_every,
        }


@dataclass(frozen=True)
class TrainSettings(RunSettings):
    """What a cLDM (or cBBDM) training run is asked to do. Checked when made; the checkpoint's
    config records it under ``training`` (the objective's options only where they differ from
    the paper's, so that runs saved before an option existed resume unchanged).

    Parameters
    ----------
    steps
        Total optimiser steps of the run (a resumed run continues to this count).
    batch_size, grad_accum
        Slices per forward and process; forwards accumulated per optimiser step.
    lr, base_lr, scale_lr
        Learning rate ``lr``; when None, ``grad_accum × processes × batch_size × base_lr``
        (CompVis ``scale_lr``), or ``base_lr`` alone with ``scale_lr=False``. The paper's
        2·10⁻⁶ is tuned for hundreds of thousands of GPU steps; a short CPU demo run needs a
        larger ``lr`` (e.g. 1e-4 … 2e-4).
    weight_decay
        AdamW weight decay (torch's default 0.01, which CompVis uses).
    ema_decay
        Decay of the weight EMA (0.9999 upstream; lower it for short runs).
    grad_clip
        Clip the gradient norm to this (off by default, as upstream).
    lesion_oversample
        Draw slices with lesion this many times as often as the others
        (`ctp2mri.training.sampling`); None (default) draws uniformly, as the paper. The
        objective stays Eq. 4.
    precision
        ``fp32``, or ``bf16``/``fp16`` autocast on CUDA; ``auto``: bf16 on CUDA, else fp32.
    seed
        Seed of initialisation, data order, augmentation, timesteps and noise.
    num_workers
        DataLoader worker processes per training process.
    checkpoint_every, log_every
        Steps between checkpoints (and at the end) and between log.csv appends.
    scale_factor
        Latent scale (`ConditionalLDM`): a number, ``"auto"`` for 1 / std of the training
        latents (`ctp2mri.training.latent_run.latent_scale_factor`), or None for the network
        config's (1.0 in the profiles, the official VQ-f4 setting).
    condition
        Condition encoder: ``"rescaler"`` (the paper's F), ``"perfusion"`` (the learned
        full-resolution `ctp2mri.models.conditioning.PerfusionEncoder`, with a z_0 head when
        ``condition_loss_weight > 0``), or None for the network config's.
    loss_weighting, snr_gamma
        ``"uniform"``: Eq. 4 as the paper; ``"min-snr"``: each sample's ε-loss weighted by
        min(SNR_t, γ) / SNR_t (`ctp2mri.losses.min_snr_weights`).
    condition_loss_weight
        Weight of the auxiliary condition loss (`ctp2mri.losses.condition_loss`: the encoder's
        ẑ_0 and lesion heads against z_0 and the lesion mask; needs the perfusion encoder, which
        then gets the heads); 0: off, as the paper.
    parameterization
        ``"eps"`` (the paper) or ``"z0-residual"``: the UNet refines the perfusion encoder's own
        estimate of z_0 (`ctp2mri.models.ConditionalLDM`); the loss stays the ε-loss (Eq. 4,
        optionally min-SNR weighted), computed from the ε̂ that estimate implies.
    condition_lesion_weight
        Weight, inside the condition loss, of its lesion-only regression term (1: as before the
        option; 0: the encoder's ẑ_0 stays a calibrated estimate, see
        `ctp2mri.losses.condition_loss`). Recorded when the condition loss is on and this is not 1.
    lesion_latent_weight
        Weight of `ctp2mri.losses.lesion_latent_loss`, ‖M ⊙ (z_0 − ẑ_0)‖² with ẑ_0 from Eq. 5,
        added to the base objective (0: off, as the paper, which uses the lesion only in
        post-training).

    The last seven shape the cLDM only (`CLDM_ONLY`); the cBBDM refuses them.
    """

    scale_factor: float | str | None = None
    condition: str | None = None
    loss_weighting: str = "uniform"
    snr_gamma: float = SNR_GAMMA
    condition_loss_weight: float = 0.0
    parameterization: str = "eps"
    lesion_latent_weight: float = 0.0
    condition_lesion_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.parameterization not in PARAMETERIZATIONS:
            raise InputError(f"unknown parameterization {self.parameterization!r}; choose one of "
                             f"{', '.join(PARAMETERIZATIONS)}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise InputError(f"unknown loss weighting {self.loss_weighting!r}; choose one of "
                             f"{', '.join(LOSS_WEIGHTINGS)}")
        if self.condition is not None and self.condition not in CONDITION_ENCODERS:
            raise InputError(f"unknown condition encoder {self.condition!r}; choose one of "
                             f"{', '.join(CONDITION_ENCODERS)}")
        gamma = _finite(self.snr_gamma, "the min-SNR γ")
        if gamma <= 0:
            raise InputError(f"the min-SNR γ must be positive, got {self.snr_gamma!r}")
        weights: dict[str, float] = {}
        for name, what in (("condition_loss_weight", "the condition loss weight"),
                           ("lesion_latent_weight", "the lesion latent weight"),
                           ("condition_lesion_weight", "the condition loss's lesion weight")):
            weights[name] = _finite(getattr(self, name), what)
            if weights[name] < 0:
                raise InputError(f"{what} must be ≥ 0, got {getattr(self, name)!r}")
        if weights["condition_lesion_weight"] != 1.0 and weights["condition_loss_weight"] == 0:
            raise InputError("--condition-lesion-weight weighs a term of the condition loss, which is off; "
                             "give --condition-loss W (with --condition perfusion) or leave it at 1")
        self._normalise(snr_gamma=gamma, scale_factor=_scale_setting(self.scale_factor), **weights)

    def objective(self) -> dict[str, Any]:
        """The cLDM's base objective as its checkpoint's ``training`` records it (what
        `ctp2mri.training.ldm.objective_terms` computes, and post-training keeps)."""
        objective: dict[str, Any] = {"parameterization": self.parameterization, "loss": "l2 (Eq. 4)"}
        if self.loss_weighting != "uniform":
            objective.update(loss_weighting=self.loss_weighting, snr_gamma=self.snr_gamma)
        if self.condition_loss_weight > 0:
            objective["condition_loss_weight"] = self.condition_loss_weight
            if self.condition_lesion_weight != 1.0:
                objective["condition_lesion_weight"] = self.condition_lesion_weight
        if self.lesion_latent_weight > 0:
            objective["lesion_latent_weight"] = self.lesion_latent_weight
        return objective

    def cldm_only(self) -> list[str]:
        """The command-line flags of the cLDM-only fields set to anything but the paper's model
        (None, the default, or ``condition="rescaler"``: the paper's F, which the cBBDM has too)."""
        paper = {"condition": "rescaler", "loss_weighting": "uniform", "condition_loss_weight": 0.0,
                 "parameterization": "eps", "lesion_latent_weight": 0.0, "condition_lesion_weight": 1.0}
        return [flag for name, flag in CLDM_ONLY.items()
                if getattr(self, name) is not None and getattr(self, name) != paper.get(name)]


def _finite(value: Any, what: str) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(result):
        raise InputError(f"{what} must be a finite number, got {value!r}")
    return result


def _scale_setting(value: float | str | None) -> float | str | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise InputError(f"the latent scale factor must be a positive number or 'auto', got {value!r}") from None
    if not 0 < scale < float("inf"):
        raise InputError(f"the latent scale factor must be a positive number or 'auto', got {value!r}")
    return scale

"""Lesion-aware post-training of a conditional LDM (paper §2.2, Eq. 5–8).

Starting from a trained cLDM checkpoint (networks ``model``, ``ema``, ``autoencoder``; its
normalisation and noise schedule), each step is the LDM step of `ctp2mri.training.ldm` plus
two image-space terms:

    z_0 = E(x),  z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε                 (Eq. 2)
    ε̂ = ε_θ(z_t, t, F(c))
    ẑ_0 = (z_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t                         (Eq. 5, `NoiseSchedule.predict_z0`)
    x̂ = D(ẑ_0)                                                 frozen decoder, gradients pass through
    L = ‖ε − ε̂‖² + λ_image ‖x − x̂‖²_brain + λ_lesion ‖M ⊙ (x − x̂)‖²   (Eq. 4, 6, 7, 8)

The decoder's weights are frozen (``requires_grad_(False)``, eval mode, not in the
optimiser), but x̂ stays on the autograd graph, so the image terms reach the UNet and the
spatial rescaler through D and the straight-through quantiser. ``target="input"`` compares
x̂ with x (the paper); ``target="reconstruction"`` with D(z_0) (the official code; one more
decode per step, without gradient). The optimisation loop, EMA, checkpoints, log, resume
and cancel are those of `train_ldm` (`ctp2mri.training.latent_run.optimise`).

A cBBDM checkpoint (``kind: "cbbdm"``, `ctp2mri.training.bbdm`) is post-trained the same way
(paper Table 3): its own bridge objective replaces Eq. 4 and its one-step estimate
x̂_0 = x_t − ô replaces Eq. 5 (`ctp2mri.training.bbdm.bridge_post_training_loss`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ctp2mri.bundled import resolve_model
from ctp2mri.case_slices import normalisation_of
from ctp2mri.checkpoints import load_checkpoint, read_config
from ctp2mri.checks import settings_with
from ctp2mri.diffusion import BrownianBridge, NoiseSchedule
from ctp2mri.errors import InputError
from ctp2mri.io.volume import Volume
from ctp2mri.models.case_context import add_case_context
from ctp2mri.progress import CancelToken, ProgressCallback
from ctp2mri.settings import LAMBDA_IMAGE, LAMBDA_LESION
from ctp2mri.training import loop
from ctp2mri.training.batches import BatchStream, data_identity, load_dataset
from ctp2mri.training.bbdm import bridge_post_training_loss
from ctp2mri.training.case_context import case_contexts, with_context
from ctp2mri.training.distributed import barrier, init_distributed, shutdown
from ctp2mri.training.ema import EMA
from ctp2mri.training.image_terms import TARGETS, add_image_terms, core_for, core_threshold, image_space_terms
from ctp2mri.training.latent_run import optimise, restore_run
from ctp2mri.training.ldm import diffuse, objective_terms
from ctp2mri.training.rng import noise_generator, rng_snapshot, seed_everything
from ctp2mri.training.run_settings import RunSettings
from ctp2mri.training.sampling import lesion_sampling

__all__ = ["LATENT_OBJECTIVES", "POST_TRAIN_LOG_COLUMNS", "TARGETS", "PostTrainSettings", "post_train",
           "post_training_loss"]

INITS = ("model", "ema")
LATENT_OBJECTIVES = ("base", "eq4")  # L_latent of Eq. 8: the base's whole objective, or the ε-loss alone
# the base's extra latent terms that "base" keeps (ctp2mri.training.run_settings.TrainSettings.objective)
OBJECTIVE_TERMS = ("condition_loss_weight", "condition_lesion_weight", "lesion_latent_weight")
POST_TRAINABLE = ("cldm", "cbbdm")  # checkpoint kinds post_train continues
POST_TRAIN_LOG_COLUMNS = ("step", "epoch", "loss", "latent_loss", "image_loss", "lesion_loss", "core_loss",
                          "lesion_latent_loss", "condition_loss", "lesion_voxels", "lesion_slices", "lr", "seconds")
EQ8 = "Eq. 8: Eq. 4 + λ_image Eq. 6 + λ_lesion Eq. 7"
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PostTrainSettings(RunSettings):
    """What a post-training run is asked to do: Eq. 8's λs, target and latent objective, the
    starting weights and the optimisation. The CLI, the widget's child process and the recipes
    build one; the checkpoint's config records it (``training``). Checked when made.

    Fields are the keyword arguments of `post_train` of the same names.
    """

    lambda_image: float = LAMBDA_IMAGE
    lambda_lesion: float = LAMBDA_LESION
    lambda_core: float = 0.0
    target: str = "input"
    latent_objective: str = "base"
    init: str = "model"
    gradient_checkpointing: bool = False
    case_context: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target not in TARGETS:
            raise InputError(f"unknown post-training target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.init not in INITS:
            raise InputError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        if self.latent_objective not in LATENT_OBJECTIVES:
            raise InputError(f"unknown latent objective {self.latent_objective!r}; choose one of "
                             f"{', '.join(LATENT_OBJECTIVES)}")
        for name, value in (("lambda-image", self.lambda_image), ("lambda-lesion", self.lambda_lesion),
                            ("lambda-core", self.lambda_core)):
            if not (np.isfinite(float(value)) and float(value) >= 0):
                raise InputError(f"--{name} must be a finite number ≥ 0, got {value}")
        self._normalise(lambda_image=float(self.lambda_image), lambda_lesion=float(self.lambda_lesion),
                        lambda_core=float(self.lambda_core),
                        gradient_checkpointing=bool(self.gradient_checkpointing), case_context=bool(self.case_context))


def post_train(
    data: Any,
    base: str | os.PathLike,
    out: str | os.PathLike,
    settings: PostTrainSettings | None = None,
    *,
    device: str = "auto",
    resume: bool = False,
    lesions: Mapping[str, Volume | np.ndarray] | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    **options: Any,
) -> Path:
    """Post-train a cLDM (or cBBDM) checkpoint with the lesion-aware image-space objectives (Eq. 8).

    Parameters
    ----------
    data
        Data folder with ``splits.json`` (its ``train`` split) or a `SliceDataset` on the base
        model's profile. With ``lambda_lesion`` or ``lambda_core`` > 0 every case needs a lesion
        mask (its ``lesion.nii.gz`` or one in ``lesions``).
    base
        Checkpoint folder of a trained cLDM (``ctp2mri train-ldm``, or an earlier post-training),
        or of a cBBDM (``ctp2mri train-ldm --model-type cbbdm``): the result has the base's
        kind, and a cBBDM keeps its bridge objective (and loss type) as the latent term. A
        bundled model's name (``demo-base``) works too (`ctp2mri.bundled.resolve_model`).
    settings, options
        A `PostTrainSettings`, and/or its fields as keywords (which replace the settings' own);
        the fields are described below.
    out
        Run folder: new or empty, or (``resume``) a post-training run saved before. It ends up a
        cLDM checkpoint like the base's (``model``, ``ema``, ``autoencoder``; the base's
        normalisation and schedule) whose config also records the base, λs, target and
        sampling under ``post_training``; plus log.csv.
    lambda_image, lambda_lesion
        λ_image and λ_lesion of Eq. 8 (paper's best: 0.01, 0.02). 0 and 0 is plain Eq. 4
        training continued from the base (no decode at all).
    lambda_core
        λ_core of the core term (`ctp2mri.losses.core_loss`, not in the paper; 0: off, the
        paper's objective): a soft Dice between the lesion mask and the voxels the estimate's
        ADC draws under 620 × 10⁻⁶ mm²/s. It holds the core Eq. 7 over-draws (REPORT.md §D9);
        needs a base trained on the fixed ADC window.
    target
        ``"input"``: x (paper Eq. 6–7); ``"reconstruction"``: D(z_0) (official code).
    steps, batch_size, grad_accum, lr, base_lr, scale_lr, weight_decay, ema_decay, grad_clip
        As `ctp2mri.training.TrainSettings`'s (``steps`` counts post-training steps only).
    lesion_oversample
        Draw slices containing lesion this many times as often as the others
        (``WeightedRandomSampler``); the resulting expected share of lesion slices is logged,
        and recorded in the config. None: uniform, as the paper.
    gradient_checkpointing
        Recompute the decoder's activations in the backward pass instead of storing them
        (less memory, one more decoder forward per step).
    case_context
        Give the network the case context (`ctp2mri.models.case_context`, not in the paper):
        the lesion burden of the whole case, read by a frozen copy of the base's perfusion
        encoder, as one more input channel, so that slices that do not show a large lesion can
        still draw their case's intensity level. Needs a cLDM with the perfusion encoder's heads;
        a base that takes the context already keeps it either way.
    init
        Start the trained weights from the base's ``"model"`` (as the official code's
        ``ckpt_path``) or its ``"ema"`` weights; the new EMA starts from the base's EMA. A
        base without ``"model"`` weights (a bundled, inference-only checkpoint) starts from
        its EMA weights.
    latent_objective
        L_latent of Eq. 8. ``"base"``: the base's whole training objective (its min-SNR
        weights, lesion latent term and condition loss; for a base trained as the paper, Eq. 4
        alone); ``"eq4"``: the ε-loss alone (min-SNR weighted if the base was), dropping the
        base's lesion terms.
    precision, seed, num_workers, checkpoint_every, log_every
        As `ctp2mri.training.TrainSettings`'s.
    device, resume
        As `ctp2mri.training.train_ldm`'s.
    lesions
        Lesion masks replacing the cases' own, by case name (e.g. painted in napari); only
        with a data folder (a `SliceDataset` brings its masks along).
    progress, cancel
        ``progress(step, steps, {"loss", "latent_loss", "image_loss", "lesion_loss", …})``
        after each step; a cancel saves a resumable checkpoint, then raises `Cancelled`.

    Returns
    -------
    Path of the run folder / checkpoint.
    """
    opts = settings_with(PostTrainSettings, settings, options, "post_train")
    info = init_distributed(device)
    try:
        return _post_train(info, data, resolve_model(base), Path(out), opts, resume, lesions, progress, cancel)
    finally:
        shutdown(info)


def _dataset(data: Any, profile: str, seed: int, need_lesion: bool, lesions, progress, cancel, normalisation):
    from ctp2mri.data import SliceDataset

    if isinstance(data, SliceDataset):
        if lesions:
            raise InputError("lesion masks can only be supplied with a data folder; a SliceDataset brings its own "
                             "(build it with lesions=...)")
        dataset = load_dataset(data, profile, seed, **normalisation)
        if need_lesion and dataset.cases_without_lesion:
            raise InputError(f"cases {dataset.cases_without_lesion} have no lesion mask, which the lesion loss "
                             "needs; add lesion.nii.gz (or paint one), or set --lambda-lesion 0")
    else:
        dataset = SliceDataset(data, split="train", profile=profile, seed=seed, require_lesion=need_lesion,
                               lesions=lesions, progress=progress, cancel=cancel, **normalisation)
    if need_lesion and not bool(dataset.has_lesion.any()):
        raise InputError("the training data hold no lesion voxel, so the lesion loss would always be 0; "
                         "use data with lesion masks, or set --lambda-lesion 0")
    return dataset


def _post_train(info: Any, data: Any, base_dir: Path, out: Path, opts: PostTrainSettings, resume: bool,
                lesions: Mapping[str, Volume | np.ndarray] | None, progress: ProgressCallback | None,
                cancel: CancelToken | None) -> Path:
    dev = info.device
    init = opts.init
    precision = loop.check_precision(opts.precision, dev)
    kind = read_config(base_dir).get("kind")
    if kind not in POST_TRAINABLE:
        raise InputError(f"{base_dir} is a {kind!r} checkpoint; post-training needs a 'cldm' checkpoint "
                         "(or a 'cbbdm' one)")
    if init == "model" and "model" not in (read_config(base_dir).get("networks") or {}):
        # a bundled (inference-only) checkpoint keeps only the EMA weights: start from them
        init = "ema"
        if info.is_main:
            _log.warning("%s holds no training weights ('model'), only the EMA ones: post-training starts "
                         "from the EMA weights", base_dir)
    nets, base_cfg = load_checkpoint(base_dir, names=sorted({init, "ema", "autoencoder"}), map_location=dev,
                                     kind=kind)
    autoencoder = nets["autoencoder"].eval().requires_grad_(False)
    profile = base_cfg["profile"]
    bridge_loss_type = None
    if kind == "cbbdm":
        schedule = BrownianBridge.from_config(base_cfg["schedule"])
        bridge_loss_type = (base_cfg.get("training") or {}).get("loss_type", "l1")
    else:
        schedule = NoiseSchedule.from_config(base_cfg["schedule"]) if "schedule" in base_cfg else NoiseSchedule()
    normalisation = normalisation_of(base_cfg.get("normalisation"))
    # a base without the ADC window is refused before the run folder is made
    core = core_threshold(normalisation["adc_window"]) if opts.lambda_core else None
    if opts.case_context and not getattr(nets[init], "takes_context", False):
        # refused, like the above, before the run folder is made
        if kind != "cldm":
            raise InputError("the case context is a cLDM's (read by its perfusion encoder); this base is a cBBDM")
        # one frozen copy of the base's EMA encoder (what its synthesis used) for both networks
        source = nets["ema"].encoder
        nets.update({n: add_case_context(nets[n], encoder=source) for n in {init, "ema"}})
    out = loop.prepare_out_dir(out, resume) if info.is_main else out
    barrier(info)
    # the data normalised as the base was trained (its ADC window and DWI bound, or the quantiles before them)
    dataset = _dataset(data, profile, opts.seed, opts.lambda_lesion > 0 or opts.lambda_core > 0, lesions,
                       progress if info.is_main else None, cancel, normalisation)
    weights, sampling = lesion_sampling(dataset, opts.lesion_oversample, info)
    base_prov = base_cfg.get("provenance") or {}
    lr_value = opts.learning_rate(info.world_size)
    settings = {
        **opts.record(profile, precision, info),
        "parameterization": "eps", "loss": EQ8,
        "lambda_image": opts.lambda_image, "lambda_lesion": opts.lambda_lesion, "target": opts.target, "init": init,
        **({"lambda_core": opts.lambda_core, "loss": f"{EQ8} + λ_core L_core"} if opts.lambda_core else {}),
        "lesion_oversample": opts.lesion_oversample, "gradient_checkpointing": opts.gradient_checkpointing,
        "data": data_identity(dataset), kind: nets[init].config, "schedule": schedule.config(),
        # what identifies the base for a resume check (its folder may move)
        "base": {"created": base_prov.get("created"), "git_commit": base_prov.get("git_commit"),
                 "steps": base_prov.get("steps")},
    }
    if kind == "cbbdm":
        settings.update(parameterization="grad", loss_type=bridge_loss_type,
                        loss=f"Eq. 8 with the bridge objective ({bridge_loss_type}) for Eq. 4"
                        + (" + λ_core L_core" if opts.lambda_core else ""))
    # L_latent of Eq. 8 is the base's own objective ("base"): its min-SNR weights, lesion latent
    # term and condition loss; "eq4" keeps only the (weighted) ε-loss.
    base_training = base_cfg.get("training") or {}
    objective: dict[str, Any] = {}
    if kind == "cldm":
        settings["parameterization"] = base_training.get("parameterization", "eps")
        keys = ("loss_weighting", "snr_gamma") + (OBJECTIVE_TERMS if opts.latent_objective == "base" else ())
        objective = {k: base_training[k] for k in keys if base_training.get(k) is not None}
        if objective.get("loss_weighting") != "min-snr":
            objective.pop("snr_gamma", None)
        settings.update(objective, latent_objective=opts.latent_objective)
        if objective.get("condition_loss_weight") and not nets[init].has_condition_head:
            raise InputError(f"{base_dir} was trained with a condition loss but its network has no condition head")

    contexts: dict[str, float] | None = None
    if getattr(nets[init], "takes_context", False):
        contexts = case_contexts(nets["ema"], dataset)
        settings["case_context"] = nets[init].case_context["threshold"]

    seed_everything(opts.seed)
    model = nets[init].to(dev)
    ema = EMA(model, opts.ema_decay)
    ema.module.load_state_dict(nets["ema"].state_dict())
    # The average continues the base's: with its update count, the warm-up does not restart and
    # throw the base's average away in the first steps (d_n = (1 + n)/(10 + n) is 0.1 at n = 0).
    ema.num_updates = int(base_prov.get("steps") or 0)
    del nets
    opt = torch.optim.AdamW(model.parameters(), lr=lr_value, weight_decay=opts.weight_decay)
    scaler = loop.make_grad_scaler(precision)
    generator = noise_generator(opts.seed, info)
    step, position, log = 0, {"epoch": 0, "batch_in_epoch": 0}, loop.RunLog(POST_TRAIN_LOG_COLUMNS)
    if resume:
        step, position, log = restore_run(out, settings, model, ema, opt, scaler, generator, info)
    if step >= opts.steps:
        raise InputError(f"the run in {out} has already post-trained {step} steps (≥ --steps {opts.steps}); "
                         "give a larger --steps to continue it")

    schedule = schedule.to(dev)
    model_train = DDP(model, device_ids=[dev] if dev.type == "cuda" else None) if info.distributed else model
    stream = BatchStream(dataset, opts.batch_size, info, opts.seed, opts.num_workers, weights=weights, **position)
    run = loop.Run(out, info, opts.steps, log, opts.checkpoint_every, opts.log_every, progress, cancel)
    model.train()
    record = {
        "base": {"path": str(base_dir.resolve()), "kind": base_cfg.get("kind"), "provenance": base_prov,
                 "training": base_cfg.get("training"), "post_training": base_cfg.get("post_training")},
        "lambda_image": opts.lambda_image, "lambda_lesion": opts.lambda_lesion, "target": opts.target, "init": init,
        **({"lambda_core": opts.lambda_core} if opts.lambda_core else {}),
        "sampling": sampling, "gradient_checkpointing": opts.gradient_checkpointing,
        "post_training_data_normalisation": dataset.intensity_ranges(),
        **({} if contexts is None else {"case_contexts": contexts}),
    }

    def save(step: int) -> None:
        config = loop.base_config(kind, profile, settings, dataset, step, data,
                                  {"schedule": schedule.config(), "inference_network": "ema",
                                   "autoencoder_source": base_cfg.get("autoencoder_source"),
                                   "post_training": record})
        # The networks' outputs are in the base's intensity units: keep its mapping back.
        config["normalisation"] = base_cfg.get("normalisation", config["normalisation"])
        state = {"step": step, "position": stream.position(), "optimizer": opt.state_dict(),
                 "ema": ema.state(), "scaler": scaler.state_dict() if scaler is not None else None}
        run.save({"model": model, "ema": ema.module, "autoencoder": autoencoder}, config, state,
                 rng_snapshot(generator))

    def loss_fn(batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        if contexts is not None:
            batch = with_context(batch, contexts)
        if kind == "cbbdm":
            return bridge_post_training_loss(model_train, autoencoder, schedule, batch, generator, opts.lambda_image,
                                             opts.lambda_lesion, opts.target, precision, opts.gradient_checkpointing,
                                             bridge_loss_type, opts.lambda_core, core)
        return post_training_loss(model_train, autoencoder, schedule, batch, generator, opts.lambda_image,
                                  opts.lambda_lesion, opts.target, precision, opts.gradient_checkpointing,
                                  objective=objective, lambda_core=opts.lambda_core, core=core)

    optimise(info, model, model_train, ema, opt, scaler, stream, run, step, opts, loss_fn, save)
    return out


def post_training_loss(model: torch.nn.Module, autoencoder: torch.nn.Module, schedule: NoiseSchedule,
                       batch: Mapping[str, Any], generator: torch.Generator, lambda_image: float = LAMBDA_IMAGE,
                       lambda_lesion: float = LAMBDA_LESION, target: str = "input", precision: str = "fp32",
                       gradient_checkpointing: bool = False, objective: Mapping[str, Any] | None = None,
                       lambda_core: float = 0.0, core: tuple[float, float] | None = None,
                       ) -> tuple[torch.Tensor, dict[str, float]]:
    """L_total (Eq. 8) of one batch, attached to ``model``'s graph, and its parts as floats.

    L_latent is ``objective`` (`ctp2mri.training.TrainSettings.objective`'s dict: min-SNR
    weighting, the lesion latent term, the condition loss); None is Eq. 4 unweighted, the
    paper's. ``lambda_core`` > 0 adds λ_core · `ctp2mri.losses.core_loss` (not in the paper)
    with ``core`` = (τ, w) of `ctp2mri.training.image_terms.core_threshold`.

    ``batch`` holds ``target``, ``cond``, ``brain``, ``lesion`` (`SliceDataset` samples
    collated); ``generator`` draws t and ε on ``schedule``'s device. ``autoencoder`` must be
    frozen by the caller (its weights get no gradient because they do not require one; the
    decode itself stays differentiable in ẑ_0). With λ_image = λ_lesion = 0 nothing is decoded
    and the loss is L_latent.
    """
    if target not in TARGETS:
        raise InputError(f"unknown post-training target {target!r}; choose one of {', '.join(TARGETS)}")
    dev = schedule.device
    x = batch["target"].to(dev, non_blocking=True)
    brain = batch["brain"].to(dev, non_blocking=True)
    lesion = batch["lesion"].to(dev, non_blocking=True)
    scale = getattr(model, "module", model).scale_factor
    z0, t, eps, z_t = diffuse(autoencoder, schedule, x, generator, precision, scale)
    latent, terms, eps_hat = objective_terms(model, schedule, z0, t, eps, z_t, batch, precision, dict(objective or {}))
    parts = {"latent_loss": float(latent.detach()), **terms, "lesion_voxels": float(lesion.sum()),
             "lesion_slices": float((lesion.flatten(1).amax(1) > 0).float().mean())}
    if lambda_image == 0 and lambda_lesion == 0 and lambda_core == 0:
        return latent, parts  # L_latent alone: nothing to decode

    z0_hat = schedule.predict_z0(z_t, t, eps_hat.float())  # Eq. 5
    terms = image_space_terms(autoencoder, z0_hat, z0, x, brain, lesion, target, precision, gradient_checkpointing,
                              scale, core=core_for(lambda_core, core))  # Eq. 6, 7 of x̂ = D(ẑ_0 / scale)
    return add_image_terms(latent, terms, lambda_image, lambda_lesion, lambda_core, parts)  # Eq. 8


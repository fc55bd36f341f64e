"""The run of a latent model on a frozen autoencoder, shared by the cLDM (`ctp2mri.training.ldm`),
the cBBDM (`ctp2mri.training.bbdm`) and, for `optimise` and `restore_run`, post-training.

AdamW over the trainable networks, lr = accumulation × processes × batch × base lr (CompVis
``scale_lr``), EMA of the weights (``LitEma``) after every step, checkpoints into the run
folder, log.csv, progress/cancel and exact resume (`ctp2mri.training.loop`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ctp2mri.case_slices import normalisation_of
from ctp2mri.checkpoints import load_checkpoint, read_config
from ctp2mri.errors import InputError
from ctp2mri.models import model_config
from ctp2mri.progress import CancelToken, ProgressCallback
from ctp2mri.training import loop
from ctp2mri.training.batches import BatchStream, data_identity, load_dataset
from ctp2mri.training.distributed import DistInfo, barrier
from ctp2mri.training.ema import EMA
from ctp2mri.training.rng import noise_generator, rng_restore, rng_snapshot, seed_everything
from ctp2mri.training.run_settings import RunSettings, TrainSettings
from ctp2mri.training.sampling import lesion_sampling, sampling_setting

__all__ = ["LOG_COLUMNS", "BatchLoss", "LatentModel", "latent_scale_factor", "optimise", "restore_run",
           "train_latent_model"]

LOG_COLUMNS = ("step", "epoch", "loss", "lesion_latent_loss", "condition_loss", "condition_latent", "condition_lesion",
               "condition_bce", "lr", "seconds")
#: Batch loss: one batch's loss on the graph, and its parts as floats for the log.
BatchLoss = Callable[[dict[str, Any]], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class LatentModel:
    """What tells one latent model's run from another's (`train_latent_model`).

    Attributes
    ----------
    kind
        The checkpoint kind (``"cldm"``, ``"cbbdm"``), also the ``training`` key of the
        network config.
    network
        The network class, built from the network config.
    config
        Its constructor arguments; None: the profile's (``model_config(profile, kind)``).
    overrides
        Entries replacing the config's (``scale_factor="auto"`` is measured on the training set).
    schedule
        The noise schedule or bridge (anything with ``config()`` and ``to(device)``).
    objective
        Settings describing the loss, recorded in the checkpoint's ``training``.
    loss_for
        ``loss_for(model_train, autoencoder, schedule, generator, precision)``: the per-batch
        loss function given to `optimise`.
    """

    kind: str
    network: type[torch.nn.Module]
    config: dict[str, Any] | None
    overrides: dict[str, Any]
    schedule: Any
    objective: dict[str, Any]
    loss_for: Callable[..., BatchLoss]


def train_latent_model(info: DistInfo, latent: LatentModel, data: Any, ae_dir: Path, out: Path,
                       settings: TrainSettings, resume: bool, progress: ProgressCallback | None,
                       cancel: CancelToken | None) -> Path:
    """Train (or resume) ``latent`` on the autoencoder in ``ae_dir``, as ``settings`` ask, into
    the run folder ``out``; `ctp2mri.training.train_ldm` describes the rest. Returns ``out``."""
    dev = info.device
    precision = loop.check_precision(settings.precision, dev)
    kind = latent.kind
    nets, ae_cfg = load_checkpoint(ae_dir, names=["model"], map_location=dev, kind="autoencoder")
    autoencoder = nets["model"].eval().requires_grad_(False)
    profile = ae_cfg["profile"]
    out = loop.prepare_out_dir(out, resume) if info.is_main else out
    barrier(info)
    # the latent model learns the autoencoder's latents, so it sees the data normalised as the autoencoder did
    dataset = load_dataset(data, profile, settings.seed, progress=progress if info.is_main else None, cancel=cancel,
                           **normalisation_of(ae_cfg.get("normalisation")))
    net_config = {**(latent.config or model_config(profile, kind)), **latent.overrides}
    if net_config.get("scale_factor") == "auto":
        # a resumed run keeps the value it measured (a GPU's encode need not repeat bit for bit)
        saved = (read_config(out).get("training") or {}).get(kind, {}) if resume else {}
        net_config["scale_factor"] = saved.get("scale_factor") or latent_scale_factor(autoencoder, dataset, dev)
    if net_config["latent_channels"] != autoencoder.embedding_dim:
        label = {"cldm": "cLDM", "cbbdm": "cBBDM"}.get(kind, kind)
        raise InputError(f"the {label} models {net_config['latent_channels']} latent channels but the autoencoder "
                         f"in {ae_dir} makes {autoencoder.embedding_dim}")
    weights, sampling = lesion_sampling(dataset, settings.lesion_oversample, info)
    lr_value = settings.learning_rate(info.world_size)
    record = {
        **settings.record(profile, precision, info), **sampling_setting(settings.lesion_oversample),
        **latent.objective, "data": data_identity(dataset), kind: net_config, "schedule": latent.schedule.config(),
        "autoencoder": {"config": autoencoder.config, "git_commit": ae_cfg.get("provenance", {}).get("git_commit"),
                        "steps": ae_cfg.get("provenance", {}).get("steps")},
    }

    seed_everything(settings.seed)
    model = latent.network(**net_config).to(dev)
    ema = EMA(model, settings.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=lr_value, weight_decay=settings.weight_decay)
    scaler = loop.make_grad_scaler(precision)
    generator = noise_generator(settings.seed, info)
    step, position, log = 0, {"epoch": 0, "batch_in_epoch": 0}, loop.RunLog(LOG_COLUMNS)
    if resume:
        step, position, log = restore_run(out, record, model, ema, opt, scaler, generator, info)
    if step >= settings.steps:
        raise InputError(f"the run in {out} has already trained {step} steps (≥ --steps {settings.steps}); "
                         "give a larger --steps to continue it")

    schedule = latent.schedule.to(dev)
    model_train = DDP(model, device_ids=[dev] if dev.type == "cuda" else None) if info.distributed else model
    stream = BatchStream(dataset, settings.batch_size, info, settings.seed, settings.num_workers, weights=weights,
                         **position)
    run = loop.Run(out, info, settings.steps, log, settings.checkpoint_every, settings.log_every, progress, cancel)
    model.train()
    ae_source = {"source": str(ae_dir), "provenance": ae_cfg.get("provenance")}

    def save(step: int) -> None:
        config = loop.base_config(kind, profile, record, dataset, step, data,
                                  {"schedule": schedule.config(), "autoencoder_source": ae_source,
                                   "inference_network": "ema", "sampling": sampling})
        state = {"step": step, "position": stream.position(), "optimizer": opt.state_dict(),
                 "ema": ema.state(), "scaler": scaler.state_dict() if scaler is not None else None}
        run.save({"model": model, "ema": ema.module, "autoencoder": autoencoder}, config, state,
                 rng_snapshot(generator))

    optimise(info, model, model_train, ema, opt, scaler, stream, run, step, settings,
             latent.loss_for(model_train, autoencoder, schedule, generator, precision), save)
    return out


def latent_scale_factor(autoencoder: torch.nn.Module, dataset: Any, device: torch.device,
                        max_slices: int = 256) -> float:
    """1 / std of the unquantised latents E(x) over up to ``max_slices`` evenly spaced
    training slices, un-augmented (CompVis ``scale_by_std``, which uses the first batch).

    Deterministic in the data and the autoencoder, so a resumed run recomputes the same value.
    """
    n = len(dataset)
    if n == 0:
        raise InputError("the training set has no slices to measure the latent scale on")
    index = sorted({round(i * (n - 1) / max(1, min(n, max_slices) - 1)) for i in range(min(n, max_slices))})
    images = dataset.target[index].to(torch.float32)  # the cached slices, before augmentation
    with torch.no_grad():
        z = torch.cat([autoencoder.encode(images[i:i + 32].to(device)).float().cpu()
                       for i in range(0, len(images), 32)])
    std = float(z.std())
    if not std > 0:
        raise InputError("the autoencoder's latents have zero spread on the training set; it cannot be used")
    return round(1.0 / std, 6)


# shared with post-training ---------------------------------------------------------------------
def restore_run(out: Path, record: dict[str, Any], model: torch.nn.Module, ema: EMA,
                opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, generator: torch.Generator,
                info: DistInfo) -> tuple[int, dict[str, int], loop.RunLog]:
    """Load a saved run's model, EMA, optimiser, scaler and RNGs, after checking that its
    ``training`` record matches ``record``; (step, data position, log)."""
    _, state = loop.resume_state(out, record)
    saved, _ = load_checkpoint(out, names=["model", "ema"], build=False, map_location=info.device)
    model.load_state_dict(saved["model"])
    ema.load(saved["ema"], state["ema"])
    opt.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rng_restore(state["rng"], info, generator)
    return int(state["step"]), state["position"], loop.RunLog.from_state(state["log"])


def optimise(info: DistInfo, model: torch.nn.Module, model_train: torch.nn.Module, ema: EMA,
             opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, stream: BatchStream,
             run: loop.Run, step: int, settings: RunSettings, loss_fn: BatchLoss,
             save: Callable[[int], None]) -> int:
    """The optimisation loop from ``step`` to ``settings.steps``: accumulation, DDP sync,
    clipping, EMA, logging (``loss`` and the parts ``loss_fn`` returns, averaged over
    micro-batches), checkpoints and cancellation. Returns the last step."""
    grad_accum, grad_clip = settings.grad_accum, settings.grad_clip
    lr_value = settings.learning_rate(info.world_size)
    batches = iter(stream)
    while step < settings.steps:
        opt.zero_grad(set_to_none=True)
        total, parts = 0.0, {}
        for micro in range(grad_accum):
            batch = next(batches)
            # Gradients are all-reduced on the last micro-batch only.
            sync = contextlib.nullcontext() if not info.distributed or micro == grad_accum - 1 \
                else model_train.no_sync()
            with sync:
                loss, extra = loss_fn(batch)
                _backward(loss / grad_accum, scaler)
            total += float(loss.detach()) / grad_accum
            for k, v in extra.items():
                parts[k] = parts.get(k, 0.0) + float(v) / grad_accum
        if scaler is not None:
            if grad_clip:
                scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(opt)
            scaler.update()
        else:
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
        ema.update(model)
        step += 1
        cancelled = run.end_step(step, {"loss": total, **parts, "epoch": stream.epoch, "lr": lr_value})
        run.finish_step(step, cancelled, functools.partial(save, step))
    return step


def _backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()

"""Loading a checkpoint for sampling: a folder in, networks in eval mode on a device out.

`load_model` dispatches on the checkpoint's ``kind``, so the baselines are sampled by the same
code as the cLDM (`ctp2mri.synthesis.inference.sample_slices`): ``"cldm"`` (`LoadedModel`),
``"cbbdm"`` (`LoadedBridge`: the latent Brownian bridge walked back from y = F(c) by BBDM's
sampler) and ``"pix2pix"`` (`LoadedPix2Pix`: one generator pass). `model_label` names a
checkpoint as Table 1 does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ctp2mri.checkpoints import load_checkpoint, read_config
from ctp2mri.devices import resolve_device
from ctp2mri.diffusion import BrownianBridge, NoiseSchedule
from ctp2mri.errors import InputError
from ctp2mri.models.autoencoder import VQAutoencoder
from ctp2mri.models.cbbdm import BrownianBridgeLDM
from ctp2mri.models.cldm import ConditionalLDM
from ctp2mri.models.pix2pix import Pix2PixGenerator

__all__ = ["KIND_SAMPLERS", "MODEL_KINDS", "SAMPLERS", "AnyLoadedModel", "LoadedBridge", "LoadedModel",
           "LoadedPix2Pix", "default_sampler", "load_model", "model_label", "synthesis_model"]

#: cLDM samplers of `ctp2mri.synthesis.inference.sample_slices`: DDIM (the paper's, Song et al.
#: 2021) and DPM-Solver++(2M).
SAMPLERS = ("ddim", "dpm++2m")
#: Checkpoint kinds `load_model` samples, and the samplers of each (the first is the default):
#: the cBBDM's skip-step Brownian-bridge sampler, the Pix2Pix generator's single pass.
KIND_SAMPLERS: dict[str, tuple[str, ...]] = {"cldm": SAMPLERS, "cbbdm": ("bbdm",), "pix2pix": ("generator",)}
MODEL_KINDS = tuple(KIND_SAMPLERS)


@dataclass
class LoadedModel:
    """A cLDM checkpoint ready for sampling (networks in eval mode, no gradients).

    Attributes
    ----------
    cldm
        The ε-prediction network (EMA weights unless loaded with ``use_ema=False``).
    autoencoder
        The VQ autoencoder whose decoder maps latents to (DWI, ADC).
    schedule
        The noise schedule the cLDM was trained with, on the model's device.
    normalisation
        The checkpoint's intensity ranges (``{"dwi": {"lo", "hi"}, "adc": {...}, ...}``,
        see `ctp2mri.data.SliceDataset.intensity_ranges`) for mapping output back to units.
    profile
        Name of the model grid (`ctp2mri.profiles`).
    config
        The whole config.json.
    device
        Where the networks live.
    weights
        Which weight file the cLDM came from (``"ema"`` or ``"model"``).
    path
        The checkpoint folder.
    """

    kind: ClassVar[str] = "cldm"

    cldm: ConditionalLDM
    autoencoder: VQAutoencoder
    schedule: NoiseSchedule
    normalisation: dict[str, Any]
    profile: str
    config: dict[str, Any]
    device: torch.device
    weights: str = "ema"
    path: str | None = None


@dataclass
class LoadedBridge:
    """A cBBDM (or BBDM) checkpoint ready for sampling; fields as `LoadedModel`'s, with

    Attributes
    ----------
    network
        The `BrownianBridgeLDM` (its F gives the endpoint y, its UNet the objective).
    bridge
        The Brownian-bridge schedule it was trained with, on the model's device.
    """

    kind: ClassVar[str] = "cbbdm"

    network: BrownianBridgeLDM
    autoencoder: VQAutoencoder
    bridge: BrownianBridge
    normalisation: dict[str, Any]
    profile: str
    config: dict[str, Any]
    device: torch.device
    weights: str = "ema"
    path: str | None = None


@dataclass
class LoadedPix2Pix:
    """A Pix2Pix checkpoint ready for inference; ``generator`` is the U-Net (other fields as
    `LoadedModel`'s; Pix2Pix keeps no EMA, so ``weights`` is ``"model"``)."""

    kind: ClassVar[str] = "pix2pix"

    generator: Pix2PixGenerator
    normalisation: dict[str, Any]
    profile: str
    config: dict[str, Any]
    device: torch.device
    weights: str = "model"
    path: str | None = None


AnyLoadedModel = LoadedModel | LoadedBridge | LoadedPix2Pix


def load_model(path: str | os.PathLike, device: str | torch.device = "auto",
               use_ema: bool = True) -> AnyLoadedModel:
    """Load a checkpoint folder for sampling, by its kind: cLDM, cBBDM or Pix2Pix.

    Parameters
    ----------
    path
        Checkpoint folder: ``kind: "cldm"`` or ``"cbbdm"`` (``model``/``ema`` denoiser weights
        and the ``autoencoder`` they were trained with) or ``"pix2pix"`` (``model``, the
        generator).
    device
        ``"auto"``, ``"cpu"``, ``"cuda[:i]"``, ``"mps"`` or a `torch.device`
        (`ctp2mri.devices.resolve_device`).
    use_ema
        Sample with the EMA weights (as the paper and CompVis do); ``False`` takes the raw
        training weights. A checkpoint without EMA weights (Pix2Pix) falls back to ``model``.

    Returns
    -------
    `LoadedModel`, `LoadedBridge` or `LoadedPix2Pix`, for
    `ctp2mri.synthesis.inference.sample_slices`.

    Raises
    ------
    InputError
        Not a checkpoint of those kinds, a weight file missing/truncated/mismatched (from
        `ctp2mri.checkpoints`), no schedule or profile recorded.
    """
    from ctp2mri.bundled import resolve_model

    path = resolve_model(path)  # a bundled model's name ("demo") or a folder
    dev = resolve_device(device)
    config = read_config(path)
    kind = config.get("kind")
    if kind not in MODEL_KINDS:
        raise InputError(f"{path} is a {kind!r} checkpoint; sampling needs a 'cldm' checkpoint (written by "
                         "`ctp2mri train-ldm` or `post-train`), or a 'cbbdm' or 'pix2pix' baseline")
    networks = config["networks"]
    weights = "ema" if use_ema and "ema" in networks else "model"
    needed = (weights,) if kind == "pix2pix" else (weights, "autoencoder")
    for name in needed:
        if name not in networks:
            raise InputError(f"{path} holds no {name!r} network (it has {', '.join(networks)}); "
                             f"a {kind} checkpoint needs " + ("its generator" if kind == "pix2pix" else
                                                             "the denoiser and its autoencoder"))
    if kind != "pix2pix" and not isinstance(config.get("schedule"), dict):
        raise InputError(f"{path}/config.json records no noise schedule; the checkpoint is damaged")
    nets, config = load_checkpoint(path, names=list(needed), map_location=dev, kind=kind)
    expected = {"cldm": ConditionalLDM, "cbbdm": BrownianBridgeLDM, "pix2pix": Pix2PixGenerator}[kind]
    if not isinstance(nets[weights], expected) or (kind != "pix2pix"
                                                   and not isinstance(nets["autoencoder"], VQAutoencoder)):
        raise InputError(f"{path}: {weights!r} must be a {kind} network"
                         + ("" if kind == "pix2pix" else " and 'autoencoder' an autoencoder")
                         + "; config.json says " + ", ".join(repr(networks[n]["type"]) for n in needed))
    for net in nets.values():
        net.eval().requires_grad_(False)
    common = {"normalisation": dict(config.get("normalisation") or {}), "profile": str(config["profile"]),
              "config": config, "device": dev, "weights": weights, "path": os.fspath(path)}
    if kind == "pix2pix":
        return LoadedPix2Pix(generator=nets[weights], **common)
    if kind == "cbbdm":
        return LoadedBridge(network=nets[weights], autoencoder=nets["autoencoder"],
                            bridge=BrownianBridge.from_config(config["schedule"]).to(dev), **common)
    return LoadedModel(cldm=nets[weights], autoencoder=nets["autoencoder"],
                       schedule=NoiseSchedule.from_config(config["schedule"]).to(dev), **common)


def model_label(config: dict[str, Any]) -> str:
    """The Table-1 name of a checkpoint from its config.json: ``cLDM``, ``cBBDM`` (``BBDM``
    without the concatenated condition), ``Pix2Pix``; ``-PT`` after lesion-aware post-training."""
    kind = config.get("kind")
    if kind == "pix2pix":
        return "Pix2Pix" if (config.get("training") or {}).get("adversarial", True) else "U-Net (L1)"
    if kind == "cbbdm":
        denoiser = (config.get("networks") or {}).get("ema") or (config.get("networks") or {}).get("model") or {}
        name = "cBBDM" if (denoiser.get("config") or {}).get("concat_condition", True) else "BBDM"
    elif kind == "cldm":
        name = "cLDM"
    else:
        raise InputError(f"a {kind!r} checkpoint is not a synthesis model; give a cldm, cbbdm or pix2pix checkpoint")
    return name + ("-PT" if config.get("post_training") else "")


def default_sampler(model: AnyLoadedModel) -> str:
    """The sampler `ctp2mri.synthesis.inference.sample_slices` uses when none is named: DDIM
    (the paper's) for a cLDM, BBDM's bridge sampler for a cBBDM, the generator pass for Pix2Pix."""
    return KIND_SAMPLERS[model.kind][0]


def synthesis_model(model: LoadedModel | str | os.PathLike, device: str | torch.device = "auto",
                    use_ema: bool = True) -> LoadedModel:
    """The cLDM that synthesis runs: ``model`` itself when loaded already, else `load_model`'s.

    Raises
    ------
    InputError
        As `load_model`, or the checkpoint is a baseline's (cBBDM, Pix2Pix).
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device, use_ema)
    if not isinstance(loaded, LoadedModel):  # load_model also reads the baselines' checkpoints
        raise InputError(f"{model} is a {loaded.kind} baseline checkpoint; synthesis runs a cLDM (from "
                         "`ctp2mri train-ldm` or `post-train`). Score baselines with `ctp2mri evaluate`.")
    return loaded

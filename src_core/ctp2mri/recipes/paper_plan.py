"""Before the paper recipe trains: its expected time, and its stages as ``torchrun`` commands.

`plan` estimates the time of each stage from a FLOP count: the forward FLOPs of the real
networks on one slice (`torch.utils.flop_counter` on the meta device, so nothing is
allocated), × 3 for forward + backward, × batch × steps, divided by an assumed sustained share
of the GPU's dense bf16 peak. It is an estimate, not a measurement.

Several GPUs: ``train-demo`` itself runs in one process (it refuses to start under
``torchrun``); ``--plan --gpus N`` prints one ``torchrun`` command per stage instead
(`torchrun_commands`), which the trainers run with DDP (`ctp2mri.training.distributed`).
Rerunning ``train-demo`` with the same ``--out`` afterwards finds those stages done and only
evaluates.
"""

from __future__ import annotations

import functools
import math
import os
import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ctp2mri.errors import InputError
from ctp2mri.recipes.paper_recipe import PaperRecipe, paper_recipe

__all__ = ["DEFAULT_UTILIZATION", "format_plan", "forward_gflops", "plan", "torchrun_commands"]

#: The paper's test set (its §3), used by the plan when no --data is given.
PAPER_TEST_SLICES = 4_015
#: Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a word in the CUDA device name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A6000": 154.8, "L40S": 362.0, "L40": 181.0,
                    "4090": 165.2, "A10": 125.0, "V100": 125.0}
DEFAULT_GPU = "H100"
#: The share of that peak a training step is assumed to sustain. An assumption: convolutional
#: U-Nets with GroupNorm in bf16 typically reach 30–50 % of the tensor-core peak.
DEFAULT_UTILIZATION = 0.35


# the FLOP estimate ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def forward_gflops(networks: str = "paper") -> dict[str, float]:
    """Forward GFLOPs of one paper-grid slice through each network (FlopCounterMode, meta device).

    ``autoencoder``: encode, quantise, decode; ``encode`` and ``decode`` alone (decode includes
    the quantiser); ``cldm``: the UNet with its condition rescaler on a 48 × 56 latent;
    ``discriminator``: the PatchGAN on one slice.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ctp2mri.models import model_config
    from ctp2mri.models.autoencoder import PatchGANDiscriminator, VQAutoencoder
    from ctp2mri.models.cldm import ConditionalLDM
    from ctp2mri.profiles import get_profile

    prof = get_profile("paper")
    h, w = prof.shape_xy
    with torch.device("meta"), torch.no_grad():
        ae = VQAutoencoder(**model_config(networks, "autoencoder"))
        unet = ConditionalLDM(**model_config(networks, "cldm"))
        disc = PatchGANDiscriminator(**model_config(networks, "discriminator"))
        x = torch.zeros(1, 2, h, w)
        c = torch.zeros(1, prof.n_frames, h, w)
        z = torch.zeros(1, unet.config["latent_channels"], h // 4, w // 4)
        t = torch.zeros(1, dtype=torch.long)
        calls = {"autoencoder": lambda: ae(x), "encode": lambda: ae.encode(x),
                 "decode": lambda: ae.decode(z, quantize=True), "cldm": lambda: unet(z, t, c),
                 "discriminator": lambda: disc(x)}
        out = {}
        for name, call in calls.items():
            with FlopCounterMode(display=False) as counter:
                call()
            out[name] = counter.get_total_flops() / 1e9
    return out


def _gpu_peak(peak_tflops: float | None) -> tuple[float, str]:
    """(dense bf16 peak in TFLOP/s, the device it is for)."""
    if peak_tflops is not None:
        return float(peak_tflops), "the given peak"
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            for key, peak in BF16_PEAK_TFLOPS.items():
                if key.lower() in name.lower():
                    return peak, name
    except Exception:  # noqa: BLE001 - no CUDA: the default GPU
        pass
    return BF16_PEAK_TFLOPS[DEFAULT_GPU], f"{DEFAULT_GPU} (assumed: no known GPU here)"


def plan(recipe: str | PaperRecipe = "paper", data_info: dict[str, Any] | None = None, steps_scale: float = 1.0,
         gpus: int = 1, peak_tflops: float | None = None, utilization: float = DEFAULT_UTILIZATION,
         evaluate_models: bool = True) -> dict[str, Any]:
    """Stages, their settings and the FLOP-based time estimate of each.

    ``data_info`` (from `check_paper_data`) gives the test slices to evaluate; without it the
    paper's data set (4 015 test slices) stands in. Times assume ``gpus`` GPUs of
    ``peak_tflops`` dense bf16 (detected, else an H100's 989) sustaining ``utilization`` of it,
    and perfect scaling across GPUs.
    """
    rec = paper_recipe(recipe, steps_scale)
    if not 0 < utilization <= 1:
        raise InputError(f"--utilization must lie in (0, 1], got {utilization!r}")
    if gpus < 1:
        raise InputError(f"--gpus must be at least 1, got {gpus!r}")
    g = forward_gflops(rec.networks)
    peak, device_name = _gpu_peak(peak_tflops)
    sustained = peak * 1e12 * utilization * gpus
    adversarial = max(0, rec.ae_steps - rec.ae_disc_start + 1)
    # × 3: forward + backward (the backward of a layer costs about twice its forward)
    ae_flops = rec.ae_batch * (3 * g["autoencoder"] * rec.ae_steps
                               # the generator's adversarial term through D, then D's step on real + fake
                               + adversarial * (3 * g["discriminator"] + 3 * 2 * g["discriminator"]))
    # the frozen encoder runs forward only; the UNet forward + backward
    ldm_flops = rec.ldm_batch * rec.ldm_steps * (g["encode"] + 3 * g["cldm"])
    # + the decode of ẑ_0, differentiated through (and one more, without gradient, for D(z_0))
    decodes = 3 * g["decode"] + (g["decode"] if rec.target == "reconstruction" else 0.0)
    pt_flops = rec.pt_batch * rec.pt_steps * (g["encode"] + 3 * g["cldm"] + decodes)
    test_slices = (data_info or {}).get("test_slices", PAPER_TEST_SLICES)
    if data_info and rec.eval_max_cases:
        test_slices = math.ceil(test_slices * min(1.0, rec.eval_max_cases / max(1, data_info["test_cases"])))
    eval_flops = 2 * test_slices * (rec.eval_steps * g["cldm"] + g["decode"])  # base and post-trained
    stages = [
        {"stage": "autoencoder", "steps": rec.ae_steps, "batch": rec.ae_batch, "gflops": ae_flops,
         "what": f"VQGAN, adversarial from step {rec.ae_disc_start}"},
        {"stage": "base", "steps": rec.ldm_steps, "batch": rec.ldm_batch, "gflops": ldm_flops,
         "what": f"cLDM Eq. 4, T = {rec.timesteps}"},
        {"stage": "post_trained", "steps": rec.pt_steps, "batch": rec.pt_batch, "gflops": pt_flops,
         "what": f"Eq. 8, λ_image {rec.lambda_image:g}, λ_lesion {rec.lambda_lesion:g}"},
    ]
    if evaluate_models:
        stages.append({"stage": "evaluation", "steps": rec.eval_steps, "batch": test_slices, "gflops": eval_flops,
                       "what": f"base + post-trained, {rec.eval_sampler} {rec.eval_steps} steps on {test_slices} "
                               f"test slices{'' if data_info else ' (the paper’s count)'}, at bf16 rates "
                               "(it samples in fp32)"})
    for s in stages:
        s["seconds"] = s["gflops"] * 1e9 / sustained
    return {"recipe": asdict(rec), "forward_gflops_per_slice": g, "peak_tflops": peak, "device": device_name,
            "utilization": utilization, "gpus": gpus, "stages": stages,
            "total_seconds": sum(s["seconds"] for s in stages)}


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(p: dict[str, Any]) -> str:
    g = p["forward_gflops_per_slice"]
    lines = [f"plan: forward GFLOPs per slice: autoencoder {g['autoencoder']:.0f} (encode {g['encode']:.0f}, decode "
             f"{g['decode']:.0f}), cLDM UNet {g['cldm']:.0f}, discriminator {g['discriminator']:.1f}",
             f"expected time from the FLOP count on {p['gpus']} × {p['device']}: {p['peak_tflops']:g} TFLOP/s dense "
             f"bf16 × an assumed {p['utilization']:.0%} sustained (fwd + bwd = 3 × fwd; an estimate, not a "
             "measurement)"]
    for s in p["stages"]:
        count = (f"{s['steps']} steps × batch {s['batch']}" if s["stage"] != "evaluation"
                 else f"{s['batch']} slices × 2 models")
        lines.append(f"  {s['stage']:<13} {count:<28} {s['gflops'] / 1e6:12.2f} PFLOP  ≈ {_duration(s['seconds']):>9}"
                     f"   {s['what']}")
    lines.append(f"  {'total':<13} {'':<28} {sum(s['gflops'] for s in p['stages']) / 1e6:12.2f} PFLOP  ≈ "
                 f"{_duration(p['total_seconds']):>9}")
    return "\n".join(lines)


def torchrun_commands(recipe: str | PaperRecipe, data: str | os.PathLike, out: str | os.PathLike, gpus: int,
                      steps_scale: float = 1.0) -> list[str]:
    """One command per stage that runs it on ``gpus`` GPUs with DDP (torchrun, one node).

    Each process takes batch / gpus slices (rounded up), so the global batch and, through the
    official lr scaling, the learning rate stay the recipe's. Add ``--resume`` to continue a
    stage; rerun ``train-demo`` with the same --out afterwards to evaluate.
    """
    rec = paper_recipe(recipe, steps_scale)
    out, data = Path(out), str(data)
    launch = (["torchrun", "--standalone", f"--nproc_per_node={gpus}", "-m", "ctp2mri.cli"] if gpus > 1
              else ["ctp2mri"])

    def per(batch: int) -> str:
        return str(max(1, math.ceil(batch / gpus)))

    common = ["--data", data, "--device", "cuda", "--precision", "bf16", "--seed", str(rec.seed),
              "--num-workers", str(rec.num_workers), "--checkpoint-every", str(rec.checkpoint_every)]
    ae = out / "autoencoder"
    base = out / "cldm_base"
    commands = [
        launch + ["train-autoencoder", *common, "--out", str(ae), "--profile", "paper", "--steps", str(rec.ae_steps),
                  "--batch-size", per(rec.ae_batch), "--disc-start", str(rec.ae_disc_start)],
        launch + ["train-ldm", *common, "--autoencoder", str(ae), "--out", str(base), "--steps", str(rec.ldm_steps),
                  "--batch-size", per(rec.ldm_batch), "--ema-decay", str(rec.ema_decay),
                  "--scale-factor", f"{rec.scale_factor:g}"],
        launch + ["post-train", *common, "--from", str(base), "--out", str(out / "cldm_post_trained"),
                  "--steps", str(rec.pt_steps), "--batch-size", per(rec.pt_batch),
                  "--lambda-image", f"{rec.lambda_image:g}", "--lambda-lesion", f"{rec.lambda_lesion:g}",
                  "--target", rec.target, "--init", rec.init, "--ema-decay", str(rec.ema_decay)],
        ["ctp2mri", "train-demo", "--recipe", "paper", "--data", data, "--out", str(out)]
        + (["--steps-scale", f"{steps_scale:g}"] if steps_scale != 1 else []),
    ]
    lines = [shlex.join(c) for c in commands]
    uneven = [f"{name} {batch} → {math.ceil(batch / gpus) * gpus}" for name, batch in
              (("autoencoder", rec.ae_batch), ("base", rec.ldm_batch), ("post-training", rec.pt_batch))
              if batch % gpus]
    if uneven:
        lines.append(f"# note: a batch that {gpus} GPUs do not divide grows (and its learning rate with it): "
                     + ", ".join(uneven))
    return lines

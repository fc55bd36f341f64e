"""``ctp2mri train-demo --recipe paper --data CASES``: the paper's method on your own cases.

The stages are the demo recipe's — VQGAN autoencoder → base cLDM (Eq. 4) → lesion-aware
post-training (Eq. 8) → evaluation of base vs post-trained on the test split — on the
``paper`` grid (192 × 224 slices, 1 × 1 × 5 mm) with the paper's networks (VQGAN f4, 3 latent
channels, 8192 codes; UNet 224·[1, 4, 8]; T = 1000) and its hyper-parameters, all in
`PaperRecipe`. Each stage is an ordinary, resumable training run in the work folder; a stage
that already reached its step count is skipped, so the command can be re-run after a crash.

Before anything trains, `plan` prints the expected time of each stage from a FLOP count:
the forward FLOPs of the real networks on one slice (`torch.utils.flop_counter` on the meta
device, so nothing is allocated), × 3 for forward + backward, × batch × steps, divided by an
assumed sustained share of the GPU's dense bf16 peak. It is an estimate, not a measurement.

Several GPUs: ``train-demo`` itself runs in one process (it refuses to start under
``torchrun``); ``--plan --gpus N`` prints one ``torchrun`` command per stage instead, which
the trainers run with DDP (`ctp2mri.training.distributed`). Rerunning ``train-demo`` with
the same ``--out`` afterwards finds those stages done and only evaluates.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ctp2mri.errors import InputError
from ctp2mri.io.atomic import atomic_path, ensure_writable_dir
from ctp2mri.progress import CancelToken, ProgressCallback
from ctp2mri.settings import EMA_DECAY, LAMBDA_IMAGE, LAMBDA_LESION

__all__ = ["PAPER_RECIPES", "PaperRecipe", "check_paper_data", "format_plan", "plan", "torchrun_commands",
           "train_paper"]

#: The paper's data set (its §3), used by the plan when no --data is given.
PAPER_TRAIN_SLICES = 14_083
PAPER_TEST_SLICES = 4_015
#: Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a word in the CUDA device name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A6000": 154.8, "L40S": 362.0, "L40": 181.0,
                    "4090": 165.2, "A10": 125.0, "V100": 125.0}
DEFAULT_GPU = "H100"
#: The share of that peak a training step is assumed to sustain. An assumption: convolutional
#: U-Nets with GroupNorm in bf16 typically reach 30–50 % of the tensor-core peak.
DEFAULT_UTILIZATION = 0.35


@dataclass(frozen=True)
class PaperRecipe:
    """The paper recipe's hyper-parameters, one place. Each value says where it comes from:
    "paper" (the publication), "official" (the configuration files of the authors' code:
    the VQGAN config, the LDM config and the post-training config), or "ours" where neither
    states it. Learning rates are base rates, multiplied by the batch size and the number of
    processes as the official code does (CompVis ``scale_lr``)."""

    # autoencoder: VQGAN f4, 3 latent channels, 8192 codes (official; the `paper` network config)
    ae_steps: int = 60_000  # ours: neither states a count; 60 k runs as long again after the adversarial start
    ae_batch: int = 4  # official: 2 slices × 2 accumulated gradients
    ae_base_lr: float = 4.5e-6  # official (→ 1.8e-5 at batch 4 on one GPU)
    ae_disc_start: int = 30_001  # official: the PatchGAN loss starts at this step
    ae_disc_weight: float = 0.2  # official
    ae_codebook_weight: float = 1.0  # official
    # base cLDM: UNet 224·[1, 4, 8], attention at 1/2 and 1/4 latent resolution, rescaler condition
    ldm_steps: int = 100_000  # ours: the paper stops on the validation loss; ≈ 340 passes over its 14 083 slices
    ldm_batch: int = 48  # paper ("batch size of 48") and official
    ldm_base_lr: float = 2e-6  # paper ("base learning rate of 2 × 10⁻⁶", AdamW) and official (→ 9.6e-5)
    ema_decay: float = EMA_DECAY  # official (the EMA's default decay)
    scale_factor: float = 1.0  # official (VQ-f4 latents are diffused unscaled)
    timesteps: int = 1000  # paper (T = 1000); β linear 0.0015 → 0.0195 official (the trainers' default schedule)
    # lesion-aware post-training (Eq. 8), from the base's weights
    pt_steps: int = 20_000  # ours: neither states a count
    pt_batch: int = 6  # official post-training config (the paper's 48 is its base training's)
    pt_base_lr: float = 2e-6  # paper and official (→ 1.2e-5 at batch 6)
    lambda_image: float = LAMBDA_IMAGE  # paper's best (Table 2) and official
    lambda_lesion: float = LAMBDA_LESION  # paper's best (Table 2) and official
    target: str = "input"  # paper (Eq. 6–7 compare with x; the official code with D(z_0))
    init: str = "model"  # official (the base's raw weights); the post-training EMA starts from the base's EMA
    # evaluation of base and post-trained on the test split
    eval_sampler: str = "ddim"  # paper
    eval_steps: int = 200  # paper (200 DDIM steps, η = 0)
    eval_max_cases: int | None = None  # ours: every test case
    # how it runs (ours)
    precision: str = "auto"  # bf16 autocast on a GPU that supports it, fp32 elsewhere
    device: str = "cuda"
    networks: str = "paper"  # network sizes: the `paper` profile's; "demo" makes the smoke recipe fast
    num_workers: int = 4
    checkpoint_every: int = 2_000
    seed: int = 0

    def scaled(self, factor: float) -> "PaperRecipe":
        """Every step count × ``factor`` (at least 1); the adversarial start keeps its share."""
        if not (factor > 0 and math.isfinite(factor)):
            raise InputError(f"--steps-scale must be a positive number, got {factor!r}")
        if factor == 1:
            return self

        def n(steps: int) -> int:
            return max(1, round(steps * factor))

        return replace(self, ae_steps=n(self.ae_steps), ae_disc_start=n(self.ae_disc_start),
                       ldm_steps=n(self.ldm_steps), pt_steps=n(self.pt_steps),
                       checkpoint_every=max(1, min(self.checkpoint_every, n(self.ldm_steps) // 4)))


PAPER_RECIPES: dict[str, PaperRecipe] = {
    "paper": PaperRecipe(),
    # seconds on a CPU: the paper grid and hyper-parameters, the demo's small networks and a few
    # steps (the adversarial phase included); checks the pipeline on your cases, the models are useless.
    "paper-smoke": PaperRecipe(ae_steps=2, ae_batch=2, ae_disc_start=2, ldm_steps=2, ldm_batch=2, pt_steps=2,
                               pt_batch=2, eval_steps=2, eval_max_cases=1, device="cpu", networks="demo",
                               num_workers=0, checkpoint_every=1),
}


# the data ------------------------------------------------------------------------------------
def check_paper_data(data: str | os.PathLike | None, need_test: bool = True) -> dict[str, Any]:
    """Refuse, with one line, data the paper recipe cannot train on; else count its slices.

    Needs a folder of case folders with ``splits.json`` listing ``train`` cases (and ``test``
    cases when ``need_test``), every one on the paper grid (192 × 224 axial slices of
    1 × 1 × 5 mm, 15 CTP frames). Reads the NIfTI headers only.
    """
    import nibabel as nib

    from ctp2mri.profiles import get_profile

    if data is None:
        raise InputError("the paper recipe trains on your cases: pass --data CASES (case folders with splits.json, "
                         "e.g. from `ctp2mri import-isles24 ROOT --out CASES --profile paper`)")
    root = Path(data)
    if not root.is_dir():
        raise InputError(f"data folder {root} does not exist")
    if not (root / "splits.json").is_file():
        raise InputError(f"{root} has no splits.json; write one ({{\"train\": [...], \"test\": [...]}}) or import "
                         "with `ctp2mri import-isles24`")
    try:
        splits = json.loads((root / "splits.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{root / 'splits.json'} is not readable JSON ({exc})") from None
    if not isinstance(splits, dict) or not isinstance(splits.get("train"), list) or not splits["train"]:
        raise InputError(f"{root / 'splits.json'} lists no train cases; the recipe trains on its \"train\" list")
    if need_test and not (isinstance(splits.get("test"), list) and splits["test"]):
        raise InputError(f"{root / 'splits.json'} lists no test cases to evaluate on; add some or pass --no-evaluate")
    prof = get_profile("paper")
    slices = {"train": 0, "test": 0}
    for split in slices:
        for name in splits.get(split) or []:
            path = root / str(name) / "ctp.nii.gz"
            if not path.is_file():
                raise InputError(f"{split} case {name} of {root / 'splits.json'} has no {path}")
            try:
                header = nib.load(path).header
            except Exception as exc:  # noqa: BLE001 - any unreadable header is the user's file
                raise InputError(f"cannot read {path} ({type(exc).__name__}: {exc})") from None
            shape, zooms = header.get_data_shape(), header.get_zooms()
            on_grid = (len(shape) == 4 and tuple(shape[:2]) == prof.shape_xy and shape[3] == prof.n_frames
                       and all(abs(float(a) - b) < 1e-3 for a, b in zip(zooms[:3], prof.spacing)))
            if not on_grid:
                size = "×".join(str(s) for s in shape)
                mm = "×".join(f"{float(z):g}" for z in zooms[:3])
                raise InputError(f"case {name} is {size} voxels of {mm} mm, not on the paper grid (192×224 slices of "
                                 f"1×1×5 mm, 15 frames); re-import it with --profile paper")
            slices[split] += int(shape[2])
    return {"root": root, "train_cases": len(splits["train"]), "test_cases": len(splits.get("test") or []),
            "train_slices": slices["train"], "test_slices": slices["test"]}


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
    rec = (PAPER_RECIPES[recipe] if isinstance(recipe, str) else recipe).scaled(steps_scale)
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
    rec = (PAPER_RECIPES[recipe] if isinstance(recipe, str) else recipe).scaled(steps_scale)
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


# the run -------------------------------------------------------------------------------------
def _precision(rec: PaperRecipe, device: str) -> str:
    if rec.precision != "auto":
        return rec.precision
    import torch

    from ctp2mri.devices import resolve_device

    dev = resolve_device(device)
    return "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def train_paper(out: str | os.PathLike, data: str | os.PathLike | None, recipe: str | PaperRecipe = "paper",
                device: str | None = None, steps_scale: float = 1.0, bundle: str | os.PathLike | None = None,
                evaluate_models: bool = True, peak_tflops: float | None = None,
                utilization: float = DEFAULT_UTILIZATION, progress: ProgressCallback | None = None,
                cancel: CancelToken | None = None, on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the paper recipe on the case folders in ``data`` (work folder ``out``); see the module doc.

    ``out`` gets ``autoencoder/``, ``cldm_base/``, ``cldm_post_trained/`` (resumable runs),
    ``evaluation/``, ``plan.json``, ``timings.json`` and ``recipe.json``. Returns
    ``{"recipe", "plan", "paths", "timings_s", "summary"}``.
    """
    from ctp2mri.models import model_config
    from ctp2mri.recipes.train_demo import BUNDLE_NAMES, _evaluate, _stage_progress, bundle_checkpoint, stage_runner
    from ctp2mri.training import post_train, train_autoencoder, train_ldm

    if isinstance(recipe, str) and recipe not in PAPER_RECIPES:
        raise InputError(f"unknown paper recipe {recipe!r}; choose one of {sorted(PAPER_RECIPES)}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("train-demo runs in one process; for several GPUs run the per-stage torchrun commands that "
                         "`ctp2mri train-demo --recipe paper --data CASES --out WORK --plan --gpus N` prints")
    rec = (PAPER_RECIPES[recipe] if isinstance(recipe, str) else recipe).scaled(steps_scale)
    info = check_paper_data(data, need_test=evaluate_models)
    data = info["root"]
    device = device or rec.device
    precision = _precision(rec, device)
    say = on_stage or (lambda _text: None)
    the_plan = plan(rec, info, gpus=1, peak_tflops=peak_tflops, utilization=utilization,
                    evaluate_models=evaluate_models)
    say(f"paper recipe on {data}: {info['train_cases']} train cases ({info['train_slices']} slices), "
        f"{info['test_cases']} test cases; device {device}, {precision}")
    say(format_plan(the_plan))
    out = ensure_writable_dir(Path(out))
    with atomic_path(out / "plan.json") as tmp:
        Path(tmp).write_text(json.dumps(the_plan, indent=2) + "\n")
    timings, timed, stage = stage_runner(out, say)

    every = max(1, rec.checkpoint_every)
    common = dict(device=device, precision=precision, seed=rec.seed, num_workers=rec.num_workers)
    small = rec.networks != "paper"  # the smoke recipe's networks (the paper grid either way)
    ae = stage("autoencoder", rec.ae_steps, lambda resume: train_autoencoder(
        data, out / "autoencoder", profile="paper", steps=rec.ae_steps, batch_size=rec.ae_batch,
        base_lr=rec.ae_base_lr, disc_start=rec.ae_disc_start, disc_weight=rec.ae_disc_weight,
        codebook_weight=rec.ae_codebook_weight, resume=resume, checkpoint_every=min(every, rec.ae_steps),
        autoencoder_config=model_config(rec.networks, "autoencoder") if small else None,
        discriminator_config=model_config(rec.networks, "discriminator") if small else None,
        progress=_stage_progress(progress, "autoencoder"), cancel=cancel, **common))
    base = stage("base", rec.ldm_steps, lambda resume: train_ldm(
        data, ae, out / "cldm_base", steps=rec.ldm_steps, batch_size=rec.ldm_batch, base_lr=rec.ldm_base_lr,
        ema_decay=rec.ema_decay, scale_factor=rec.scale_factor, resume=resume,
        checkpoint_every=min(every, rec.ldm_steps), cldm_config=model_config(rec.networks, "cldm") if small else None,
        progress=_stage_progress(progress, "base cLDM"), cancel=cancel, **common))
    post = stage("post_trained", rec.pt_steps, lambda resume: post_train(
        data, base, out / "cldm_post_trained", lambda_image=rec.lambda_image, lambda_lesion=rec.lambda_lesion,
        target=rec.target, init=rec.init, steps=rec.pt_steps, batch_size=rec.pt_batch, base_lr=rec.pt_base_lr,
        ema_decay=rec.ema_decay, resume=resume, checkpoint_every=min(every, rec.pt_steps),
        progress=_stage_progress(progress, "post-training"), cancel=cancel, **common))
    paths: dict[str, Path] = {"data": data, "autoencoder": ae, "base": base, "post_trained": post}

    if bundle is not None:
        bundle = ensure_writable_dir(Path(bundle))
        say(f"bundle: copying weights (no optimiser state) → {bundle}")
        bundle_checkpoint(ae, bundle / BUNDLE_NAMES["autoencoder"], ["model"])
        for key in ("base", "post_trained"):
            bundle_checkpoint(paths[key], bundle / BUNDLE_NAMES[key], ["ema", "autoencoder"])
        paths["bundle"] = bundle

    summary = None
    if evaluate_models:
        summary = timed("evaluation", lambda: _evaluate(paths, out / "evaluation", rec, device, progress, cancel, say,
                                                        max_cases=rec.eval_max_cases))
    with atomic_path(out / "recipe.json") as tmp:
        Path(tmp).write_text(json.dumps({"recipe": asdict(rec), "steps_scale": steps_scale, "precision": precision,
                                         "timings_s": timings}, indent=2) + "\n")
    return {"recipe": asdict(rec), "plan": the_plan, "paths": {k: str(v) for k, v in paths.items()},
            "timings_s": timings, "summary": summary}

"""``ctp2mri train-demo --recipe paper --data CASES``: the paper's method on your own cases.

The stages are the demo recipe's — VQGAN autoencoder → base cLDM (Eq. 4) → lesion-aware
post-training (Eq. 8) → evaluation of base vs post-trained on the test split — on the
``paper`` grid (192 × 224 slices, 1 × 1 × 5 mm) with the paper's networks (VQGAN f4, 3 latent
channels, 8192 codes; UNet 224·[1, 4, 8]; T = 1000) and its hyper-parameters, all in
`ctp2mri.recipes.paper_recipe.PaperRecipe`. Each stage is an ordinary, resumable training run
in the work folder; a stage that already reached its step count is skipped, so the command can
be re-run after a crash. Before anything trains, the plan (`ctp2mri.recipes.paper_plan`)
prints the expected time of each stage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ctp2mri.errors import InputError
from ctp2mri.io.atomic import atomic_path, ensure_writable_dir
from ctp2mri.progress import CancelToken, ProgressCallback
from ctp2mri.recipes.paper_plan import DEFAULT_UTILIZATION, format_plan, plan
from ctp2mri.recipes.paper_recipe import PaperRecipe, check_paper_data, paper_recipe

__all__ = ["train_paper"]


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
    from ctp2mri.training import PostTrainSettings, TrainSettings, post_train, train_autoencoder, train_ldm

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("train-demo runs in one process; for several GPUs run the per-stage torchrun commands that "
                         "`ctp2mri train-demo --recipe paper --data CASES --out WORK --plan --gpus N` prints")
    rec = paper_recipe(recipe, steps_scale)
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
    common = dict(precision=precision, seed=rec.seed, num_workers=rec.num_workers)
    small = rec.networks != "paper"  # the smoke recipe's networks (the paper grid either way)
    base_settings = TrainSettings(steps=rec.ldm_steps, batch_size=rec.ldm_batch, base_lr=rec.ldm_base_lr,
                                  ema_decay=rec.ema_decay, scale_factor=rec.scale_factor,
                                  checkpoint_every=min(every, rec.ldm_steps), **common)
    post_settings = PostTrainSettings(lambda_image=rec.lambda_image, lambda_lesion=rec.lambda_lesion,
                                      target=rec.target, init=rec.init, steps=rec.pt_steps, batch_size=rec.pt_batch,
                                      base_lr=rec.pt_base_lr, ema_decay=rec.ema_decay,
                                      checkpoint_every=min(every, rec.pt_steps), **common)
    ae = stage("autoencoder", rec.ae_steps, lambda resume: train_autoencoder(
        data, out / "autoencoder", profile="paper", steps=rec.ae_steps, batch_size=rec.ae_batch,
        base_lr=rec.ae_base_lr, disc_start=rec.ae_disc_start, disc_weight=rec.ae_disc_weight,
        codebook_weight=rec.ae_codebook_weight, resume=resume, checkpoint_every=min(every, rec.ae_steps),
        autoencoder_config=model_config(rec.networks, "autoencoder") if small else None,
        discriminator_config=model_config(rec.networks, "discriminator") if small else None,
        device=device, progress=_stage_progress(progress, "autoencoder"), cancel=cancel, **common))
    base = stage("base", rec.ldm_steps, lambda resume: train_ldm(
        data, ae, out / "cldm_base", base_settings, cldm_config=model_config(rec.networks, "cldm") if small else None,
        device=device, resume=resume, progress=_stage_progress(progress, "base cLDM"), cancel=cancel))
    post = stage("post_trained", rec.pt_steps, lambda resume: post_train(
        data, base, out / "cldm_post_trained", post_settings, device=device, resume=resume,
        progress=_stage_progress(progress, "post-training"), cancel=cancel))
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

"""``ctp2mri train-demo``: the one command that reproduces the bundled demo models.

Phantom data → VQGAN autoencoder → base cLDM (Eq. 4) → lesion-aware post-trained cLDM
(Eq. 8; the paper's λ_image 0.01, λ_lesion 0.02 by default, the demo recipe's own) → bundle
(weights without training state) → evaluation of base vs post-trained on the phantom's test
split with the same sampler, steps and seeds.

Every stage is a normal training run (its own folder, checkpoint, log.csv); a stage that
already reached its step count is skipped and an interrupted one resumes, so the command can
be re-run after a crash or Ctrl-C and continues where it stopped.

The demo recipe departs from the official (GPU) settings where a ~1-hour CPU budget forces
it, and says so in the model card:

- autoencoder: dead-code restarts every 25 steps (a short run otherwise collapses onto a few
  codes), learning rate 5e-4 instead of 4.5e-6 × batch, the adversarial term left off (the
  official run starts it at step 30 001, beyond this budget);
- cLDM and post-training: learning rates 5e-4 / 1e-4 instead of 2e-6 × batch (the official
  rate needs hundreds of thousands of steps), EMA decay 0.999 (0.9999 would still be
  averaging the initial weights after a few hundred steps), 0.995 for the demo recipe's
  1500 post-training steps;
- the demo recipe's post-training λs are 50× / 200× the paper's (λ_image 0.5, λ_lesion 4.0):
  its base objective holds the condition loss, against which the paper's λs hardly move the
  lesion (REPORT.md §D6, §D7); it adds the core term (λ_core 0.3, not in the paper), which holds
  the core that so strong a lesion term over-draws (REPORT.md §D9), and the case context (not in
  the paper), which tells every slice its case's lesion burden (REPORT.md §D12).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ctp2mri.checkpoints import read_config
from ctp2mri.errors import InputError
from ctp2mri.io.atomic import atomic_dir, atomic_path, ensure_writable_dir
from ctp2mri.io.jsonfile import strict_json
from ctp2mri.progress import CancelToken, ProgressCallback
from ctp2mri.recipes.reference_stage import ReferenceStage
from ctp2mri.settings import DWI_HI_MEDIAN, LAMBDA_IMAGE, LAMBDA_LESION

__all__ = ["RECIPES", "DemoRecipe", "bundle_checkpoint", "train_demo"]

BUNDLE_NAMES = {"autoencoder": "autoencoder", "base": "cldm_base", "post_trained": "cldm_post_trained",
                "reference": "reference_unet"}


@dataclass(frozen=True)
class DemoRecipe:
    """Every setting of the demo training, recorded in the model card (defaults: the v3 bundle's)."""

    cases: int = 160
    data_seed: int = 0
    ae_steps: int = 2000
    ae_batch: int = 8
    ae_lr: float = 5e-4
    codebook_restart: int = 25
    ae_lesion_oversample: float | None = 4.0  # lesion slices drawn this many times as often
    ae_lesion_weight: float = 0.0  # the autoencoder's L1 over lesion voxels (0: the official loss)
    ldm_steps: int = 4000
    ldm_batch: int = 16
    ldm_lr: float = 5e-4
    ldm_scale_factor: float | str = "auto"  # 1 / std of the VQ latents (see REPORT.md §2)
    ldm_lesion_oversample: float | None = 4.0
    condition: str = "rescaler"  # the cLDM's condition encoder: the paper's rescaler or "perfusion"
    loss_weighting: str = "uniform"  # Eq. 4 as the paper, or "min-snr"
    condition_loss_weight: float = 0.0  # the perfusion encoder's auxiliary heads (0: off)
    parameterization: str = "eps"  # or "z0-residual": the UNet refines the encoder's estimate
    lesion_latent_weight: float = 0.0  # Eq. 7 in latent space in the base objective (0: off)
    condition_lesion_weight: float = 1.0  # the condition loss's lesion-only term (0: a calibrated estimate)
    ema_decay: float = 0.999
    pt_ema_decay: float | None = None  # post-training's EMA decay (None: ema_decay)
    pt_steps: int = 600
    pt_batch: int = 8
    pt_lr: float = 1e-4
    lambda_image: float = LAMBDA_IMAGE
    lambda_lesion: float = LAMBDA_LESION
    lambda_core: float = 0.0  # post-training's core term, not in the paper (0: off)
    pt_case_context: bool = False  # post-training adds the case context (`ctp2mri.models.case_context`)
    target: str = "input"
    pt_lesion_oversample: float | None = 8.0
    reference_steps: int = 0  # the L1 U-Net reference regressor (0: none)
    reference_batch: int = 16
    eval_sampler: str = "dpm++2m"
    eval_steps: int = 20
    seed: int = 0
    dwi_hi_median: float | None = None  # the DWI anchor: upper bound × brain median (None: the 99.5 % quantile)


#: The levers that make the v4 bundle draw the infarct core (REPORT.md §D): the autoencoder's
#: lesion term, the learned perfusion encoder with lesion-aware heads, min-SNR weighting, the
#: predict-and-refine parameterization, Eq. 7 in latent space, and the L1 reference beside it.
V4_LEVERS = dict(ae_lesion_weight=0.3, condition="perfusion", loss_weighting="min-snr", condition_loss_weight=1.0,
                 parameterization="z0-residual", lesion_latent_weight=1.0)
#: v6 (REPORT.md §D6): the base keeps its estimate calibrated — no lesion-only regression terms,
#: whose ~50× weight on lesion elements drew the hypoperfused rim as core — and post-training,
#: as the paper has it, adds the lesion (λs 10× / 100× the paper's: the base objective's
#: condition loss is ≈ 0.5, against which the paper's λs hardly move the lesion), with an EMA
#: short enough to follow 600 steps.
V6_LEVERS = dict(V4_LEVERS, lesion_latent_weight=0.0, condition_lesion_weight=0.0, lambda_image=0.1,
                 lambda_lesion=2.0, pt_ema_decay=0.995)
#: v7 (REPORT.md §D7): λ_image 0.5 — the whole-image term holds the tissue around the lesion,
#: which λ_lesion alone darkens with it (tuning set: core Dice ≥ 5 ml 0.46 → 0.49, image MAE
#: and lesion AUC no worse; on the held-out set within what retraining alone moves).
V7_LEVERS = dict(V6_LEVERS, lambda_image=0.5)
#: v8 (REPORT.md §D9): the core term (λ_core 0.3, `ctp2mri.losses.core_loss`) holds the core
#: that Eq. 7 over-draws, so λ_lesion can rise to 4.0, and post-training runs 1500 steps, in
#: the time v7's recipe left over (core Dice ≥ 5 ml, tuning set 0.49 → 0.58, held-out 0.42 → 0.52).
V8_LEVERS = dict(V7_LEVERS, lambda_lesion=4.0, lambda_core=0.3, pt_steps=1500)
#: v9 (REPORT.md §D12): post-training adds the case context (`ctp2mri.models.case_context`), so
#: slices away from a large lesion draw their case's DWI level (held-out rDWI 1.17 → 1.20).
V9_LEVERS = dict(V8_LEVERS, pt_case_context=True)

RECIPES: dict[str, DemoRecipe] = {
    # what resources/models/demo (v9) was trained with (REPORT.md §D12, the times in recipe.json):
    # phantom 2.0, the v3 data and sampling, the levers above; the reference U-Net trains in a
    # second process beside the base cLDM, one thread each, for a quarter of v6's steps.
    "demo": DemoRecipe(ldm_steps=3000, reference_steps=2000, **V9_LEVERS),
    # v8 (REPORT.md §D9 history): the same without the case context
    "demo-v8": DemoRecipe(ldm_steps=3000, reference_steps=2000, **V8_LEVERS),
    # v8's recipe with DWI anchored on normal tissue (`ctp2mri.settings.DWI_HI_MEDIAN`) at every
    # stage: measured and not bundled (REPORT.md §D10: held-out core Dice ≥ 5 ml 0.44, rDWI 0.16 low)
    "demo-dwi-anchor": DemoRecipe(ldm_steps=3000, reference_steps=2000, **V8_LEVERS, dwi_hi_median=DWI_HI_MEDIAN),
    # v7 (REPORT.md §D7 history): the same up to post-training, which ran 600 steps with
    # λ_lesion 2.0 and no core term; the whole recipe took 65 minutes on two cores.
    "demo-v7": DemoRecipe(ldm_steps=3000, reference_steps=2000, **V7_LEVERS),
    # v6 (REPORT.md §D6 history): λ_image 0.1 and the 8000-step reference (estimated at ≈ 98
    # minutes from v4–v6's step times; never run from scratch in one go)
    "demo-v6": DemoRecipe(ldm_steps=3000, reference_steps=8000, **V6_LEVERS),
    # v4 and v5 (REPORT.md §D1–D5 history; v5 on the fixed ADC window)
    "demo-v5": DemoRecipe(ldm_steps=3000, reference_steps=8000, **V4_LEVERS),
    # the v4 recipe with the paper's condition and objective: the rescaler, Eq. 4 (REPORT.md §D)
    "demo-paper": DemoRecipe(ldm_steps=3000),
    # ~1 h 20 min on a 2-core CPU: the third bundle (v3, REPORT.md §A–C history). 160 cases
    # (25 training lesions over 7 ml, against 3 in v2's 32) and lesion slices drawn more often
    # at every stage: v2's autoencoder, trained without either, erased the ADC lesion (REPORT.md §C).
    "demo-v3": DemoRecipe(),
    # the second bundle (v2, REPORT.md §1–5 history): 32 cases, uniform draws, 1000/5000/300 steps
    "demo-v2": DemoRecipe(cases=32, ae_steps=1000, ae_lesion_oversample=None, ldm_steps=5000,
                          ldm_lesion_oversample=None, pt_steps=300, pt_lesion_oversample=None),
    # seconds: exercises the whole pipeline (tests, a smoke run); the models are useless.
    "smoke": DemoRecipe(cases=5, ae_steps=3, ae_batch=2, codebook_restart=2, ldm_steps=3, ldm_batch=2,
                        pt_batch=2, eval_steps=2, reference_steps=2, reference_batch=2,
                        **{**V9_LEVERS, "pt_steps": 2}),
}


def _stage_done(run: Path, steps: int) -> bool | None:
    """True: finished; False: interrupted (resume it); None: not started."""
    if not (run / "config.json").is_file():
        return None
    done = int(read_config(run).get("provenance", {}).get("steps", 0))
    return done >= steps


def bundle_checkpoint(run: str | os.PathLike, dest: str | os.PathLike, networks: list[str],
                      overwrite: bool = True) -> Path:
    """Copy a training run's checkpoint to ``dest`` with only ``networks`` (no optimiser state).

    The bundle is what ships: config.json (its ``networks`` cut down to those kept) and one
    safetensors file per kept network, plus the run's log.csv for provenance. Written atomically.
    """
    run, dest = Path(run), Path(dest)
    config = read_config(run)
    missing = [n for n in networks if n not in config.get("networks", {})]
    if missing:
        raise InputError(f"{run} holds no network(s) {missing}; it has {sorted(config.get('networks', {}))}")
    config["networks"] = {n: config["networks"][n] for n in networks}
    config.pop("training_state", None)
    with atomic_dir(dest, overwrite=overwrite) as tmp:
        for name in networks:
            shutil.copyfile(run / f"{name}.safetensors", tmp / f"{name}.safetensors")
        if (run / "log.csv").is_file():
            shutil.copyfile(run / "log.csv", tmp / "log.csv")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dest


def _threads() -> int:
    """The phantom stage's processes: the threads the training stages get (``--threads``)."""
    import torch

    return max(1, torch.get_num_threads())


def _base_objective(rec: DemoRecipe) -> dict[str, Any]:
    """The base cLDM's condition and objective settings (nothing for the paper's: older runs resume)."""
    if (rec.condition == "rescaler" and rec.loss_weighting == "uniform" and not rec.condition_loss_weight
            and rec.parameterization == "eps" and not rec.lesion_latent_weight):
        return {}
    return {"condition": rec.condition, "loss_weighting": rec.loss_weighting,
            "condition_loss_weight": rec.condition_loss_weight, "parameterization": rec.parameterization,
            "lesion_latent_weight": rec.lesion_latent_weight, "condition_lesion_weight": rec.condition_lesion_weight}


def _stage_progress(progress: ProgressCallback | None, stage: str) -> ProgressCallback | None:
    if progress is None:
        return None

    def report(step: int, total: int, info: dict[str, Any]) -> None:
        progress(step, total, {"stage": stage, **info})

    return report


def stage_runner(out: Path, say: Callable[[str], None]) -> tuple[dict[str, float], Callable[..., Any],
                                                                 Callable[..., Path]]:
    """A recipe's ``timings.json``, ``timed(name, fn)`` — runs ``fn`` and adds its wall time to
    ``name`` (a resumed stage accumulates), rewriting the file atomically — and ``stage(name,
    steps, run_fn)``: skips a finished run in ``out``, else trains or resumes it, timed."""
    path = out / "timings.json"
    timings: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 1)
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(timings, indent=2) + "\n")
        return result

    def stage(name: str, steps: int, run_fn: Callable[[bool], Path]) -> Path:
        run = out / BUNDLE_NAMES[name]
        state = _stage_done(run, steps)
        if state:
            say(f"{name}: done ({steps} steps) in {run}")
            return run
        say(f"{name}: {'resuming' if state is False else 'training'} {steps} steps → {run}")
        return timed(name, lambda: run_fn(state is False))

    return timings, timed, stage


def train_demo(out: str | os.PathLike, recipe: str | DemoRecipe = "demo", bundle: str | os.PathLike | None = None,
               device: str = "cpu", evaluate_models: bool = True,
               progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
               on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the demo recipe in the work folder ``out``; copy the models to ``bundle``.

    Parameters
    ----------
    out
        Work folder: ``data/`` (phantom), ``autoencoder/``, ``cldm_base/``, ``cldm_post_trained/``
        (full training runs, resumable), ``evaluation/`` (CSV and tables), ``timings.json``.
    recipe
        A name of `RECIPES` or a `DemoRecipe`.
    bundle
        Folder receiving the shippable checkpoints (e.g. ``resources/models/demo``); None: none.
    device
        Training and evaluation device (the recipe's times are for ``cpu``).
    evaluate_models
        Evaluate base and post-trained on the test split (same sampler, steps, seeds) and write
        ``evaluation/{per_case.csv,table.md,summary.json}``.
    progress, cancel
        ``progress(step, total, {"stage": …})`` per training step; cancel stops after saving
        the running stage's checkpoint (re-run to continue).
    on_stage
        Called with a line of text when a stage starts or is skipped (the CLI prints it).

    Returns
    -------
    ``{"recipe", "paths", "timings_s", "summary"}``.
    """
    from ctp2mri.phantom import generate_dataset
    from ctp2mri.training import PostTrainSettings, TrainSettings, post_train, train_autoencoder, train_ldm

    rec = RECIPES[recipe] if isinstance(recipe, str) else recipe
    if isinstance(recipe, str) and recipe not in RECIPES:
        raise InputError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    out = ensure_writable_dir(Path(out))
    say = on_stage or (lambda _text: None)
    timings, timed, stage = stage_runner(out, say)

    data = out / "data"
    if (data / "splits.json").is_file():
        say(f"phantom data: reusing {data}")
    else:
        say(f"phantom data: {rec.cases} cases (seed {rec.data_seed}) → {data}")
        timed("phantom", lambda: generate_dataset(data, rec.cases, seed=rec.data_seed, profile="demo",
                                                   overwrite=True, cancel=cancel, workers=_threads()))

    ae = stage("autoencoder", rec.ae_steps, lambda resume: train_autoencoder(
        data, out / "autoencoder", profile="demo", steps=rec.ae_steps, batch_size=rec.ae_batch, lr=rec.ae_lr,
        disc_start=rec.ae_steps + 1, codebook_restart=rec.codebook_restart,
        lesion_oversample=rec.ae_lesion_oversample, lesion_weight=rec.ae_lesion_weight, dwi_hi_median=rec.dwi_hi_median,
        device=device, resume=resume,
        seed=rec.seed, checkpoint_every=max(1, rec.ae_steps // 4), num_workers=0,
        progress=_stage_progress(progress, "autoencoder"), cancel=cancel))
    # The reference regressor trains beside the base cLDM, in its own process on the other core,
    # which the base takes back when the reference is done (sequentially, when the base is on
    # a GPU or the reference is done).
    base_settings = TrainSettings(
        steps=rec.ldm_steps, batch_size=rec.ldm_batch, lr=rec.ldm_lr, ema_decay=rec.ema_decay,
        scale_factor=rec.ldm_scale_factor, lesion_oversample=rec.ldm_lesion_oversample, seed=rec.seed,
        checkpoint_every=max(1, rec.ldm_steps // 4), num_workers=0, **_base_objective(rec))
    post_settings = PostTrainSettings(
        lambda_image=rec.lambda_image, lambda_lesion=rec.lambda_lesion, lambda_core=rec.lambda_core,
        target=rec.target, steps=rec.pt_steps,
        batch_size=rec.pt_batch, lr=rec.pt_lr,
        ema_decay=rec.ema_decay if rec.pt_ema_decay is None else rec.pt_ema_decay,
        lesion_oversample=rec.pt_lesion_oversample, seed=rec.seed, checkpoint_every=max(1, rec.pt_steps // 3),
        num_workers=0, case_context=getattr(rec, "pt_case_context", False))
    reference = None
    if rec.reference_steps:
        ref_run = out / BUNDLE_NAMES["reference"]
        reference = ReferenceStage(ref_run, _stage_done(ref_run, rec.reference_steps), data, asdict(rec), device, say,
                                   timings, timed)
    if reference is not None:
        reference.start()
    # while the reference trains, each step of the base (and post-training) polls it
    watch = reference.watch if reference is not None else (lambda callback: callback)
    try:
        base = stage("base", rec.ldm_steps, lambda resume: train_ldm(
            data, ae, out / "cldm_base", base_settings, device=device, resume=resume,
            progress=watch(_stage_progress(progress, "base cLDM")), cancel=cancel))
        post = stage("post_trained", rec.pt_steps, lambda resume: post_train(
            data, base, out / "cldm_post_trained", post_settings, device=device, resume=resume,
            progress=watch(_stage_progress(progress, "post-training")), cancel=cancel))
    except BaseException:
        if reference is not None:
            reference.abort()  # the child keeps its last checkpoint: a rerun resumes it
        raise
    paths = {"data": data, "autoencoder": ae, "base": base, "post_trained": post}
    if reference is not None:
        paths["reference"] = reference.result()

    if bundle is not None:
        bundle = ensure_writable_dir(Path(bundle))
        say(f"bundle: copying weights (no optimiser state) → {bundle}")
        for key, networks in (("autoencoder", ["model"]), ("base", ["ema", "autoencoder"]),
                              ("post_trained", ["ema", "autoencoder"]), ("reference", ["model"])):
            if key in paths:
                bundle_checkpoint(paths[key], bundle / BUNDLE_NAMES[key], networks)
        paths["bundle"] = bundle

    summary = None
    if evaluate_models:
        summary = timed("evaluation", lambda: _evaluate(paths, out / "evaluation", rec, device, progress, cancel, say))
    with atomic_path(out / "recipe.json") as tmp:
        Path(tmp).write_text(json.dumps({"recipe": asdict(rec), "timings_s": timings}, indent=2) + "\n")
    return {"recipe": asdict(rec), "paths": {k: str(v) for k, v in paths.items()}, "timings_s": timings,
            "summary": summary}


def _evaluate(paths: dict[str, Path], folder: Path, rec: DemoRecipe, device: str,
              progress: ProgressCallback | None, cancel: CancelToken | None,
              say: Callable[[str], None], max_cases: int | None = None) -> dict[str, Any]:
    from ctp2mri.evaluation.evaluate import evaluate
    from ctp2mri.evaluation.report import format_report
    from ctp2mri.evaluation.tables import format_table1

    folder = ensure_writable_dir(folder)
    say(f"evaluation: base vs post-trained on the test split, {rec.eval_sampler} {rec.eval_steps} steps, seed {rec.seed}")
    core = getattr(rec, "lambda_core", 0.0)  # the paper's recipes (PaperRecipe) have no core term
    models = {"cLDM (base)": paths["base"],
              f"cLDM-PT (λ_image {rec.lambda_image:g}, λ_lesion {rec.lambda_lesion:g}"
              + (f", λ_core {core:g})" if core else ")"): paths["post_trained"]}
    if "reference" in paths:
        models["U-Net (L1), reference"] = paths["reference"]
    rows, summary = evaluate(models, paths["data"], split="test", n_steps=rec.eval_steps, seed=rec.seed,
                             device=device, out_csv=folder / "per_case.csv", sampler=rec.eval_sampler,
                             figure=folder / "test_slices.png", max_cases=max_cases,
                             progress=_stage_progress(progress, "evaluation"), cancel=cancel)
    text = format_report(summary, rows, n_steps=rec.eval_steps, eta=0.0, seed=rec.seed, split="test")
    for name, content in (("report.txt", text + "\n"), ("table1.md", format_table1(summary) + "\n"),
                          ("summary.json", strict_json(summary))):
        with atomic_path(folder / name) as tmp:
            Path(tmp).write_text(content)
    say(text)
    return summary


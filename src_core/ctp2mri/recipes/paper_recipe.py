"""The paper recipe's hyper-parameters (`PaperRecipe`) and the check of the data it trains on.

`ctp2mri.recipes.train_paper` runs the recipe; `ctp2mri.recipes.paper_plan` estimates its time
and prints its per-stage ``torchrun`` commands.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ctp2mri.errors import InputError
from ctp2mri.settings import AE_BASE_LR, EMA_DECAY, LAMBDA_IMAGE, LAMBDA_LESION, LDM_BASE_LR

__all__ = ["PAPER_RECIPES", "PaperRecipe", "check_paper_data", "paper_recipe"]


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
    ae_base_lr: float = AE_BASE_LR  # official (→ 1.8e-5 at batch 4 on one GPU)
    ae_disc_start: int = 30_001  # official: the PatchGAN loss starts at this step
    ae_disc_weight: float = 0.2  # official
    ae_codebook_weight: float = 1.0  # official
    # base cLDM: UNet 224·[1, 4, 8], attention at 1/2 and 1/4 latent resolution, rescaler condition
    ldm_steps: int = 100_000  # ours: the paper stops on the validation loss; ≈ 340 passes over its 14 083 slices
    ldm_batch: int = 48  # paper ("batch size of 48") and official
    ldm_base_lr: float = LDM_BASE_LR  # paper ("base learning rate of 2 × 10⁻⁶", AdamW) and official (→ 9.6e-5)
    ema_decay: float = EMA_DECAY  # official (the EMA's default decay)
    scale_factor: float = 1.0  # official (VQ-f4 latents are diffused unscaled)
    timesteps: int = 1000  # paper (T = 1000); β linear 0.0015 → 0.0195 official (the trainers' default schedule)
    # lesion-aware post-training (Eq. 8), from the base's weights
    pt_steps: int = 20_000  # ours: neither states a count
    pt_batch: int = 6  # official post-training config (the paper's 48 is its base training's)
    pt_base_lr: float = LDM_BASE_LR  # paper and official (→ 1.2e-5 at batch 6)
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


def paper_recipe(recipe: str | PaperRecipe, steps_scale: float = 1.0) -> PaperRecipe:
    """The recipe named ``recipe`` (a key of `PAPER_RECIPES`) or given, its steps × ``steps_scale``."""
    if isinstance(recipe, str) and recipe not in PAPER_RECIPES:
        raise InputError(f"unknown paper recipe {recipe!r}; choose one of {sorted(PAPER_RECIPES)}")
    return (PAPER_RECIPES[recipe] if isinstance(recipe, str) else recipe).scaled(steps_scale)


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

"""How well a cLDM's own perfusion encoder finds the infarct core, without sampling (a probe, not a test).

    .venv/bin/python scripts/probe_lesion_head.py --model demo --data HELDOUT --thresholds 0.9,0.98

The demo models' perfusion encoder has a lesion head (a logit per latent voxel, trained with a
class-balanced BCE, docs/models.md). For every case folder of ``--data`` that has a lesion, this
upsamples the head's probability to the slice grid (bilinear), thresholds it inside the brain and
prints the Dice against the lesion mask: the mean over lesion cases and over lesions of at least
``--min-ml``. No components are removed, unlike the synthetic-ADC core of ``ctp2mri evaluate``.
REPORT.md §D4 compares it with the synthetic-ADC and the perfusion core; pick the threshold on a
tuning set, never on the cases you report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from ctp2mri.case_slices import normalisation_of
from ctp2mri.casefolder import is_case_folder, read_case
from ctp2mri.errors import InputError
from ctp2mri.evaluation.lesion_metrics import dice, volume_ml
from ctp2mri.evaluation.scoring import normalise_for_model
from ctp2mri.synthesis.lesion_head import has_lesion_head, lesion_probability
from ctp2mri.synthesis.loading import load_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="cLDM checkpoint folder or bundled name (demo, demo-base)")
    parser.add_argument("--data", required=True, help="folder of case folders (e.g. ctp2mri phantom --out …)")
    parser.add_argument("--thresholds", default="0.5,0.9,0.95,0.98,0.99", help="comma-separated probabilities")
    parser.add_argument("--min-ml", type=float, default=5.0, help="the large-lesion subset (default 5 ml)")
    args = parser.parse_args(argv)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    model = load_model(args.model, device="cpu")
    if not has_lesion_head(model):
        raise InputError(f"{args.model} has no perfusion encoder with a lesion head (trained with --condition "
                         "perfusion and --condition-loss)")
    folders = sorted(p for p in Path(args.data).iterdir() if is_case_folder(p))
    scores: dict[float, list[tuple[float, float]]] = {t: [] for t in thresholds}  # (dice, lesion ml)
    for folder in folders:
        case = read_case(folder, require=("ctp", "mask", "lesion"))
        part = normalise_for_model(case, folder.name, model.profile, "model", **normalisation_of(model.normalisation))
        lesion = part.lesion[:, 0].astype(bool)
        if not lesion.any():
            continue
        ml = volume_ml(lesion, case.ctp.spacing)
        prob = lesion_probability(model, torch.from_numpy(np.asarray(part.cond, np.float32))) * part.brain[:, 0]
        for t in thresholds:
            scores[t].append((dice(prob > t, lesion), ml))
    if not any(scores.values()):
        raise InputError(f"no case folder with a lesion in {args.data}")
    print(f"{args.model} on {args.data}: lesion head, Dice over {len(scores[thresholds[0]])} lesion cases "
          f"/ lesions >= {args.min_ml:g} ml")
    for t in thresholds:
        large = [d for d, ml in scores[t] if ml >= args.min_ml]
        print(f"  p > {t:g}: {np.mean([d for d, _ in scores[t]]):.3f} / "
              f"{np.mean(large) if large else float('nan'):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

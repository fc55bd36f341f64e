"""Base vs post-trained on the same cases: the check after a post-training run.

`before_after` scores both models on the same cases with `ctp2mri.evaluation.evaluate.evaluate`
(every brain slice, DDIM with η = 0, the same per-slice noise for both, so the difference is
the models'); `metric_rows` lays the means out as a small table: lesion MAEs first (what
post-training targets), the lesion contrasts (is the lesion drawn at all), then the image
metrics and the core Dice. The napari post-training widget shows that table; the post-train
pipeline (`ctp2mri.evaluation.post_train_compare`) makes it.

The evaluation is imported when called: the viewer's process imports this module for
`metric_rows` while models are trained and scored in a child process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ctp2mri.progress import CancelToken, ProgressCallback

if TYPE_CHECKING:
    from ctp2mri.data import CaseSource

__all__ = ["BASE_LABEL", "NEW_LABEL", "ROW_CONTRASTS", "ROW_METRICS", "before_after", "format_metric_rows",
           "metric_rows"]

BASE_LABEL, NEW_LABEL = "base", "post-trained"  # the two models' names in the rows
# (row label, evaluate() column, lower is better): lesion terms first, what post-training targets
ROW_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("Lesion MAE DWI", "DWI_lesion_mae", True),
    ("Lesion MAE ADC", "ADC_lesion_mae", True),
    ("MAE DWI", "DWI_mae", True),
    ("MAE ADC", "ADC_mae", True),
    ("PSNR DWI (dB)", "DWI_psnr", False),
    ("PSNR ADC (dB)", "ADC_psnr", False),
    ("Core Dice", "core_dice", False),
)
# (row label, evaluate() column): rDWI / rADC, better when closer to the ground truth's
ROW_CONTRASTS: tuple[tuple[str, str], ...] = (
    ("Lesion contrast DWI", "DWI_lesion_contrast"),
    ("Lesion contrast ADC", "ADC_lesion_contrast"),
)


def before_after(base: str | os.PathLike, new: str | os.PathLike, cases: Sequence[CaseSource], *,
                 n_steps: int = 10, seed: int = 0, batch_size: int = 16, device: str = "auto",
                 progress: ProgressCallback | None = None,
                 cancel: CancelToken | None = None) -> list[dict[str, Any]]:
    """Score the base and the post-trained model on the same cases.

    Parameters
    ----------
    base, new
        Checkpoint folders (or bundled model names) of the base and the post-trained model.
    cases
        Case folders and/or in-memory `ctp2mri.casefolder.Case` objects (a painted lesion as
        it is now), scored as they are.
    n_steps, seed, batch_size, device
        DDIM steps (η = 0), run seed, slices per batch and device of `evaluate`.
    progress, cancel
        ``progress(done, total, info)`` in slice-steps of the whole check (``info`` as
        `evaluate`'s: ``case``, ``model``, ``cases_done``, ``cases_total``); cancel raises
        `ctp2mri.errors.Cancelled` before the next DDIM step.

    Returns
    -------
    list of dict
        `evaluate`'s rows, case by case, the base's (``model`` `BASE_LABEL`) before the
        post-trained one's (`NEW_LABEL`).
    """
    from ctp2mri.evaluation.evaluate import evaluate

    rows, _ = evaluate({BASE_LABEL: base, NEW_LABEL: new}, list(cases), n_steps=n_steps, seed=seed,
                       batch_size=batch_size, device=device, progress=progress, cancel=cancel)
    return rows


def metric_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean over cases of the lesion and image metrics, base vs post-trained.

    The lesion contrasts (rDWI, rADC: is the painted lesion drawn at all) follow the lesion
    MAEs; their label gives the ground truth's value, and closer to it is better.

    Returns
    -------
    list of dict
        ``label``, ``key``, ``base``, ``new`` (means, NaN where no case has a value, e.g. lesion
        MAE without lesion), ``change`` (new − base), ``better`` (True/False, None if NaN or
        unchanged) and ``digits`` to show.
    """
    from ctp2mri.evaluation.tables import summarise

    summary = summarise(rows)

    def mean(model: str, key: str) -> float:
        return summary.get(model, {}).get(key, {}).get("mean", math.nan)

    out = []
    for label, key, lower_is_better in ROW_METRICS:
        base, new = mean(BASE_LABEL, key), mean(NEW_LABEL, key)
        change = new - base
        better = None if not math.isfinite(change) or change == 0 else (change < 0) == lower_is_better
        out.append({"label": label, "key": key, "base": base, "new": new, "change": change,
                    "better": better, "digits": 2 if "psnr" in key else 4})
        if key == "ADC_lesion_mae":
            out += [_contrast_row(c_label, c_key, mean) for c_label, c_key in ROW_CONTRASTS]
    return out


def _contrast_row(label: str, key: str, mean: Callable[[str, str], float]) -> dict[str, Any]:
    base, new, true = mean(BASE_LABEL, key), mean(NEW_LABEL, key), mean(BASE_LABEL, f"{key}_true")
    change = new - base
    gaps = abs(new - true), abs(base - true)
    better = None if not all(map(math.isfinite, (*gaps, change))) or gaps[0] == gaps[1] else gaps[0] < gaps[1]
    shown = f"{label} (true {true:.2f})" if math.isfinite(true) else label
    return {"label": shown, "key": key, "base": base, "new": new, "change": change,
            "better": better, "digits": 3}


def format_metric_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    """`metric_rows` as a plain-text table (what ``ctp2mri post-train --compare`` prints)."""
    verdict = {True: "better", False: "worse", None: ""}
    lines = [f"{'':<22} {'base':>10} {'post-trained':>13} {'change':>10}"]
    for row in rows:
        digits = row["digits"]
        lines.append(f"{row['label']:<22} {row['base']:>10.{digits}f} {row['new']:>13.{digits}f} "
                     f"{row['change']:>+10.{digits}f}  {verdict[row['better']]}".rstrip())
    return "\n".join(lines)

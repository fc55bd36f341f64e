"""Post-train a model on a few cases, then score it against its base on those cases.

The annotate → post-train → check loop of the napari post-training widget (its child process,
`ctp2mri.training.child`) and of ``ctp2mri post-train --compare``: the training set is case
folders and/or in-memory cases (a lesion painted in the viewer), augmented as `post_train`
augments a data folder's ``train`` split, on the base model's grid; post-training is
`ctp2mri.training.post_train.post_train` (a cLDM or a cBBDM base); the check is
`ctp2mri.evaluation.before_after.before_after` on the same cases, with few DDIM steps: a quick
look at what the run changed, not Table 1.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ctp2mri.bundled import resolve_model
from ctp2mri.case_slices import normalisation_of
from ctp2mri.checkpoints import read_config
from ctp2mri.data import CaseSource, SliceDataset
from ctp2mri.errors import Cancelled, InputError
from ctp2mri.evaluation.before_after import before_after
from ctp2mri.progress import CancelToken, ProgressCallback
from ctp2mri.training.loop import prepare_out_dir
from ctp2mri.training.post_train import PostTrainSettings, post_train

__all__ = ["PhaseProgress", "PostTrainComparison", "post_train_and_compare"]

# progress(phase, step, total, info); phase "data" (cases read), "train" (post-training steps),
# "eval" (slice-steps of the before/after check)
PhaseProgress = Callable[[str, int, int, dict[str, Any]], None]


@dataclass
class PostTrainComparison:
    """What `post_train_and_compare` did.

    Attributes
    ----------
    out
        The post-trained checkpoint (and run) folder.
    steps
        Post-training steps asked for (the run's total, a resumed run's included).
    seconds
        Wall time of the whole call.
    rows
        `ctp2mri.evaluation.before_after.before_after` rows (`metric_rows` tabulates them); None
        when no comparison was asked for, or it was cancelled.
    note
        Why there are no rows though a comparison was asked for (``"metrics cancelled"``).
    """

    out: Path
    steps: int
    seconds: float
    rows: list[dict[str, Any]] | None
    note: str = ""


def _phase(progress: PhaseProgress | None, phase: str) -> ProgressCallback | None:
    if progress is None:
        return None

    def report(step: int, total: int, info: dict[str, Any]) -> None:
        progress(phase, step, total, info)

    return report


def post_train_and_compare(base: str | os.PathLike, out: str | os.PathLike, sources: Sequence[CaseSource],
                           settings: PostTrainSettings | None = None, *, device: str = "auto", resume: bool = False,
                           compare_steps: int | None = 10, progress: PhaseProgress | None = None,
                           cancel: CancelToken | None = None) -> PostTrainComparison:
    """Post-train ``base`` on ``sources`` into ``out``, then score base vs post-trained on them.

    Parameters
    ----------
    base
        Checkpoint folder of a cLDM or cBBDM (or a bundled model's name).
    out
        Run folder: new or empty, or, with ``resume``, a run saved before (checked before the
        cases are read).
    sources
        The training set: case folders and/or in-memory `ctp2mri.casefolder.Case` objects
        (``ctp2mri.data.resolve_cases(folder, "train")`` gives a data folder's training split).
    settings
        A `ctp2mri.training.post_train.PostTrainSettings` (None: its defaults); its ``seed``
        also seeds the augmentation and the comparison's noise. The slices are in memory, so
        no data-loading workers are started (``num_workers`` 0).
    device, resume
        As `post_train`.
    compare_steps
        DDIM steps of the before/after check on the training cases; None or 0: no check.
    progress, cancel
        ``progress(phase, step, total, info)`` (see `PhaseProgress`). A cancel during
        post-training saves a resumable checkpoint and raises `ctp2mri.errors.Cancelled`; during
        the check, the trained model is kept and the result says ``"metrics cancelled"``.

    Raises
    ------
    InputError
        The output folder is not empty (or holds no run to resume), the training set is empty,
        the base is not a post-trainable checkpoint, a case is off its grid or lacks a lesion
        mask that λ_lesion > 0 needs.
    """
    started = time.perf_counter()
    settings = replace(settings or PostTrainSettings(), num_workers=0)
    out = prepare_out_dir(out, resume)  # a full folder fails now, not after the data
    if not sources:
        raise InputError("the training set is empty: give at least one case folder or case to post-train on")
    base = resolve_model(base)
    # augmented as post_train augments a data folder's train split, on the base model's grid
    base_cfg = read_config(base)
    dataset = SliceDataset(list(sources), profile=base_cfg["profile"], augment=True, seed=settings.seed,
                           require_lesion=settings.lambda_lesion > 0, progress=_phase(progress, "data"),
                           cancel=cancel, **normalisation_of(base_cfg.get("normalisation")))
    post_train(dataset, base, out, settings, device=device, resume=resume, progress=_phase(progress, "train"),
               cancel=cancel)
    rows, note = None, ""
    if compare_steps:
        try:
            rows = before_after(base, out, sources, n_steps=int(compare_steps), seed=settings.seed, device=device,
                                progress=_phase(progress, "eval"), cancel=cancel)
        except Cancelled:  # the model is trained and saved; only the check was stopped
            note = "metrics cancelled"
    return PostTrainComparison(out, settings.steps, time.perf_counter() - started, rows, note)

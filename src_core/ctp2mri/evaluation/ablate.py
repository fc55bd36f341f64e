"""`ctp2mri ablate`: the λ grid of the paper's Table 2 — post-train a base cLDM once per
(λ_image, λ_lesion) pair, then evaluate all of them on the same cases with the same sampler
and seeds, and write a CSV and a Markdown table shaped like Table 2.

The paper's (0, 0) row is the base cLDM itself (its numbers equal Table 1's cLDM row), so by
default that pair is the base checkpoint, evaluated as is; ``zero_as_base=False`` instead
post-trains it with Eq. 4 alone for the same steps (a control for "more steps" rather than
"image-space terms").
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ctp2mri.bundled import resolve_model
from ctp2mri.errors import InputError
from ctp2mri.evaluation.evaluate import evaluate
from ctp2mri.evaluation.metrics import METRICS
from ctp2mri.evaluation.report import CHANNELS, write_rows
from ctp2mri.evaluation.tables import format_table1
from ctp2mri.io.atomic import atomic_path, ensure_writable_dir
from ctp2mri.progress import CancelToken, ProgressCallback

__all__ = ["PAPER_GRID", "ablate", "format_table2", "pair_label", "parse_grid"]

# (λ_image, λ_lesion) of the paper's Table 2, in its row order
PAPER_GRID: tuple[tuple[float, float], ...] = (
    (0.0, 0.0), (0.01, 0.0), (0.01, 0.01), (0.01, 0.02), (0.01, 0.05), (0.05, 0.0),
    (0.05, 0.1), (0.05, 0.2), (0.1, 0.0), (0.1, 0.1), (0.1, 0.2),
)


def pair_label(lambda_image: float, lambda_lesion: float) -> str:
    """Model label and run-folder name of one pair, e.g. ``li0.01_ll0.02``."""
    return f"li{lambda_image:g}_ll{lambda_lesion:g}"


def parse_grid(text: str) -> tuple[tuple[float, float], ...]:
    """``"paper"`` or pairs such as ``"0.01:0.02,0.05:0"`` (λ_image:λ_lesion, comma separated)."""
    if text.strip().lower() == "paper":
        return PAPER_GRID
    pairs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            li, ll = (float(v) for v in item.split(":"))
        except ValueError:
            raise InputError(f"cannot read the λ pair {item!r}; write λ_image:λ_lesion, e.g. 0.01:0.02, "
                             "pairs separated by commas, or 'paper'") from None
        pairs.append((li, ll))
    return _check_grid(pairs)


def _check_grid(grid: Sequence[Sequence[float]]) -> tuple[tuple[float, float], ...]:
    pairs = tuple((float(li), float(ll)) for li, ll in grid)
    if not pairs:
        raise InputError("the λ grid is empty; give at least one λ_image:λ_lesion pair, or 'paper'")
    for li, ll in pairs:
        if not all(math.isfinite(v) and v >= 0 for v in (li, ll)):
            raise InputError(f"λ values must be finite numbers ≥ 0, got ({li}, {ll})")
    labels = [pair_label(*p) for p in pairs]
    if len(set(labels)) != len(labels):
        raise InputError(f"the λ grid repeats a pair: {labels}")
    return pairs


def _finished(run_dir: Path, steps: int) -> bool:
    """A post-training run folder that already holds a checkpoint of ``steps`` steps."""
    from ctp2mri.checkpoints import read_config

    try:
        config = read_config(run_dir)
    except (InputError, OSError):
        return False
    return (config.get("provenance") or {}).get("steps") == steps and "post_training" in config


def _staged(progress: ProgressCallback | None, stage: str) -> ProgressCallback | None:
    if progress is None:
        return None
    return lambda step, total, info: progress(step, total, {**info, "stage": stage})


def ablate(base: str | os.PathLike, data: str | os.PathLike, out_dir: str | os.PathLike,
           grid: Sequence[Sequence[float]] = PAPER_GRID, steps: int = 1000, *, target: str = "input",
           batch_size: int = 16, eval_steps: int = 200, eval_batch_size: int = 16, split: str = "test",
           seed: int = 0, device: str = "auto", precision: str = "fp32", zero_as_base: bool = True,
           max_cases: int | None = None, post_train_options: Mapping[str, Any] | None = None,
           progress: ProgressCallback | None = None, cancel: CancelToken | None = None) -> list[dict[str, Any]]:
    """Post-train ``base`` for every (λ_image, λ_lesion) of ``grid`` and evaluate them all.

    Parameters
    ----------
    base
        Trained cLDM checkpoint folder.
    data
        Data folder with ``splits.json``: post-training uses its ``train`` split, evaluation
        ``split``.
    out_dir
        Output folder: ``runs/<label>/`` (one post-training checkpoint per pair; a run already
        finished with the same ``steps`` is reused, so an interrupted grid continues),
        ``ablation_cases.csv`` (per case and pair), ``table2.csv`` and ``table2.md``.
    grid
        (λ_image, λ_lesion) pairs; `PAPER_GRID` is Table 2's, `parse_grid` reads the CLI form.
    steps, target, batch_size, precision, post_train_options
        Post-training settings (`ctp2mri.training.post_train`; extra keyword arguments in
        ``post_train_options``). Every pair uses the same seed.
    eval_steps, eval_batch_size, split, max_cases
        Evaluation settings (`ctp2mri.evaluation.evaluate.evaluate`): DDIM steps (paper 200), slices per
        batch, split, optional case limit. All pairs are sampled with the same seeds.
    seed, device
        Seed of post-training and sampling; device spec.
    zero_as_base
        The (0, 0) pair is the base model itself, as in the paper; False post-trains it with
        Eq. 4 alone.
    progress, cancel
        ``progress(step, total, info)`` per stage (``info["stage"]`` names it); cancel stops
        after the current run's checkpoint (rerun to continue) or before any file of the
        evaluation is written.

    Returns
    -------
    One row per pair in grid order: ``lambda_image``, ``lambda_lesion``, ``model`` (label),
    ``checkpoint``, ``n_cases`` and ``{DWI,ADC}_{mae,lesion_mae,psnr,ms_ssim}_{mean,std}``,
    as written to table2.csv.
    """
    from ctp2mri.training.post_train import TARGETS, post_train

    if target not in TARGETS:
        raise InputError(f"unknown post-training target {target!r}; choose one of {', '.join(TARGETS)}")
    pairs = _check_grid(grid)
    base = resolve_model(base)  # a bundled model's name, as every --model/--from accepts
    out = Path(out_dir)
    ensure_writable_dir(out)
    checkpoints: dict[str, Path] = {}
    for li, ll in pairs:
        label = pair_label(li, ll)
        if li == 0 and ll == 0 and zero_as_base:
            checkpoints[label] = Path(base)
            continue
        run_dir = out / "runs" / label
        if not _finished(run_dir, steps):
            options = dict(post_train_options or {})
            post_train(data, base, run_dir, lambda_image=li, lambda_lesion=ll, target=target, steps=steps,
                       batch_size=batch_size, device=device, precision=precision, seed=seed,
                       resume=run_dir.exists() and any(run_dir.iterdir()), **options,
                       progress=_staged(progress, f"post-train {label}"), cancel=cancel)
        checkpoints[label] = run_dir

    cases, summary = evaluate(checkpoints, data, split=split, n_steps=eval_steps, seed=seed,
                              batch_size=eval_batch_size, device=device, max_cases=max_cases,
                              progress=_staged(progress, "evaluate"), cancel=cancel)
    lambdas = {pair_label(li, ll): (li, ll) for li, ll in pairs}
    for row in cases:
        row["lambda_image"], row["lambda_lesion"] = lambdas[row["model"]]
    write_rows(cases, out / "ablation_cases.csv")

    rows = []
    for label, (li, ll) in lambdas.items():
        stats = summary.get(label, {})
        row: dict[str, Any] = {"lambda_image": li, "lambda_lesion": ll, "model": label,
                               "checkpoint": str(checkpoints[label]), "target": target,
                               "n_cases": sum(r["model"] == label for r in cases)}
        for ch in CHANNELS:
            for m in METRICS:
                stat = stats.get(f"{ch}_{m}", {})
                row[f"{ch}_{m}_mean"] = stat.get("mean", math.nan)
                row[f"{ch}_{m}_std"] = stat.get("std", math.nan)
        rows.append(row)
    _write_csv(rows, out / "table2.csv")
    settings = (f"post-training: {steps} steps, target {target}, batch {batch_size}, seed {seed}; evaluation: "
                f"{split} split, DDIM {eval_steps} steps, seed {seed}; mean ± SD over cases, in normalised units")
    with atomic_path(out / "table2.md") as tmp:
        Path(tmp).write_text(f"{format_table2(summary, lambdas)}\n\n{settings}\n", encoding="utf-8")
    return rows


def _write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def format_table2(summary: Mapping[str, Any], lambdas: Mapping[str, tuple[float, float]]) -> str:
    """Markdown table shaped like the paper's Table 2: λ_image, λ_lesion, then MAE, lesion MAE,
    PSNR and MS-SSIM of DWI and ADC (mean ± SD, best bold), one row per pair in ``lambdas``' order.

    Built on `ctp2mri.evaluation.tables.format_table1` (same cells and bolding), its model column
    replaced by the two λ columns.
    """
    labels = list(lambdas)
    lines = format_table1(dict(summary), models=labels, metrics=METRICS).splitlines()
    head, rule, body = lines[0], lines[1], lines[2:]
    out = [head.replace("| Model |", "| λ_image | λ_lesion |", 1), rule.replace("|:--|", "|--:|--:|", 1)]
    for label, line in zip(labels, body):
        li, ll = lambdas[label]
        out.append(line.replace(f"| {label} |", f"| {li:g} | {ll:g} |", 1))
    return "\n".join(out)

"""What `ctp2mri evaluate` prints and writes: the per-case CSV, the Table-1-shaped report
and the Markdown + CSV comparison of several models.

Pure formatting of the rows `ctp2mri.evaluation.evaluate.evaluate` returns and of their `summarise`
summary; nothing here samples or scores.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctp2mri.errors import InputError
from ctp2mri.io.atomic import atomic_path, ensure_writable_dir
from ctp2mri.evaluation.metrics import METRICS
from ctp2mri.settings import CORE_ADC_THRESHOLD
from ctp2mri.evaluation.tables import Summary, format_table1

__all__ = ["CHANNELS", "comparison_paths", "format_report", "sampling_seeds", "write_comparison", "write_rows"]

CHANNELS = ("DWI", "ADC")  # Table 1's channel names, in the order of the targets (DWI, ADC)


def write_rows(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Per-case rows as CSV (atomically), columns in first-seen order; NaN as ``nan``."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})
    return Path(path)


_SAMPLER_NAMES = {"ddim": "DDIM", "dpm++2m": "DPM-Solver++(2M)", "bbdm": "BBDM bridge sampler",
                  "generator": "one generator pass"}


def _sampling(rows: Sequence[Mapping[str, Any]], n_steps: int) -> dict[str, str]:
    """How each model was sampled, in the rows' model order (e.g. ``"DDIM, 200 steps"``)."""
    out: dict[str, str] = {}
    for r in rows:
        sampler = str(r.get("sampler", "ddim"))
        name = _SAMPLER_NAMES.get(sampler, sampler)
        steps = r.get("steps", n_steps)
        k = int(r.get("samples") or 1)
        how = name if sampler == "generator" else f"{name}, {steps} steps"
        out.setdefault(str(r.get("model")), how if k == 1 else f"{how}, mean of {k} samples")
    return out


def sampling_seeds(seed: int | Sequence[int]) -> list[int]:
    """One run seed or several (each case is then sampled once per seed)."""
    seeds = [int(seed)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
    if not seeds or len(set(seeds)) != len(seeds):
        raise InputError(f"give one or more different sampling seeds, got {seed!r}")
    return seeds


def _seed_text(seed: int | Sequence[int]) -> str:
    seeds = sampling_seeds(seed)
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"


def _header(rows: Sequence[Mapping[str, Any]], n_steps: int, eta: float, seed: int | Sequence[int],
            split: str | None) -> str:
    n_cases = len({r["case"] for r in rows})
    where = f"Evaluation on split {split or 'all'!r} ({n_cases} case{'s' * (n_cases != 1)}): "
    over = "cases" if len(sampling_seeds(seed)) == 1 else "cases and seeds, each case sampled once per seed"
    metrics = f"metrics in the normalised [-1, 1] space inside the brain (mean ± SD over {over})"
    sampling = _sampling(rows, n_steps)
    seeds = _seed_text(seed)
    if len(set(sampling.values())) <= 1:
        how = next(iter(sampling.values()), f"DDIM, {n_steps} steps")
        return f"{where}{how}, eta = {eta:g}, {seeds}; {metrics}"
    listed = "; ".join(f"{m}: {how}" for m, how in sampling.items())
    return f"{where}eta = {eta:g}, {seeds}, the same per-slice seeds for every model ({listed}); {metrics}"


def _core_lines(summary: Summary) -> list[str]:
    lines = []
    for model, stats in summary.items():
        diff = stats.get("core_abs_volume_diff_ml", {})
        if diff.get("n", 0):
            dice = stats.get("core_dice", {})
            ref = stats.get("core_gt_adc_dice", {})
            lines.append(f"{model}: Dice {dice.get('mean', math.nan):.3f} over {dice.get('n', 0)} "
                         f"lesion cases (same threshold on the true ADC: Dice "
                         f"{ref.get('mean', math.nan):.3f}); |volume difference| "
                         f"{diff['mean']:.2f} ml over {diff['n']} cases")
    first = next(iter(summary.values()), {})
    perfusion = first.get("perfusion_core_dice", {})
    if perfusion.get("n", 0):
        diff = first.get("perfusion_core_abs_volume_diff_ml", {})
        lines.append(f"CTP perfusion core (rCBF < 30 % within Tmax > 6 s, no model): Dice "
                     f"{perfusion['mean']:.3f} over {perfusion['n']} lesion cases; |volume difference| "
                     f"{diff.get('mean', math.nan):.2f} ml over {diff.get('n', 0)} cases")
    return lines


def _contrast_lines(summary: Summary, metric: str = "lesion_contrast") -> list[str]:
    lines = []
    for model, stats in summary.items():
        parts = []
        for channel in CHANNELS:
            synthetic = stats.get(f"{channel}_{metric}", {})
            true = stats.get(f"{channel}_{metric}_true", {})
            if synthetic.get("n", 0):
                parts.append(f"{channel} {synthetic['mean']:.2f} (true {true.get('mean', math.nan):.2f})")
        if parts:
            lines.append(f"{model}: " + ", ".join(parts))
    return lines


_CORE_TITLE = (f"Infarct core (synthetic ADC < {CORE_ADC_THRESHOLD:g} × 10⁻⁶ mm²/s, ADC mapped back to units on "
               "the model's ADC scale: its fixed window, or each case's own range for models from before it) vs "
               "the lesion masks:")


_CONTRAST_TITLE = ("Lesion contrast (mean inside the lesion / median of the rest of the brain, "
                   "rDWI and rADC; 1 = not visible), mean over lesion cases:")
_AUC_TITLE = ("Lesion AUC (voxel ROC AUC of lesion vs the rest of the brain: DWI higher, ADC lower is lesion; "
              "0.5 = chance, 1 = perfect), mean over lesion cases:")


# report ----------------------------------------------------------------------------------------
def format_report(summary: Summary, rows: Sequence[Mapping[str, Any]], *, n_steps: int, eta: float,
                  seed: int | Sequence[int], split: str | None, fid_message: str | None = None) -> str:
    """The printed result: a header with the sampler settings, Table 1, and the core numbers."""
    lines = [_header(rows, n_steps, eta, seed, split), "", format_table1(summary)]
    core_lines = _core_lines(summary)
    if core_lines:
        lines += ["", _CORE_TITLE, *(f"  {line}" for line in core_lines)]
    contrast_lines = _contrast_lines(summary)
    if contrast_lines:
        lines += ["", _CONTRAST_TITLE, *(f"  {line}" for line in contrast_lines)]
    auc_lines = _contrast_lines(summary, "lesion_auc")
    if auc_lines:
        lines += ["", _AUC_TITLE, *(f"  {line}" for line in auc_lines)]
    if fid_message:
        lines += ["", fid_message]
    return "\n".join(lines)


def comparison_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """The Markdown and CSV files `write_comparison` writes for ``path`` (``.md`` added if missing)."""
    md = Path(path)
    if md.suffix.lower() != ".md":
        md = md.with_name(md.name + ".md")
    return md, md.with_suffix(".csv")


def write_comparison(summary: Summary, rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                     n_steps: int, eta: float, seed: int | Sequence[int], split: str | None,
                     checkpoints: Mapping[str, str | os.PathLike] | None = None,
                     fid_message: str | None = None) -> tuple[Path, Path]:
    """Write the models' Table-1-shaped comparison: Markdown at ``path`` and CSV beside it.

    The Markdown holds the settings (split, cases, steps, η, seed), the Table 1 layout
    (`ctp2mri.evaluation.tables.format_table1`, best mean in bold), how each model was sampled and from
    which checkpoint, and the infarct-core numbers. The CSV (``path`` with suffix ``.csv``)
    has one row per model: ``model``, ``n_cases``, ``sampler``, ``steps``, ``samples``, ``eta``,
    ``seed``, ``weights``, ``checkpoint`` and ``{DWI,ADC}_{metric}_{mean,std}`` plus the core Dice,
    |volume difference| and the lesion contrasts. Both are written atomically.

    Returns
    -------
    (Markdown path, CSV path)
    """
    md, csv_path = comparison_paths(path)
    ensure_writable_dir(md.parent)
    checkpoints = dict(checkpoints or {})
    models = list(summary)
    first = {m: next(r for r in rows if r["model"] == m) for m in models}
    table_rows = []
    for m in models:
        row: dict[str, Any] = {"model": m, "n_cases": sum(r["model"] == m for r in rows)}
        row.update({k: first[m].get(k, "") for k in ("sampler", "steps", "samples", "eta", "weights")})
        row["seed"] = " ".join(str(v) for v in dict.fromkeys(r["seed"] for r in rows if r["model"] == m))
        row["checkpoint"] = os.fspath(checkpoints.get(m, ""))
        keys = ([f"{ch}_{metric}" for ch in CHANNELS for metric in METRICS]
                + ["core_dice", "core_abs_volume_diff_ml", "perfusion_core_dice", "perfusion_core_abs_volume_diff_ml"]
                + [f"{ch}_{m}{s}" for m in ("lesion_contrast", "lesion_auc") for ch in CHANNELS
                   for s in ("", "_true")])
        for key in keys:
            stat = summary[m].get(key, {})
            row[f"{key}_mean"] = stat.get("mean", math.nan)
            row[f"{key}_std"] = stat.get("std", math.nan)
        table_rows.append(row)
    write_rows(table_rows, csv_path)
    sampling = _sampling(rows, n_steps)
    lines = ["# Model comparison (Table 1 layout)", "", _header(rows, n_steps, eta, seed, split), "",
             format_table1(summary, models=models), "", "| Model | Sampling | Weights | Checkpoint |", "|:--|:--|:--|:--|"]
    lines += [f"| {m} | {sampling.get(m, '')} | {first[m].get('weights', '')} | {os.fspath(checkpoints.get(m, ''))} |"
              for m in models]
    core_lines = _core_lines(summary)
    if core_lines:
        lines += ["", _CORE_TITLE, "", *(f"- {line}" for line in core_lines)]
    contrast_lines = _contrast_lines(summary)
    if contrast_lines:
        lines += ["", _CONTRAST_TITLE, "", *(f"- {line}" for line in contrast_lines)]
    auc_lines = _contrast_lines(summary, "lesion_auc")
    if auc_lines:
        lines += ["", _AUC_TITLE, "", *(f"- {line}" for line in auc_lines)]
    if fid_message:
        lines += ["", fid_message]
    with atomic_path(md) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md, csv_path

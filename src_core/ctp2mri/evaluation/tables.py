"""Table-1-shaped summaries: mean ± SD over cases per model, and the paper's table layout."""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Sequence

import numpy as np

from ctp2mri.errors import InputError
from ctp2mri.evaluation.metrics import METRICS

__all__ = ["Summary", "format_table1", "summarise"]

Summary = dict[str, dict[str, dict[str, float]]]


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def summarise(rows: Iterable[dict[str, Any]], by: str = "model") -> Summary:
    """Mean ± standard deviation over cases of every numeric column, NaN skipped.

    Parameters
    ----------
    rows
        One dict per case (and model), e.g. ``{"case": "p001", "model": "cLDM",
        **flat_metrics(channel_metrics(...))}``; non-numeric values (case ids) are ignored.
    by
        The column that names the model; rows without it are grouped under ``"all"``.

    Returns
    -------
    dict
        ``{model: {column: {"mean", "std", "n"}}}``, ``n`` the number of cases with a value
        (lesion-free cases do not count for lesion MAE), ``std`` the sample standard
        deviation (ddof = 1; NaN for fewer than two values), ``mean`` NaN when ``n`` is 0.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row.get(by, "all")), []).append(row)
    summary: Summary = {}
    for name, group in groups.items():
        columns = dict.fromkeys(k for row in group for k, v in row.items()
                                if k != by and _is_number(v))
        stats = {}
        for col in columns:
            v = np.array([float(r[col]) for r in group if _is_number(r.get(col))])
            v = v[~np.isnan(v)]
            with np.errstate(invalid="ignore"):  # a perfect case's PSNR is inf: inf − inf
                stats[col] = {"mean": float(v.mean()) if v.size else math.nan,
                              "std": float(v.std(ddof=1)) if v.size > 1 else math.nan,
                              "n": int(v.size)}
        summary[name] = stats
    return summary


# label, decimals, lower is better — as printed in the paper's Table 1
_COLUMNS = {"mae": ("MAE↓", 3, True), "lesion_mae": ("Lesion MAE↓", 3, True),
            "psnr": ("PSNR↑", 2, False), "ms_ssim": ("MS-SSIM↑", 3, False),
            "fid": ("FID↓", 2, True)}


def _cell(stat: dict[str, float], digits: int) -> str:
    mean, std = stat.get("mean", math.nan), stat.get("std", math.nan)
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def format_table1(summary: Summary, models: Sequence[str] | None = None,
                  channels: Sequence[str] = ("DWI", "ADC"), metrics: Sequence[str] | None = None,
                  bold_best: bool = True) -> str:
    """A Markdown table shaped like the paper's Table 1: one row per model and, for each
    channel, MAE, lesion MAE, PSNR and MS-SSIM (and FID when the summary has it) as
    ``mean ± std``.

    Parameters
    ----------
    summary
        `summarise`'s output.
    models
        Rows in this order (default: all, in the summary's order).
    metrics
        Per-channel columns; default `METRICS`, plus ``"fid"`` when present.
    bold_best
        With several models, bold the best mean of each column, as the paper does.
    """
    models = list(summary) if models is None else list(models)
    missing = [m for m in models if m not in summary]
    if missing:
        raise InputError(f"no results for model(s) {missing}; the summary has {list(summary)}")
    if metrics is None:
        has_fid = any(f"{ch}_fid" in summary[m] for m in models for ch in channels)
        metrics = METRICS + (("fid",) if has_fid else ())
    columns = [(f"{ch}_{m}", f"{ch} {_COLUMNS.get(m, (m,))[0]}", *_COLUMNS.get(m, (m, 3, True))[1:])
               for ch in channels for m in metrics]
    lines = ["| Model | " + " | ".join(label for _, label, _, _ in columns) + " |",
             "|:--|" + "--:|" * len(columns)]
    cells: dict[str, list[str]] = {m: [] for m in models}
    for key, _, digits, lower in columns:
        means = [summary[m].get(key, {}).get("mean", math.nan) for m in models]
        finite = [v for v in means if not math.isnan(v)]
        best = None
        if bold_best and len(models) > 1 and finite:
            best = min(finite) if lower else max(finite)
        for m, mean in zip(models, means):
            text = _cell(summary[m].get(key, {}), digits)
            cells[m].append(f"**{text}**" if mean == best else text)
    lines += [f"| {m} | " + " | ".join(cells[m]) + " |" for m in models]
    return "\n".join(lines)

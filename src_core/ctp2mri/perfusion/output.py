"""Writing a perfusion analysis: NIfTI maps and masks on the CT's own grid, report.json, a figure.

``ctp2mri perfusion CTP --out DIR`` writes into DIR (all files appear together or not at all):

==========================  ==================================================================
file                        content
==========================  ==================================================================
``cbf.nii.gz``              CBF, ml/100 g/min (float32; 0 outside the analysed tissue)
``cbv.nii.gz``              CBV, ml/100 g
``mtt.nii.gz``              MTT, s
``tmax.nii.gz``             Tmax, s
``ttp.nii.gz``              time to peak from the first frame, s
``core.nii.gz``             ischaemic core (uint8): rCBF below the threshold
``hypoperfusion.nii.gz``    Tmax above the threshold (uint8)
``aif.nii.gz``              the voxels the AIF was read from (uint8); ``vof.nii.gz`` the VOF's
``report.json``             volumes, mismatch, reference CBF, AIF/VOF curves, settings (strict JSON)
``perfusion.png``           the four maps on the slice with the most hypoperfusion, core and
                            hypoperfusion contours, the AIF and VOF curves
==========================  ==================================================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ctp2mri.errors import InputError
from ctp2mri.io.atomic import atomic_dir, atomic_path
from ctp2mri.io.nifti import save_nifti
from ctp2mri.io.jsonfile import strict_json
from ctp2mri.perfusion.analysis import MAP_NAMES, MAP_UNITS, PerfusionResult

MASK_NAMES = ("core", "hypoperfusion", "aif", "vof")
OUTPUT_FILES = {**{k: f"{k}.nii.gz" for k in (*MAP_NAMES, *MASK_NAMES)}, "report": "report.json",
                "figure": "perfusion.png"}
#: Display ranges of the maps (the usual clinical windows).
DISPLAY_RANGES = {"cbf": (0.0, 80.0), "cbv": (0.0, 6.0), "mtt": (0.0, 16.0), "tmax": (0.0, 16.0), "ttp": (0.0, 40.0)}


def write_perfusion(result: PerfusionResult, out_dir: str | os.PathLike, overwrite: bool = False,
                    source: str | None = None, figure: bool = True) -> Path:
    """Write the result into ``out_dir`` (see the module docstring); returns the folder."""
    report = result.report()
    report["input"] = {"path": source, "shape": list(result.ctp_grid[0]), "frames": int(result.times.size)}
    report["files"] = {k: OUTPUT_FILES[k] for k in (*MAP_NAMES, *MASK_NAMES, "report")}
    if figure:
        report["files"]["figure"] = OUTPUT_FILES["figure"]
    text = strict_json(report)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for name in (*MAP_NAMES, *MASK_NAMES):
            vol = result.on_ctp_grid(name)
            dtype = np.float32 if name in MAP_NAMES else np.uint8
            save_nifti(vol, tmp / OUTPUT_FILES[name], dtype=dtype)
            del vol
        (tmp / OUTPUT_FILES["report"]).write_text(text, encoding="utf-8")
        if figure:
            perfusion_figure(result, tmp / OUTPUT_FILES["figure"])
    return Path(out_dir)


def figure_slice(result: PerfusionResult) -> int:
    """The working-grid slice with the most hypoperfused tissue (else the most tissue)."""
    for mask in (result.regions.hypoperfusion, result.regions.core, result.tissue):
        counts = mask.sum(axis=(0, 1))
        if counts.any():
            return int(np.argmax(counts))
    return result.tissue.shape[2] // 2


def perfusion_figure(result: PerfusionResult, path: str | os.PathLike) -> Path:
    """CBF, CBV, MTT, Tmax on one slice (radiological view) with core (red) and hypoperfusion
    (yellow) contours, and the AIF and VOF curves."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ctp2mri.evaluation.figures import radiological

    z = figure_slice(result)
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.6), gridspec_kw={"width_ratios": [1, 1, 1, 1, 1.4]})
    for ax, name in zip(axes, ("cbf", "cbv", "mtt", "tmax")):
        lo, hi = DISPLAY_RANGES[name]
        shown = ax.imshow(radiological(result.maps[name][:, :, z]), cmap="jet", vmin=lo, vmax=hi)
        for mask, colour in ((result.regions.hypoperfusion, "yellow"), (result.regions.core, "red")):
            if mask[:, :, z].any():
                ax.contour(radiological(mask[:, :, z].astype(float)), levels=[0.5], colors=colour, linewidths=1)
        ax.set_title(f"{name.upper()} ({MAP_UNITS[name]})", fontsize=9)
        ax.axis("off")
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    ax = axes[4]
    ax.plot(result.times, result.aif.curve, "r-o", ms=3, label=f"AIF (×{result.aif.scale:.2f} partial volume)")
    if result.vof is not None:
        ax.plot(result.times, result.vof.curve, "b-s", ms=3, label="VOF")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("enhancement (HU)")
    ax.legend(fontsize=8)
    r = result.regions
    ax.set_title(f"core {r.core_ml:.1f} ml, Tmax>{r.settings.hypoperfusion_tmax_s:g}s {r.hypoperfusion_ml:.1f} ml, "
                 f"mismatch {r.mismatch_ml:.1f} ml", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return Path(path)


def run_perfusion(ctp: str | os.PathLike, out_dir: str | os.PathLike, *, mask: str | os.PathLike | None = None,
                  aif_mask: str | os.PathLike | None = None, series_uid: str | None = None,
                  overwrite: bool = False, figure: bool = True, progress: Any = None, cancel: Any = None,
                  **settings: Any) -> PerfusionResult:
    """``ctp2mri perfusion``: read a CTP (NIfTI/NRRD/MHA file or DICOM folder) and optional brain
    mask and AIF region, analyse it, write the results. The output folder is checked before the
    analysis; nothing is written on failure or cancel."""
    from ctp2mri.io import load_volume
    from ctp2mri.io.atomic import claim_output
    from ctp2mri.perfusion.analysis import PerfusionSettings, analyse_perfusion
    from ctp2mri.perfusion.regions import RegionSettings
    from ctp2mri.preprocessing.spacing import check_spacing

    out = Path(out_dir)
    if out.is_file():
        raise InputError(f"output {out} is a file; give a folder for the results")
    if out.is_dir() and not overwrite and any(out.iterdir()):
        raise InputError(f"{out} already exists and is not empty; pass --overwrite to replace it, or choose another folder")
    region_keys = {"core_rcbf", "hypoperfusion_tmax_s", "min_island_ml", "core_within_hypoperfusion"}
    regions = RegionSettings(**{k: v for k, v in settings.items() if k in region_keys})
    options = PerfusionSettings(regions=regions, **{k: v for k, v in settings.items() if k not in region_keys})
    with claim_output(out):  # held for the whole run: a second run into ``out`` is refused at once
        volume = check_spacing(load_volume(ctp, series_uid=series_uid), "CTP")
        brain = load_volume(mask) if mask is not None else None
        region = load_volume(aif_mask) if aif_mask is not None else None
        result = analyse_perfusion(volume, brain, region, options, progress=progress, cancel=cancel)
        if cancel is not None:
            cancel.raise_if_cancelled()
        write_perfusion(result, out, overwrite=overwrite, source=str(ctp), figure=figure)
    return result

"""Put a subject's follow-up MRI (DWI, ADC, lesion) into its CTP's world coordinates.

Images on one grid form a group and move together. A group already in the CTP's space (on its
grid, or with the same ``space-`` entity, e.g. both ``space-ncct``) stays; any other group is
registered rigidly to the CTP (`ctp2mri.preprocessing.registration.estimate_ctp_to_dwi`: temporal-mean CTP,
Mattes mutual information) through its DWI, else its ADC, else an image of the same grid found
elsewhere in the subject (the ``space-ncct`` DWI or the NCCT for a lesion mask drawn there). The
fitted transform is folded into the images' affines, so nothing is interpolated here: the one
interpolation onto the model grid happens in `ctp2mri.preprocessing.preprocess.preprocess_case`.

There is no ground truth for a registration of real data; the error reported is an estimate:
the distance, over the reference image's foreground (the head), between the fit used and a
second, independent fit (to the group's ADC when the DWI was used, else from other random
metric samples). Two fits to different images that agree within a fraction of a voxel are
unlikely to share an error larger than that.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from ctp2mri.errors import InputError
from ctp2mri.io.bids import BidsFile
from ctp2mri.io.volume import Volume
from ctp2mri.progress import CancelToken
from ctp2mri.preprocessing.registration import estimate_ctp_to_dwi
from ctp2mri.preprocessing.resample import resample_like, transform_matrix

REGISTER_MODES = ("auto", "always", "never")
_ANCHOR_ROLES = ("dwi", "adc", "ncct")
_MAX_POINTS = 20000
# Share of the reference's voxels the metric samples. 0.1 instead of registration's 0.25: on the
# phantom with a 4° / 5.4 mm misalignment, 2.8 s instead of 6.8 s per fit with the same error
# (0.13 mm against the known transform), 2-core CPU.
SAMPLING = 0.1

Loader = Callable[[BidsFile], Volume]


def _aligned(files: list[BidsFile], vol: Volume, ctp_file: BidsFile, ctp: Volume, mode: str) -> bool:
    if mode == "never":
        return True
    if mode == "always":
        return False
    same_space = ctp_file.space is not None and all(f.space == ctp_file.space for f in files)
    return vol.same_grid(ctp) or same_space


def _foreground_points(volume: Volume) -> np.ndarray:
    """World points (4 × n, homogeneous) of the brighter voxels: the head an MRI shows."""
    a = np.asarray(volume.array, dtype=np.float32)
    positive = a[a > 0]
    threshold = float(positive.mean()) if positive.size else 0.0
    ijk = np.argwhere(a > threshold)
    if len(ijk) > _MAX_POINTS:
        ijk = ijk[np.linspace(0, len(ijk) - 1, _MAX_POINTS).astype(int)]
    if not len(ijk):
        ijk = np.argwhere(np.ones(volume.spatial_shape, bool))[::97]
    return volume.affine @ np.vstack([ijk.T, np.ones((1, len(ijk)))])


def register_to_ctp(ctp: Volume, reference: Volume, second: Volume | None, labels: tuple[str, str],
                    cancel: CancelToken | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Rigid fit of ``reference`` (3-D, MRI or CT) to the CTP: the 4 × 4 RAS matrix taking the
    reference's world to the CTP's, and a JSON-ready record with the error estimate (mm)."""
    tx, info = estimate_ctp_to_dwi(ctp, reference, "rigid", sampling=SAMPLING, cancel=cancel)
    if second is not None:
        check, _ = estimate_ctp_to_dwi(ctp, second, "rigid", sampling=SAMPLING, cancel=cancel)
        method = f"distance between the fits to the {labels[0]} and to the {labels[1]}"
    else:
        check, _ = estimate_ctp_to_dwi(ctp, reference, "rigid", sampling=SAMPLING, seed=1, cancel=cancel)
        method = f"distance between two fits to the {labels[0]} from different random metric samples"
    matrix, other = transform_matrix(tx), transform_matrix(check)
    points = _foreground_points(reference)
    gap = np.linalg.norm((matrix @ points - other @ points)[:3], axis=0)
    moved = np.linalg.norm((matrix @ points - points)[:3], axis=0)
    record = {
        "reference": labels[0],
        "transform": {k: info[k] for k in ("type", "parameters", "fixed_parameters", "convention")},
        "matrix_ras_mri_to_ctp": matrix.round(6).tolist(),
        "metric": round(float(info["rigid"]["metric"]), 5),
        "optimizer_stop": info["rigid"]["stop"],
        "moved_mm": {"mean": round(float(moved.mean()), 3), "max": round(float(moved.max()), 3)},
        "error_estimate_mm": {"mean": round(float(gap.mean()), 3), "max": round(float(gap.max()), 3)},
        "error_method": method + ", over the reference's foreground; no ground truth",
    }
    return matrix, record


def _anchor(group_vol: Volume, files: list[BidsFile], used: set, load: Loader) -> tuple[BidsFile, Volume]:
    """An image on the lesion's grid to register it by (the ``space-ncct`` DWI, ADC or NCCT)."""
    import nibabel as nib

    for role in _ANCHOR_ROLES:
        for f in files:
            if f.role != role or f.path in used:
                continue
            try:
                header = nib.load(str(f.path))
                if tuple(header.shape[:3]) != group_vol.spatial_shape or len(header.shape) != 3 or \
                        not np.allclose(header.affine, group_vol.affine, atol=1e-3):
                    continue
            except Exception:  # an unreadable candidate is simply not the anchor
                continue
            return f, load(f)
    raise InputError("the lesion mask lies on a grid of no DWI, ADC or NCCT of the subject and not in the CTP's "
                     "space, so it cannot be placed on the CTP; give a lesion mask on the DWI's grid or in the "
                     "CTP's space (or use --space derivatives)")


def place_on_ctp(ctp: Volume, ctp_file: BidsFile, mri: dict[str, tuple[BidsFile, Volume]], files: list[BidsFile],
                 mode: str, load: Loader, cancel: CancelToken | None = None
                 ) -> tuple[dict[str, Volume], dict[str, Any]]:
    """The MRI volumes in the CTP's world coordinates, all on the DWI's grid, and a record of
    what was done to each group (``registration`` of case.json's ``import``)."""
    if mode not in REGISTER_MODES:
        raise InputError(f"unknown registration mode {mode!r}; choose one of {REGISTER_MODES}")
    groups: list[list[str]] = []
    for role, (_, vol) in mri.items():
        home = next((g for g in groups if mri[g[0]][1].same_grid(vol)), None)
        if home is None:
            groups.append([role])
        else:
            home.append(role)
    placed: dict[str, Volume] = {}
    record: dict[str, Any] = {}
    used = {f.path for f, _ in mri.values()}
    for group in groups:
        files_g = [mri[r][0] for r in group]
        vol_g = mri[group[0]][1]
        key = "+".join(group)
        if _aligned(files_g, vol_g, ctp_file, ctp, mode):
            how = "on the CTP's grid" if vol_g.same_grid(ctp) else (
                f"space-{ctp_file.space}, like the CTP" if mode == "auto" else "trusted (--register never)")
            record[key] = f"none: {how}"
            placed.update({r: mri[r][1] for r in group})
            continue
        if "dwi" in group or "adc" in group:
            first = "dwi" if "dwi" in group else "adc"
            ref_file, ref = mri[first]
            second = mri["adc"][1] if first == "dwi" and "adc" in group else None
            labels = (ref_file.path.name, mri["adc"][0].path.name if second is not None else "")
        else:
            ref_file, ref = _anchor(vol_g, files, used, load)
            second, labels = None, (ref_file.path.name, "")
        matrix, record[key] = register_to_ctp(ctp, ref, second, labels, cancel)
        for r in group:
            vol = mri[r][1]
            placed[r] = dataclasses.replace(vol, affine=matrix @ vol.affine,
                                            meta={**vol.meta, "registered_to_ctp": labels[0]})
    # one grid for preprocess_case: the DWI's (ADC linear, lesion nearest when elsewhere)
    grid = placed["dwi"]
    for role in ("adc", "lesion"):
        if role in placed and not placed[role].same_grid(grid):
            placed[role] = resample_like(placed[role], grid, "nearest" if role == "lesion" else "linear",
                                         cancel=cancel)
    return placed, record

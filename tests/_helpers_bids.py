"""ISLES'24-shaped BIDS trees written from a phantom case (the importer and napari reader tests)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from ctp2mri.io.volume import Volume
from ctp2mri.preprocessing.resample import resample_to_grid

# The rotated case: the MRI scanner's world differs from the CT's by 4° and a few mm.
ROTATION_DEG = (3.0, -2.0, 4.0)
SHIFT_MM = (4.0, -3.0, 2.5)
MRI_SPACING = (1.6, 1.6, 4.0)
MRI_SHAPE = (100, 120, 40)
CT_SCANNER_SHIFT_MM = (6.0, -4.0, 3.0)  # the raw CTP's world against the NCCT's


def rigid(rotation_deg=ROTATION_DEG, shift_mm=SHIFT_MM) -> np.ndarray:
    """4 × 4 RAS matrix taking MRI world points to CT world points."""
    m = np.eye(4)
    m[:3, :3] = Rotation.from_euler("xyz", rotation_deg, degrees=True).as_matrix()
    m[:3, 3] = shift_mm
    return m


def _itk(matrix_ras: np.ndarray) -> sitk.AffineTransform:
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix_ras @ np.diag([-1.0, -1.0, 1.0, 1.0])
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(lps[:3, :3].ravel().tolist())
    tx.SetTranslation(lps[:3, 3].tolist())
    return tx


def mri_grid(ctp: Volume, mri_to_ct: np.ndarray) -> np.ndarray:
    """An MRI grid (another spacing and shape) over the same head, in the MRI's world."""
    centre_ct = ctp.affine @ np.append((np.asarray(ctp.spatial_shape) - 1) / 2.0, 1.0)
    centre = (np.linalg.inv(mri_to_ct) @ centre_ct)[:3]
    affine = np.diag(list(MRI_SPACING) + [1.0])
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.asarray(MRI_SHAPE) - 1) / 2.0)
    return affine


def on_mri_grid(volume: Volume, affine: np.ndarray, mri_to_ct: np.ndarray, nearest=False) -> Volume:
    """``volume`` (on the CT grid) as the MRI scanner would store it on ``affine``."""
    return resample_to_grid(volume, affine, MRI_SHAPE, "nearest" if nearest else "linear", transform=_itk(mri_to_ct))


def save(path: Path, array: np.ndarray, affine: np.ndarray, dt: float | None = None, when: str | None = None) -> Path:
    """A NIfTI as other tools write it (nibabel directly), with an optional JSON sidecar time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.asarray(array), affine)
    image.set_sform(affine, code=1)
    if dt is not None:
        image.header.set_zooms(image.header.get_zooms()[:3] + (dt,))
        image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(path))
    if when is not None:
        stem = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
        (path.parent / f"{stem}.json").write_text(json.dumps({"AcquisitionDateTime": when}))
    return path


def write_subject(root: Path, case, sub: str, ses=("ses-01", "ses-02"), raw="raw_data", ext=".nii.gz",
                  subdirs=False, mri_to_ct: np.ndarray | None = None, ncct_files=True, adc=True,
                  truncate: str | None = None) -> dict[str, Path]:
    """One subject as ISLES'24 ships it (``raw`` native scans, ``derivatives`` in space-ncct).

    ``mri_to_ct`` puts the raw DWI/ADC on another grid in a rotated world; the raw CTP lies in a
    world shifted by `CT_SCANNER_SHIFT_MM` from the NCCT's. Without ``ncct_files`` the derivatives
    hold only a native lesion mask on the raw DWI's grid. ``truncate`` names a role whose
    derivatives file is cut in half. Returns the written paths by role and tree.
    """
    ct_dt = float(np.median(np.diff(case.ctp.frame_times)))
    ctp = np.rint(case.ctp.array).astype(np.int16)
    shift = np.eye(4)
    shift[:3, 3] = CT_SCANNER_SHIFT_MM
    folder = {"ct": "ct/" if subdirs else "", "dwi": "dwi/" if subdirs else ""}
    r1, r2 = root / raw / sub / ses[0], root / raw / sub / ses[1]
    d1, d2 = root / "derivatives" / sub / ses[0], root / "derivatives" / sub / ses[1]
    pre1, pre2 = f"{sub}_{ses[0]}", f"{sub}_{ses[1]}"
    paths = {"raw_ctp": save(r1 / f"{folder['ct']}{pre1}_ctp{ext}", ctp, shift @ case.ctp.affine, ct_dt,
                             "2024-03-01T10:15:00")}
    m = np.eye(4) if mri_to_ct is None else mri_to_ct
    grid = mri_grid(case.ctp, m)
    mri = {"dwi": on_mri_grid(case.dwi, grid, m), "lesion": on_mri_grid(case.lesion, grid, m, nearest=True)}
    if adc:
        mri["adc"] = on_mri_grid(case.adc, grid, m)
    for role in ("dwi", "adc"):
        if role in mri:
            paths[f"raw_{role}"] = save(r2 / f"{folder['dwi']}{pre2}_{role}{ext}", mri[role].array.astype(np.float32),
                                        grid, when="2024-03-04T22:15:00")
    if ncct_files:
        paths["ncct_ctp"] = save(d1 / f"{pre1}_space-ncct_ctp.nii.gz", ctp, case.ctp.affine, ct_dt)
        paths["ncct_tmax"] = save(d1 / "perfusion-maps" / f"{pre1}_space-ncct_tmax.nii.gz",
                                  case.truth["tmax"].array.astype(np.float32), case.ctp.affine)
        for role in ("dwi", "adc"):
            if role in mri:
                vol = getattr(case, role)
                paths[f"ncct_{role}"] = save(d2 / f"{pre2}_space-ncct_{role}.nii.gz", vol.array.astype(np.float32),
                                             vol.affine)
        paths["ncct_lesion"] = save(d2 / f"{pre2}_space-ncct_lesion-msk.nii.gz", case.lesion.array.astype(np.uint8),
                                    case.lesion.affine)
    else:
        paths["raw_lesion"] = save(d2 / f"{pre2}_msk{ext}", mri["lesion"].array.astype(np.uint8), grid)
    if truncate is not None:
        path = paths[f"ncct_{truncate}"]
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return paths

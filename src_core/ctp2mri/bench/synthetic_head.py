"""A clinical-size synthetic head CTP (skull, scalp, brain with a bolus) for the benchmarks and tests."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from ctp2mri.io.atomic import atomic_path
from ctp2mri.io.volume import Volume

# Labels of the synthetic head and their unenhanced HU / peak enhancement (HU).
AIR, SCALP, SKULL, GREY, WHITE, CSF = range(6)
BRAIN_LABELS = (GREY, WHITE, CSF)
_BASE_HU = np.array([-1000, 40, 1000, 40, 30, 5], dtype=np.int16)
_PEAK_HU = np.array([0, 10, 0, 25, 8, 0], dtype=np.float64)
_BRAIN_SEMI_AXES_MM = (66.0, 82.0, 58.0)  # brain ellipsoid: 4/3·π·66·82·58 mm³ ≈ 1315 ml


def head_labels(shape: tuple[int, int, int], spacing: tuple[float, float, float],
                z0: int = 0, z1: int | None = None) -> np.ndarray:
    """Labels of slices z0:z1 of an ellipsoidal head centred in the field of view.

    Brain (grey shell, white core, a ventricle) inside a 7 mm skull and a 5 mm scalp;
    world coordinates are centred on the volume (see `centred_affine`).
    """
    z1 = shape[2] if z1 is None else z1
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]
    x, y, z = np.meshgrid(axes[0], axes[1], axes[2][z0:z1], indexing="ij", sparse=True)
    a, b, c = _BRAIN_SEMI_AXES_MM
    r = np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2).astype(np.float32)
    ventricles = ((x - 4.0) / 9.0) ** 2 + (y / 24.0) ** 2 + ((z - 8.0) / 11.0) ** 2 < 1.0
    labels = np.full(r.shape, AIR, dtype=np.int8)
    labels[r < 1.17] = SCALP
    labels[r < 1.10] = SKULL
    labels[r < 1.00] = GREY
    labels[r < 0.75] = WHITE
    labels[(r < 0.75) & ventricles] = CSF
    return labels


def centred_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """RAS affine with the given spacing and the volume's centre at world (0, 0, 0)."""
    affine = np.diag(list(spacing) + [1.0])
    affine[:3, 3] = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2.0
    return affine


def _bolus(frames: int, frame_interval: float) -> np.ndarray:
    """Gamma-variate bolus (arrival 6 s, α = 3, β = 1.5 s), peak 1."""
    t = np.maximum(np.arange(frames) * frame_interval - 6.0, 0.0)
    curve = t**3 * np.exp(-t / 1.5)
    return curve / curve.max() if curve.max() > 0 else curve


def _frame_hu(labels: np.ndarray, bolus_k: float, rng: np.random.Generator,
              noise: int) -> np.ndarray:
    frame = (_BASE_HU + np.rint(_PEAK_HU * bolus_k).astype(np.int16))[labels]
    if noise:
        frame += rng.integers(-noise, noise + 1, size=frame.shape, dtype=np.int16)
    return frame


def synthetic_ctp(shape: tuple[int, int, int] = (96, 96, 48),
                  spacing: tuple[float, float, float] = (2.5, 2.5, 4.0), frames: int = 15,
                  frame_interval: float = 2.0, noise: int = 12, seed: int = 0) -> Volume:
    """An in-memory head CTP (int16 HU) like `write_synthetic_ctp` writes; labels in meta."""
    labels = head_labels(shape, spacing)
    bolus = _bolus(frames, frame_interval)
    rng = np.random.default_rng(seed)
    array = np.stack([_frame_hu(labels, b, rng, noise) for b in bolus], axis=-1)
    return Volume(array, centred_affine(shape, spacing),
                  frame_times=np.arange(frames) * frame_interval, meta={"labels": labels})


def write_synthetic_ctp(path: str | os.PathLike, shape: tuple[int, int, int] = (512, 512, 320),
                        spacing: tuple[float, float, float] = (0.47, 0.47, 1.0), frames: int = 15,
                        frame_interval: float = 2.0, noise: int = 12, seed: int = 0) -> Path:
    """Write a head-like CTP as uncompressed int16 NIfTI, a slab at a time.

    Air −1000 HU, scalp 40, skull 1000, grey/white matter 40/30, ventricle 5 HU; brain and
    scalp enhance with a gamma-variate bolus (arrival 6 s); uniform noise ±``noise`` HU.
    Memory use stays at one slab whatever the volume size (2.5 GB on disk by default).
    """
    path = Path(path)
    shape = tuple(int(s) for s in shape)
    affine = centred_affine(shape, spacing)
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(shape + (frames,))
    header.set_zooms(tuple(spacing) + (frame_interval,))
    header.set_xyzt_units("mm", "sec")
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    bolus = _bolus(frames, frame_interval)
    rng = np.random.default_rng(seed)
    slab = max(1, (8 << 20) // (shape[0] * shape[1]))  # ~8 M voxels per slab
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            header.write_to(f)
            offset = header.get_data_offset()
        data = np.memmap(tmp, dtype=header.get_data_dtype(), mode="r+", offset=offset,
                         shape=shape + (frames,), order="F")
        for z0 in range(0, shape[2], slab):
            z1 = min(shape[2], z0 + slab)
            labels = head_labels(shape, spacing, z0, z1)
            for k in range(frames):
                data[:, :, z0:z1, k] = _frame_hu(labels, bolus[k], rng, noise)
        data.flush()
        del data
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    return path

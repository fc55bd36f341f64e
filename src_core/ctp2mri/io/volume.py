"""`Volume`: a voxel array that never travels without its geometry.

Conventions follow nibabel: the array is indexed (i, j, k[, t]) and ``affine`` maps voxel
indices to RAS+ world coordinates in millimetres. A 4-D volume (CT perfusion) keeps time as
the last axis and carries its frame times in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ctp2mri.errors import InputError


def check_affine(affine: np.ndarray, what: str = "the image") -> np.ndarray:
    """``affine`` as a float 4×4 array, or an `InputError` when it cannot place voxels in space.

    Refused: another shape, NaN/inf entries, a last row other than (0, 0, 0, 1), and a
    singular 3×3 part (an all-zero matrix, a zero-length or two parallel voxel axes), which
    would put every voxel at one point, or plane, and break every resampling.
    """
    affine = np.asarray(affine, dtype=np.float64)
    fix = ("Re-export it with its orientation (a NIfTI's sform/qform, a DICOM's position and "
           "orientation), or correct the header.")
    if affine.shape != (4, 4):
        raise InputError(f"affine must be 4×4, got shape {affine.shape}")
    if not np.isfinite(affine).all():
        raise InputError(f"{what} has a voxel-to-world affine with NaN or infinite entries. {fix}")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    # |det| / product of the column lengths is the sine-like volume factor of the axes:
    # 1 for orthogonal axes, 0 for parallel ones, whatever the voxel size.
    if np.any(spacing < 1e-6) or abs(np.linalg.det(affine[:3, :3])) < 1e-6 * float(np.prod(spacing)):
        raise InputError(f"{what} has a singular voxel-to-world affine (voxel spacing "
                         f"{tuple(round(float(s), 4) for s in spacing)} mm, axes not independent): "
                         f"its voxels have no position in space. {fix}")
    if not np.allclose(affine[3], (0.0, 0.0, 0.0, 1.0)):
        raise InputError(f"{what} has an affine whose last row is {affine[3].tolist()}, not "
                         f"(0, 0, 0, 1). {fix}")
    return affine


@dataclass
class Volume:
    """Array + 4×4 voxel-to-world (RAS+, mm) affine, optionally with frame times.

    Parameters
    ----------
    array
        3-D ``(i, j, k)`` or 4-D ``(i, j, k, t)`` voxel data.
    affine
        4×4 matrix mapping voxel indices to RAS+ millimetres (nibabel's convention).
    frame_times
        Acquisition time of each frame in seconds, for 4-D volumes only.
    meta
        Free-form provenance (source path, modality, DICOM series UID, ...).
    """

    array: np.ndarray
    affine: np.ndarray
    frame_times: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        check_affine(self.affine)
        kind = self.array.dtype.kind
        if kind not in "biuf":  # complex, RGB (structured), strings, objects: no intensities to use
            raise InputError(f"the image holds voxels of type {self.array.dtype} (complex, colour or "
                             "non-numeric); ctp2mri reads real-valued images (integer or floating point "
                             "intensities). Convert it to a greyscale image first.")
        if self.array.ndim not in (3, 4):
            raise InputError(
                f"a volume needs 3 (x, y, z) or 4 (x, y, z, time) dimensions, "
                f"got {self.array.ndim} with shape {self.array.shape}"
            )
        if self.frame_times is not None:
            self.frame_times = np.asarray(self.frame_times, dtype=np.float64)
            if self.array.ndim != 4 or self.frame_times.shape != (self.array.shape[3],):
                raise InputError(
                    f"frame_times has {self.frame_times.size} entries but the volume has "
                    f"shape {self.array.shape}; give one time per frame of a 4-D volume"
                )

    # geometry ----------------------------------------------------------------------------
    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[:3])  # type: ignore[return-value]

    @property
    def n_frames(self) -> int:
        """Number of time points (1 for a 3-D volume)."""
        return int(self.array.shape[3]) if self.array.ndim == 4 else 1

    @property
    def is_4d(self) -> bool:
        return self.array.ndim == 4

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """Axis codes such as ``"RAS"`` or ``"LPS"`` (nibabel's ``aff2axcodes``)."""
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))

    def same_grid(self, other: "Volume", atol: float = 1e-3) -> bool:
        """True if both volumes share spatial shape and affine (to ``atol`` mm)."""
        return self.spatial_shape == other.spatial_shape and bool(
            np.allclose(self.affine, other.affine, atol=atol)
        )

    def with_array(self, array: np.ndarray, **changes: Any) -> "Volume":
        """A new volume on the same grid holding ``array``.

        Frame times are dropped when the new array is 3-D.
        """
        array = np.asarray(array)
        if array.shape[:3] != self.spatial_shape:
            raise InputError(
                f"array of shape {array.shape} does not fit the grid {self.spatial_shape}"
            )
        frame_times = self.frame_times if array.ndim == 4 and self.is_4d and array.shape[3] == self.n_frames else None
        return replace(self, array=array, frame_times=changes.pop("frame_times", frame_times),
                       meta=changes.pop("meta", dict(self.meta)), **changes)

    # validation helpers: each raises InputError naming the volume ----------------------------
    def require_4d(self, name: str = "CTP") -> "Volume":
        if not self.is_4d:
            raise InputError(
                f"{name} has {self.array.ndim} dimensions {self.array.shape}; a CT-perfusion "
                "series needs 4 (x, y, z, time). Load the whole perfusion series (a 4-D NIfTI "
                "or the DICOM directory with all time points), not a single frame."
            )
        if self.n_frames < 2:
            raise InputError(
                f"{name} has only {self.n_frames} time point; CT perfusion needs at least 2 "
                "frames (the model uses 15) to see how contrast arrives and washes out."
            )
        return self

    def require_3d(self, name: str = "volume") -> "Volume":
        if self.is_4d:
            raise InputError(
                f"{name} has 4 dimensions {self.array.shape}; expected a 3-D (x, y, z) volume"
            )
        return self

    def require_finite(self, name: str = "volume") -> "Volume":
        if not np.issubdtype(self.array.dtype, np.floating):
            return self  # integer voxels are always finite
        # Frame by frame: a clinical float CTP would otherwise need a GB-sized boolean copy.
        frames = range(self.n_frames) if self.is_4d else [None]
        # The pipeline computes in float32: a float64 value beyond its range becomes inf there.
        # (NaN fails the comparison too, so one pass finds both.)
        limit = float(np.finfo(np.float32).max)
        for t in frames:
            frame = self.array[..., t] if t is not None else self.array
            bad = ~(np.abs(frame) <= limit)
            if bad.any():
                first = tuple(int(i) for i in np.argwhere(bad)[0]) + ((t,) if t is not None else ())
                where = f" in frame {t}" if t is not None else ""
                n_huge = int(np.isfinite(frame[bad]).sum())
                what = (f"{int(bad.sum())} NaN/inf voxels" if not n_huge else
                        f"{int(bad.sum())} NaN/inf or out-of-range (|value| > {limit:.3g}) voxels")
                raise InputError(
                    f"{name} contains {what}{where} (first at index {first}); fix or mask them before use"
                )
        return self

    def require_same_grid(self, other: "Volume", name: str, other_name: str) -> "Volume":
        if not self.same_grid(other):
            raise InputError(
                f"{name} (shape {self.spatial_shape}, spacing "
                f"{tuple(round(s, 3) for s in self.spacing)}) and {other_name} (shape "
                f"{other.spatial_shape}, spacing {tuple(round(s, 3) for s in other.spacing)}) "
                "are on different grids; resample one onto the other first "
                "(ctp2mri preprocess does this)"
            )
        return self

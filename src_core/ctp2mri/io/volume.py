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
        if self.affine.shape != (4, 4):
            raise InputError(f"affine must be 4×4, got shape {self.affine.shape}")
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
        for t in frames:
            frame = self.array[..., t] if t is not None else self.array
            bad = ~np.isfinite(frame)
            if bad.any():
                first = tuple(int(i) for i in np.argwhere(bad)[0]) + ((t,) if t is not None else ())
                where = f" in frame {t}" if t is not None else ""
                raise InputError(
                    f"{name} contains {int(bad.sum())} NaN/inf voxels{where} (first at index "
                    f"{first}); fix or mask them before use"
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

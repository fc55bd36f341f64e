"""Smooth random fields in MNI space, shared by anatomy, lesions and perfusion.

Every random pattern of a case is drawn on a coarse grid fixed in template (MNI) millimetres,
never on the output grid, so one seed describes the same patient on every profile's grid and
the CT-perfusion and MRI geometries (which differ by a small misalignment) see the same tissue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# A box in MNI mm holding the template brain with room for the per-case deformation.
FIELD_LO = np.array([-100.0, -135.0, -90.0])
FIELD_HI = np.array([100.0, 100.0, 110.0])


@dataclass(frozen=True)
class SmoothField:
    """A zero-mean, unit-variance random field sampled on a coarse regular MNI grid."""

    values: np.ndarray  # (nx, ny, nz) float32
    origin: np.ndarray  # MNI mm of values[0, 0, 0]
    spacing: float  # mm between grid points

    def at(self, points: np.ndarray) -> np.ndarray:
        """Trilinear value at MNI points of shape ``(3, ...)``."""
        points = np.asarray(points, dtype=np.float64)
        index = (points - self.origin.reshape((3,) + (1,) * (points.ndim - 1))) / self.spacing
        return ndimage.map_coordinates(self.values, index, order=1, mode="nearest")


def smooth_field(
    rng: np.random.Generator, correlation_mm: float, spacing_mm: float = 4.0
) -> SmoothField:
    """Gaussian-filtered white noise over the MNI box, normalised to unit variance.

    Parameters
    ----------
    rng
        The case's generator; the number of draws depends only on the arguments, not on the
        output grid.
    correlation_mm
        Standard deviation of the Gaussian smoothing kernel, i.e. the size of the blobs.
    spacing_mm
        Grid step; a few times smaller than ``correlation_mm`` keeps trilinear sampling smooth.
    """
    shape = tuple(int(n) for n in np.ceil((FIELD_HI - FIELD_LO) / spacing_mm) + 1)
    white = rng.standard_normal(shape)
    smooth = ndimage.gaussian_filter(white, correlation_mm / spacing_mm, mode="wrap")
    smooth = (smooth - smooth.mean()) / smooth.std()
    return SmoothField(smooth.astype(np.float32), FIELD_LO.copy(), float(spacing_mm))


def separable_rbf_field(
    coefficients: np.ndarray,
    knots: tuple[np.ndarray, ...],
    width_mm: float,
    axes: tuple[np.ndarray, ...],
) -> np.ndarray:
    """Evaluate a sum of Gaussian bumps at the knots on a rectilinear grid.

    ``field[i, j, k] = Σ c[a, b, d] · g(x_i − X_a) · g(y_j − Y_b) · g(z_k − Z_d)``: the kernel is
    separable, so the whole grid costs three small tensor contractions instead of a per-voxel
    interpolation.

    Parameters
    ----------
    coefficients
        ``(kx, ky, kz)`` bump heights.
    knots
        Knot positions (mm) along x, y, z.
    width_mm
        Gaussian standard deviation of each bump.
    axes
        Coordinates (mm) of the grid along x, y, z.
    """
    weights = [np.exp(-0.5 * ((a[:, None] - k[None, :]) / width_mm) ** 2)
               for a, k in zip(axes, knots)]
    out = np.tensordot(coefficients, weights[2], axes=([2], [1]))  # (kx, ky, nz)
    out = np.tensordot(out, weights[1], axes=([1], [1]))  # (kx, nz, ny)
    out = np.tensordot(weights[0], out, axes=([1], [0]))  # (nx, nz, ny)
    return out.transpose(0, 2, 1)

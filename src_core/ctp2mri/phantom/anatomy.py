"""Brain anatomy of a phantom case: MNI152 tissue maps warped per case onto the model grid.

The templates are the MNI152 (ICBM 2009a) T1, grey- and white-matter maps that nilearn ships
inside its package (no download). Each case applies its own smooth deformation (small affine
plus a low-frequency elastic field) so that no two cases share anatomy, and the maps are
sampled once per geometry (the MRI grid and the slightly misaligned CT-perfusion grid).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from ctp2mri.errors import InputError
from ctp2mri.phantom.fields import FIELD_HI, FIELD_LO, separable_rbf_field
from ctp2mri.profiles import Profile, get_profile

N_SLICES = 37  # 5 mm axial slices: 185 mm, the whole brain with room for a 10 % larger head
BRAIN_CENTRE_MNI = np.array([0.0, -17.0, 5.0])  # centre of the MNI152 brain's bounding box
TEMPLATE_MARGIN_MM = 8
ELASTIC_KNOT_SPACING_MM = 40.0


# model grid ------------------------------------------------------------------------------------
def model_grid(profile: str | Profile) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and RAS affine of a profile's axial grid, centred on the brain.

    World coordinates of the grid are MNI millimetres before the per-case deformation, so an
    undeformed case sits exactly where the template does.
    """
    prof = get_profile(profile) if isinstance(profile, str) else profile
    shape = (int(prof.shape_xy[0]), int(prof.shape_xy[1]), N_SLICES)
    spacing = np.asarray(prof.spacing, dtype=np.float64)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = BRAIN_CENTRE_MNI - (np.asarray(shape) - 1) / 2.0 * spacing
    return shape, affine


def grid_axes(shape: tuple[int, int, int], affine: np.ndarray) -> tuple[np.ndarray, ...]:
    """World coordinate (mm) of every index along x, y, z of an axis-aligned grid."""
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))):
        raise InputError("the phantom needs an axis-aligned model grid (diagonal affine)")
    return tuple(affine[i, i] * np.arange(n) + affine[i, 3] for i, n in enumerate(shape))


# templates -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TissueTemplates:
    """MNI152 tissue maps on a 1 mm crop, pre-blurred for one profile's voxel size.

    ``brain`` is the brain fraction; ``gm`` and ``wm`` are grey/white-matter fractions of the
    whole voxel (CSF is ``brain − gm − wm``).
    """

    brain: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    origin: np.ndarray  # MNI mm of voxel (0, 0, 0)
    spacing: float  # mm

    def index(self, points: np.ndarray) -> np.ndarray:
        """Fractional voxel indices of MNI points ``(3, ...)``."""
        return (points - self.origin.reshape((3,) + (1,) * (points.ndim - 1))) / self.spacing


# The files nilearn's load_mni152_* functions read, shipped inside the nilearn package.
_MNI152_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
_MNI152_MASK_THRESHOLD = 0.2  # nilearn's load_mni152_brain_mask: T1 (scaled to [0, 1]) > 0.2


def _load_mni152() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The MNI152 T1, GM, WM maps (each scaled to [0, 1]) and brain mask at 1 mm, and their affine.

    Reads the files nilearn ships exactly as ``nilearn.datasets.load_mni152_*(resolution=1)``
    do; importing ``nilearn.datasets`` itself costs seconds (it pulls in scikit-learn), so the
    loaders are only the fallback for a nilearn whose package layout differs.
    """
    import importlib.util

    import nibabel as nib

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the phantom needs nilearn (its MNI152 templates); install nilearn")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    if all((folder / f).is_file() for f in _MNI152_FILES.values()):
        images = {k: nib.load(folder / f) for k, f in _MNI152_FILES.items()}
        maps = {k: np.asarray(img.dataobj, dtype=np.float32) for k, img in images.items()}
        maps = {k: a / a.max() for k, a in maps.items()}
        maps["mask"] = (maps["t1"] > _MNI152_MASK_THRESHOLD).astype(np.float32)
        affines = [img.affine for img in images.values()]
    else:  # pragma: no cover - depends on the installed nilearn
        from nilearn import datasets

        loaded = {
            "t1": datasets.load_mni152_template(resolution=1),
            "gm": datasets.load_mni152_gm_template(resolution=1),
            "wm": datasets.load_mni152_wm_template(resolution=1),
            "mask": datasets.load_mni152_brain_mask(resolution=1),
        }
        maps = {k: np.asarray(img.dataobj, dtype=np.float32) for k, img in loaded.items()}
        affines = [img.affine for img in loaded.values()]
    affine = affines[0]
    same_grid = all(a.shape == maps["t1"].shape for a in maps.values())
    if not same_grid or not all(np.allclose(a, affine) for a in affines):
        raise RuntimeError("nilearn's MNI152 templates do not share one grid; check nilearn")
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise RuntimeError("expected nilearn's MNI152 templates at 1 mm, axis-aligned RAS")
    return maps, affine


@functools.lru_cache(maxsize=4)
def tissue_templates(profile: str) -> TissueTemplates:
    """Tissue maps ready to be sampled on ``profile``'s grid (cached: every case shares them).

    The maps are blurred by the difference between the profile's voxel and the 1 mm template
    voxel (box profile → σ = √((s² − 1)/12)), so that point sampling at the model grid gives the
    partial-volume average a 5 mm slice really records instead of aliasing.
    """
    prof = get_profile(profile)
    maps, affine = _load_mni152()
    inside = np.argwhere(maps["mask"] > 0)
    lo = np.maximum(inside.min(0) - TEMPLATE_MARGIN_MM, 0)
    hi = np.minimum(inside.max(0) + TEMPLATE_MARGIN_MM + 1, maps["mask"].shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    t1, mask, gm, wm = (maps[k][crop] for k in ("t1", "mask", "gm", "wm"))
    # Ventricles are dark on T1; the tissue priors still leak a little grey matter into them.
    free_water = 1.0 - np.clip((0.35 - t1) / 0.15, 0.0, 1.0)
    gm = np.clip(gm, 0, 1) * mask * free_water
    wm = np.clip(wm, 0, 1) * mask * free_water
    over = np.maximum(gm + wm, 1.0)  # priors are probabilities; keep fractions ≤ 1
    gm, wm = gm / over, wm / over
    # The priors are fuzzy: read as partial volumes they put 5–20 % CSF into a quarter of the
    # parenchyma, which would raise its ADC far above grey matter's 800. Sharpen the CSF share
    # at 1 mm; the blur below adds back the partial volume the model grid's voxels really have.
    csf = np.clip((mask - gm - wm - 0.2) / 0.6, 0.0, 1.0) * mask
    parenchyma = gm + wm
    keep = np.divide(mask - csf, parenchyma, out=np.zeros_like(parenchyma), where=parenchyma > 1e-6)
    gm, wm = gm * keep, wm * keep

    sigma = np.sqrt(np.maximum(np.asarray(prof.spacing) ** 2 - 1.0, 0.0) / 12.0)
    def blur(a: np.ndarray) -> np.ndarray:
        smooth = ndimage.gaussian_filter(a, sigma, mode="constant") if sigma.any() else a
        return np.ascontiguousarray(smooth, dtype=np.float32)

    out = [blur(a) for a in (mask, gm, wm)]
    origin = affine[:3, 3] + lo  # 1 mm voxels, identity rotation (checked by the loader)
    return TissueTemplates(*out, origin=origin.astype(np.float64), spacing=1.0)


# per-case deformation --------------------------------------------------------------------------
@dataclass(frozen=True)
class Rigid:
    """A small rigid motion about the grid centre (the residual CT→MRI misalignment)."""

    rotation_deg: np.ndarray  # (3,) about x, y, z
    shift_mm: np.ndarray  # (3,)

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Move world points ``(3, ...)``."""
        rot = Rotation.from_euler("xyz", self.rotation_deg, degrees=True).as_matrix()
        centred = points - BRAIN_CENTRE_MNI.reshape((3,) + (1,) * (points.ndim - 1))
        moved = np.tensordot(rot, centred, axes=1)
        return moved + (BRAIN_CENTRE_MNI + self.shift_mm).reshape((3,) + (1,) * (points.ndim - 1))


def random_misalignment(rng: np.random.Generator, spacing: tuple[float, float, float]) -> Rigid:
    """A CT→MRI residual registration error of at most about one voxel.

    Shifts stay within half a voxel per in-plane axis and ±1 mm through-plane; a rotation of
    0.4° moves the brain's edge (~80 mm from the centre) by about half a millimetre.
    """
    sx, sy, _ = spacing
    shift = rng.uniform(-0.5, 0.5, 3) * np.array([sx, sy, 2.0])
    rotation = rng.uniform(-0.4, 0.4, 3)
    return Rigid(rotation_deg=rotation, shift_mm=shift)


@dataclass(frozen=True)
class Deformation:
    """Maps a subject's world point to where it came from in the MNI template.

    ``q = c + R · (p − c − t) / s + u(p)`` with ``c`` the grid centre, a rotation ``R``, per-axis
    scale ``s`` (head size), translation ``t`` and a smooth elastic displacement ``u``.
    """

    rotation_deg: np.ndarray
    scale: np.ndarray
    translation_mm: np.ndarray
    elastic: np.ndarray  # (3, kx, ky, kz) Gaussian-bump heights in mm
    elastic_rms_mm: float  # the displacement RMS per axis those heights were drawn for

    def knots(self) -> tuple[np.ndarray, ...]:
        counts = self.elastic.shape[1:]
        return tuple(np.linspace(lo, hi, n) for lo, hi, n in zip(FIELD_LO, FIELD_HI, counts))

    def elastic_field(self, shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
        """The elastic displacement ``(3, nx, ny, nz)`` (mm) at every voxel of the grid."""
        axes = grid_axes(shape, affine)
        knots = self.knots()
        width = ELASTIC_KNOT_SPACING_MM
        return np.stack([separable_rbf_field(c, knots, width, axes) for c in self.elastic])

    def template_points(
        self,
        shape: tuple[int, int, int],
        affine: np.ndarray,
        misalignment: Rigid | None = None,
        elastic: np.ndarray | None = None,
    ) -> np.ndarray:
        """MNI coordinates ``(3, nx, ny, nz)`` that every voxel of the grid samples.

        ``misalignment`` moves the grid before the deformation (the CT's residual motion); the
        elastic field is evaluated at the unmoved grid, which differs by under a millimetre on a
        field that varies over centimetres. Pass ``elastic`` (`elastic_field`) to reuse it.
        """
        points = np.stack(np.meshgrid(*grid_axes(shape, affine), indexing="ij"))
        if misalignment is not None:
            points = misalignment.apply(points)
        if elastic is None:
            elastic = self.elastic_field(shape, affine)
        rot = Rotation.from_euler("xyz", self.rotation_deg, degrees=True).as_matrix()
        matrix = rot / self.scale[None, :]
        centre = BRAIN_CENTRE_MNI.reshape(3, 1, 1, 1)
        shifted = points - centre - self.translation_mm.reshape(3, 1, 1, 1)
        moved = np.einsum("ij,j...->i...", matrix, shifted)
        return moved + centre + elastic

    def describe(self) -> dict:
        return {
            "rotation_deg": np.round(self.rotation_deg, 3).tolist(),
            "scale": np.round(self.scale, 4).tolist(),
            "translation_mm": np.round(self.translation_mm, 3).tolist(),
            "elastic_rms_mm": round(self.elastic_rms_mm, 3),
        }


# Gaussian bumps one knot spacing wide add up to ~2.36× the RMS of their heights in 3-D
# (√(√π)³); used to turn a wanted displacement RMS into bump heights.
_RBF_GAIN = float(np.sqrt(np.sqrt(np.pi) ** 3))


def random_deformation(
    rng: np.random.Generator,
    max_rotation_deg: float = 8.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
    elastic_rms_mm: tuple[float, float] = (1.0, 3.0),
) -> Deformation:
    """Draw one case's deformation: rotation (yaw ±8°, pitch and roll ±4°), scale 0.9–1.1, a
    few mm of smooth elastic displacement and a few mm of translation."""
    # Heads tilt less about x and y than they turn in the axial plane.
    rotation = rng.uniform(-max_rotation_deg, max_rotation_deg, 3) * np.array([0.5, 0.5, 1.0])
    size = rng.uniform(*scale_range)
    scale = size * rng.uniform(0.97, 1.03, 3)  # heads are not all the same shape
    translation = rng.uniform(-4.0, 4.0, 3)
    n_knots = tuple(int(n) for n in np.round((FIELD_HI - FIELD_LO) / ELASTIC_KNOT_SPACING_MM) + 1)
    rms = rng.uniform(*elastic_rms_mm)
    elastic = rng.standard_normal((3, *n_knots)) * (rms / _RBF_GAIN)
    return Deformation(rotation, scale, translation, elastic, float(rms))


# tissue on the grid ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Tissue:
    """Tissue of one geometry: the brain mask and, per brain voxel, fractions and MNI position."""

    brain: np.ndarray  # (nx, ny, nz) bool
    fractions: np.ndarray  # (3, n_brain) float32: grey matter, white matter, CSF; sum 1
    points: np.ndarray  # (3, n_brain) MNI mm the voxel came from

    @property
    def gm(self) -> np.ndarray:
        return self.fractions[0]

    @property
    def wm(self) -> np.ndarray:
        return self.fractions[1]

    @property
    def csf(self) -> np.ndarray:
        return self.fractions[2]

    def scatter(self, values: np.ndarray, fill: float = 0.0, dtype=np.float32) -> np.ndarray:
        """Put per-brain-voxel ``values`` (``(n_brain,)`` or ``(n_brain, t)``) back on the grid."""
        out = np.full(self.brain.shape + values.shape[1:], fill, dtype=dtype)
        out[self.brain] = values
        return out


def sample_tissue(templates: TissueTemplates, points: np.ndarray) -> Tissue:
    """Sample the templates at MNI ``points`` ``(3, nx, ny, nz)`` (trilinear, 0 outside)."""
    index = templates.index(points)
    brain_fraction = ndimage.map_coordinates(templates.brain, index, order=1, mode="constant")
    brain = brain_fraction >= 0.5
    inside = index[:, brain]
    total = brain_fraction[brain]
    gm = ndimage.map_coordinates(templates.gm, inside, order=1, mode="constant") / total
    wm = ndimage.map_coordinates(templates.wm, inside, order=1, mode="constant") / total
    gm = np.clip(gm, 0.0, 1.0)
    wm = np.clip(wm, 0.0, 1.0 - gm)
    csf = 1.0 - gm - wm
    return Tissue(brain, np.stack([gm, wm, csf]).astype(np.float32), points[:, brain])

"""Large vessels of the CT perfusion: arteries and venous sinuses with partial volume.

Clinical perfusion analysis needs them: the arterial input function (AIF) is read in an artery
(ICA, MCA, ACA), the venous output function (VOF) in a sinus, and partial volume makes the
arterial curve too low unless it is rescaled with the venous one. The phantom therefore draws
a vessel tree in MNI space (centre lines with radii), carries it with each case's deformation,
and mixes blood into the voxels it crosses by the fraction of the voxel the tube fills,
supersampled within every voxel.

Blood enhancement: an artery carries the AIF delayed by its distance from the ICA (a fraction of
a second); a sinus carries the venous output function, the AIF dispersed by the brain's transit
time (a gamma variate of unit area, so the indicator that went in comes out: ∫VOF = ∫AIF). In a
large-vessel occlusion the arteries beyond it (the ipsilateral MCA branches for an MCA-territory
lesion, the distal PCA for a PCA one) fill late and weakly through collaterals.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from ctp2mri.phantom.anatomy import Deformation

ARTERY, VEIN = 1, 2
BLOOD_BASELINE_HU = 40.0  # unenhanced blood
_STEP_MM = 0.25  # spacing of the centre-line samples; distances are exact to within half of it
_SUBSAMPLES = (3, 3, 5)  # points per voxel along x, y, z for the partial volume


@dataclass(frozen=True)
class Segment:
    """A vessel segment in MNI mm, drawn for the right hemisphere (mirrored for the left)."""

    name: str
    kind: int  # ARTERY or VEIN
    points: tuple[tuple[float, float, float], ...]
    radius_mm: float
    delay_s: float  # arterial arrival after the ICA
    bilateral: bool = True
    territory: str | None = None  # the lesion territory whose occlusion starves this segment


# Centre lines follow the MNI152 anatomy closely enough for partial volume and timing: the
# internal carotid, the MCA's M1 and its M2 trunks over the insula, the ACA up to the
# pericallosal artery, the basilar artery and the PCA round the midbrain to the occipital lobe;
# the superior sagittal, straight and transverse sinuses and the deep veins.
VESSEL_TREE: tuple[Segment, ...] = (
    Segment("ICA", ARTERY, ((16, 2, -32), (14, 2, -22), (13, 3, -14)), 2.3, 0.0),
    Segment("M1", ARTERY, ((13, 3, -14), (24, 4, -12), (35, 6, -8)), 1.6, 0.2),
    Segment("M2 inferior", ARTERY, ((35, 6, -8), (39, -5, 0), (41, -20, 8), (44, -32, 18)), 1.2, 0.5, True, "MCA"),
    Segment("M2 superior", ARTERY, ((35, 6, -8), (38, 14, 4), (40, 18, 18)), 1.2, 0.5, True, "MCA"),
    Segment("A1", ARTERY, ((13, 3, -14), (6, 12, -12), (2, 16, -10)), 1.1, 0.2),
    Segment("A2", ARTERY, ((2, 16, -10), (3, 30, 2), (4, 32, 18), (4, 15, 30), (4, -10, 36), (4, -35, 36)),
            1.0, 0.5),
    Segment("basilar", ARTERY, ((0, -26, -40), (0, -22, -28), (0, -18, -18)), 1.6, 0.3, False),
    Segment("P1-P2", ARTERY, ((0, -18, -18), (10, -24, -14), (20, -38, -6)), 1.1, 0.4),
    Segment("P3-P4", ARTERY, ((20, -38, -6), (22, -55, 0), (16, -72, 4), (10, -88, 6)), 0.9, 0.8, True, "PCA"),
    Segment("superior sagittal sinus", VEIN,
            ((0, 55, 28), (0, 35, 55), (0, 5, 70), (0, -30, 70), (0, -65, 55), (0, -90, 28), (0, -100, 5)),
            3.5, 0.0, False),
    Segment("straight sinus", VEIN, ((0, -45, 6), (0, -65, 6), (0, -85, 4), (0, -100, 5)), 2.5, 0.0, False),
    Segment("transverse sinus", VEIN, ((0, -100, 5), (25, -100, -2), (42, -85, -12), (46, -68, -22)), 3.0, 0.0),
    Segment("internal cerebral vein", VEIN, ((4, -5, 16), (2, -25, 12), (0, -45, 6)), 1.2, 0.0),
)


@dataclass(frozen=True)
class VesselParams:
    """One case's vessel timing: the venous transit and, in an occlusion, the collateral filling."""

    venous_delay_s: float  # mean transit from artery to sinus
    venous_dispersion: float  # gamma shape of the transit-time density (larger: narrower)
    collateral_gain: float  # peak of a starved artery relative to a normal one
    collateral_delay_s: float
    radius_scale: float  # vessel calibre of this head

    def describe(self) -> dict:
        return {"venous_delay_s": round(self.venous_delay_s, 3), "collateral_gain": round(self.collateral_gain, 3),
                "collateral_delay_s": round(self.collateral_delay_s, 3), "radius_scale": round(self.radius_scale, 3)}


def draw_vessel_params(rng: np.random.Generator) -> VesselParams:
    """Draw venous transit (5–8 s), collateral filling (30–60 % of normal, 3–7 s late) and calibre."""
    return VesselParams(venous_delay_s=rng.uniform(5.0, 8.0), venous_dispersion=rng.uniform(4.0, 8.0),
                        collateral_gain=rng.uniform(0.3, 0.6), collateral_delay_s=rng.uniform(3.0, 7.0),
                        radius_scale=rng.uniform(0.9, 1.15))


@dataclass(frozen=True)
class CentreLines:
    """Dense centre-line samples of every segment of both hemispheres."""

    points: np.ndarray  # (n, 3) MNI mm
    radius: np.ndarray  # (n,) mm
    segment: np.ndarray  # (n,) index into `segments`
    segments: tuple[tuple[Segment, str], ...]  # (segment, side: "right", "left" or "midline")


@functools.lru_cache(maxsize=1)
def centre_lines() -> CentreLines:
    """Sample the tree every 0.25 mm, mirroring the bilateral segments into the left hemisphere."""
    points, radius, index, segments = [], [], [], []
    for seg in VESSEL_TREE:
        sides = ("right", "left") if seg.bilateral else ("midline",)
        for side in sides:
            knots = np.asarray(seg.points, dtype=np.float64) * (np.array([-1.0, 1.0, 1.0]) if side == "left" else 1.0)
            for a, b in zip(knots[:-1], knots[1:]):
                n = max(2, int(np.ceil(np.linalg.norm(b - a) / _STEP_MM)) + 1)
                samples = a + (b - a) * np.linspace(0.0, 1.0, n)[:, None]
                points.append(samples)
                radius.append(np.full(n, seg.radius_mm))
                index.append(np.full(n, len(segments)))
            segments.append((seg, side))
    return CentreLines(np.concatenate(points), np.concatenate(radius), np.concatenate(index), tuple(segments))


@dataclass(frozen=True)
class VesselMap:
    """Blood fraction of every voxel of a grid, and which segment fills it."""

    fraction: np.ndarray  # (nx, ny, nz) float32 in [0, 1]
    segment: np.ndarray  # (nx, ny, nz) int16, −1 where no vessel
    segments: tuple[tuple[Segment, str], ...]

    def kind(self) -> np.ndarray:
        """0 (none), ARTERY or VEIN per voxel (uint8), where the fraction is above 0."""
        kinds = np.array([seg.kind for seg, _ in self.segments] + [0], dtype=np.uint8)
        return np.where(self.fraction > 0, kinds[self.segment], 0).astype(np.uint8)


def vessel_map(template_points: np.ndarray, spacing: np.ndarray, deformation: Deformation,
               radius_scale: float = 1.0) -> VesselMap:
    """Partial-volume blood fraction of each voxel whose MNI position is ``template_points``.

    ``template_points`` (3, nx, ny, nz) are where the voxels' centres came from in MNI space
    (`Deformation.template_points`); a voxel's extent there is its box of ``spacing`` mm
    mapped by the deformation's linear part (the elastic field varies over centimetres), and
    the fraction is the share of its 3 × 3 × 5 subsamples that lie inside a tube.
    """
    lines = centre_lines()
    tree = cKDTree(lines.points)
    radius = lines.radius * float(radius_scale)
    shape = template_points.shape[1:]
    flat = template_points.reshape(3, -1).T
    jac = Rotation.from_euler("xyz", deformation.rotation_deg, degrees=True).as_matrix() / deformation.scale[None, :]
    reach = float(radius.max()) + 0.5 * float(np.linalg.norm(jac @ np.asarray(spacing, dtype=np.float64)))
    distance, _ = tree.query(flat, distance_upper_bound=reach)
    near = np.flatnonzero(np.isfinite(distance))
    fraction = np.zeros(flat.shape[0], dtype=np.float32)
    owner = np.full(flat.shape[0], -1, dtype=np.int16)
    if near.size:
        offsets = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) / n - 0.5 for n in _SUBSAMPLES], indexing="ij"), -1)
        offsets = (offsets.reshape(-1, 3) * np.asarray(spacing, dtype=np.float64)) @ jac.T  # (k, 3) MNI mm
        sub = flat[near, None, :] + offsets[None, :, :]
        d, nearest = tree.query(sub.reshape(-1, 3), distance_upper_bound=float(radius.max()))
        hit = np.isfinite(d)  # a miss returns the index n: point it at sample 0, outside anyway
        nearest = np.where(hit, nearest, 0)
        inside = (hit & (d < radius[nearest])).reshape(near.size, -1)
        fraction[near] = inside.mean(axis=1)
        seg = lines.segment[nearest].reshape(near.size, -1)
        # the segment that fills most of the voxel's inside subsamples (ties: the first)
        counts = np.stack([(inside & (seg == s)).sum(axis=1) for s in range(len(lines.segments))], axis=1)
        owner[near] = np.where(fraction[near] > 0, counts.argmax(axis=1), -1)
    return VesselMap(fraction.reshape(shape), owner.reshape(shape), lines.segments)


def transit_density(t: np.ndarray, mean_s: float, shape: float) -> np.ndarray:
    """Gamma density of shape ``shape`` and mean ``mean_s`` on the grid ``t`` (unit area)."""
    theta = mean_s / shape
    s = np.clip(t, 1e-9, None)
    log_pdf = (shape - 1.0) * np.log(s) - s / theta
    pdf = np.where(t > 0, np.exp(log_pdf - log_pdf.max()), 0.0)
    area = pdf.sum() * (t[1] - t[0])
    return pdf / area if area > 0 else pdf


def blood_curves(vessels: VesselMap, aif_fine: np.ndarray, dt: float, frame_times: np.ndarray,
                 params: VesselParams, occluded_territory: str | None, occluded_side: str | None
                 ) -> np.ndarray:
    """Enhancement (HU above blood baseline) of each segment at the frame times, (n_segments, T).

    ``aif_fine`` is the arterial input on a grid of step ``dt`` from 0 s. Arteries read it at
    their delay; an artery of the occluded territory on the lesion's side is dispersed,
    reduced to the collateral gain and delayed; sinuses carry the venous output function
    AIF ⊛ h_transit (∫VOF = ∫AIF).
    """
    t = np.arange(aif_fine.size) * dt
    venous = np.convolve(aif_fine, transit_density(t, params.venous_delay_s, params.venous_dispersion))[: t.size] * dt
    collateral_kernel = transit_density(t, 2.0, 2.0)
    collateral = np.convolve(aif_fine, collateral_kernel)[: t.size] * dt
    curves = np.zeros((len(vessels.segments), frame_times.size))
    for i, (seg, side) in enumerate(vessels.segments):
        if seg.kind == VEIN:
            curves[i] = np.interp(frame_times, t, venous)
            continue
        starved = occluded_territory is not None and seg.territory == occluded_territory and side == occluded_side
        if starved:
            curve, delay = params.collateral_gain * collateral / max(collateral.max(), 1e-9) * aif_fine.max(), \
                seg.delay_s + params.collateral_delay_s
        else:
            curve, delay = aif_fine, seg.delay_s
        curves[i] = np.interp(frame_times - delay, t, curve, left=0.0)
    return curves


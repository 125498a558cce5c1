"""PVS: how many, where (centrum semiovale, basal ganglia), and their sizes and directions,
as reported in the PVS simulation literature."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from napari_pvs.phantom.anatomy import REFERENCE_BRAIN_MM3, Anatomy
from napari_pvs.phantom.maps import BASAL_GANGLIA, WHITE_MATTER
from napari_pvs.phantom.placement import Placer, random_voxel_mm
from napari_pvs.phantom.shapes import centreline_voxels, jitter, polyline

#: PVS count per reference-size brain at severity 0 and 1 (interpolated linearly).
_PVS_COUNT_RANGE = (20, 300)

#: Fraction of PVS placed in the basal ganglia (the rest go to the centrum semiovale).
_BASAL_GANGLIA_SHARE = 0.35

#: PVS diameters: log-normal around this median (mm), clipped to 0.6-4 mm at that median.
_PVS_DIAMETER_MEDIAN_MM, _PVS_DIAMETER_CLIP_MM = 1.4, (0.6, 4.0)


def _radial_direction(depth: np.ndarray, point_mm: np.ndarray, spacing) -> np.ndarray:
    """Unit vector pointing from ``point_mm`` towards the nearest brain surface (mm space)."""
    sp = np.asarray(spacing)
    idx = np.clip(np.rint(point_mm / sp).astype(int), 0, np.array(depth.shape) - 1)
    grad = np.zeros(3)
    for a in range(3):
        h = max(1, round(2.0 / sp[a]))
        lo, hi = idx.copy(), idx.copy()
        lo[a] = max(idx[a] - h, 0)
        hi[a] = min(idx[a] + h, depth.shape[a] - 1)
        if hi[a] > lo[a]:
            grad[a] = (depth[tuple(hi)] - depth[tuple(lo)]) / ((hi[a] - lo[a]) * sp[a])
    norm = np.linalg.norm(grad)
    return -grad / norm if norm > 0 else np.array([1.0, 0.0, 0.0])


def pvs_count(severity: float, brain_mm3: float, per_brain: float | None = None) -> int:
    """PVS to place: ``per_brain`` (default: from ``severity``) scaled by the brain volume."""
    if per_brain is None:
        per_brain = _PVS_COUNT_RANGE[0] + severity * (_PVS_COUNT_RANGE[1] - _PVS_COUNT_RANGE[0])
    return max(1, round(per_brain * brain_mm3 / REFERENCE_BRAIN_MM3))


@dataclass
class PlacedPVS:
    """The placed PVS: ground truth, instance labels, partial volume, one table row each."""

    mask: np.ndarray  # uint8 0/1 ground truth
    instances: np.ndarray  # uint16 labels
    fraction: np.ndarray  # float32 partial volume
    table: list[dict]


def place_pvs(
    placer: Placer, anat: Anatomy, target: int, rng, diameter_mm: float | None = None
) -> PlacedPVS:
    """Radial tubes in the centrum semiovale, near-vertical ones in the basal ganglia.

    Diameters are log-normal around ``diameter_mm`` (default 1.4 mm), clipped in proportion.
    """
    median = _PVS_DIAMETER_MEDIAN_MM if diameter_mm is None else float(diameter_mm)
    scale = median / _PVS_DIAMETER_MEDIAN_MM
    low, high = (_PVS_DIAMETER_CLIP_MM[0] * scale, _PVS_DIAMETER_CLIP_MM[1] * scale)
    shape, spacing, regions = placer.shape, placer.spacing, anat.regions
    out = PlacedPVS(
        mask=np.zeros(shape, np.uint8),
        instances=np.zeros(shape, np.uint16),
        fraction=np.zeros(shape, np.float32),
        table=[],
    )
    if target == 0:
        return out
    depth = ndimage.distance_transform_edt(regions > 0, sampling=spacing).astype(np.float32)
    allowed = (regions == WHITE_MATTER) | (regions == BASAL_GANGLIA)
    # Centrum semiovale: white matter above the middle of the lateral ventricles.
    ventricle_z = np.nonzero(anat.ventricles.any(axis=(1, 2)))[0]
    cso = regions == WHITE_MATTER
    cso[: int(ventricle_z.mean()) if len(ventricle_z) else shape[0] // 2] = False
    cso_flat = np.flatnonzero(cso if cso.any() else regions == WHITE_MATTER)
    bg_flat = np.flatnonzero(regions == BASAL_GANGLIA)
    for attempt in range(30 * target):
        if len(out.table) >= target:
            break
        in_bg = len(bg_flat) > 0 and (rng.random() < _BASAL_GANGLIA_SHARE or not len(cso_flat))
        pool = bg_flat if in_bg else cso_flat
        if not len(pool):
            break
        diameter = float(np.clip(rng.lognormal(np.log(median), 0.33), low, high))
        length = float(np.clip(rng.lognormal(np.log(6.0 if in_bg else 9.0), 0.45), 2.0, 20.0))
        if attempt > 10 * target:  # crowded volume: try shorter tubes
            length = max(2.0, length / 2)
        centre = random_voxel_mm(pool, shape, spacing, rng)
        if in_bg:
            direction = jitter(np.array([1.0, 0.0, 0.0]), 12.0, rng)
        else:
            direction = jitter(_radial_direction(depth, centre, spacing), 8.0, rng)
        pts = polyline(centre, direction, length, rng.uniform(0.0, 0.08), rng)
        res = placer.render_tube(pts, diameter / 2)
        if res is None:
            continue
        box, frac = res
        solid = placer.place(box, frac, centreline_voxels(pts, spacing, shape), allowed)
        if solid is None:
            continue
        label = len(out.table) + 1
        out.mask[box][solid] = 1
        out.instances[box][solid] = label
        out.fraction[box] = np.maximum(out.fraction[box], frac)
        out.table.append(
            {
                "label": label,
                "region": "basal_ganglia" if in_bg else "white_matter",
                "diameter_mm": round(diameter, 3),
                "length_mm": round(length, 3),
                "centre_mm": [round(float(v), 2) for v in centre],
                "direction": [round(float(v), 4) for v in direction],
            }
        )
    return out

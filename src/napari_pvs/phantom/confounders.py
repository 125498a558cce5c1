"""Confounders: lacunes, white-matter hyperintensities and vessels, which look like PVS but
must not be labelled PVS."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from napari_pvs.phantom.anatomy import Anatomy
from napari_pvs.phantom.maps import (
    BASAL_GANGLIA,
    CONFOUNDER_NAMES,
    LACUNE,
    VESSEL,
    WHITE_MATTER,
    WMH,
)
from napari_pvs.phantom.placement import Placer, random_voxel_mm
from napari_pvs.phantom.shapes import (
    centreline_voxels,
    partial_volume,
    polyline,
    spheres_inside,
)


@dataclass
class Confounders:
    """The placed confounders: solid labels, partial-volume owner and fraction, counts."""

    labels: np.ndarray  # uint8 CONFOUNDER_NAMES where solid
    owner: np.ndarray  # uint8 label of the confounder holding each partial-volume voxel
    fraction: np.ndarray  # float32 partial volume
    counts: dict[str, int]


def place_confounders(
    placer: Placer, anat: Anatomy, severity: float, brain_scale: float, rng, enabled: bool
) -> Confounders:
    """Lacunes, white-matter hyperintensities and vessels, each kept apart from the others."""
    shape, spacing, regions = placer.shape, placer.spacing, anat.regions
    out = Confounders(
        labels=np.zeros(shape, np.uint8),
        owner=np.zeros(shape, np.uint8),
        fraction=np.zeros(shape, np.float32),
        counts={name: 0 for name in CONFOUNDER_NAMES.values()},
    )
    deep_tissue = (regions == WHITE_MATTER) | (regions == BASAL_GANGLIA)
    deep_flat = np.flatnonzero(deep_tissue)
    if not enabled or not len(deep_flat):
        return out
    size = min(1.0, max(brain_scale, 0.3))  # confounders shrink with small brains
    no_line = np.zeros((0, 3), int)

    def add(label: int, box, frac, line_idx, allowed) -> bool:
        solid = placer.place(box, frac, line_idx, allowed)
        if solid is None:
            return False
        out.labels[box][solid] = label
        out.owner[box][frac > 0] = label
        out.fraction[box] = np.maximum(out.fraction[box], frac)
        out.counts[CONFOUNDER_NAMES[label]] += 1
        return True

    # Lacunes: round CSF-filled cavities, 3-15 mm, in deep white matter or basal ganglia.
    for _ in range(int(rng.poisson((0.3 + 2.0 * severity) * brain_scale**3 + 0.2))):
        for _attempt in range(20):
            c = random_voxel_mm(deep_flat, shape, spacing, rng)
            rad = 0.5 * rng.uniform(3.0, 15.0) * size
            res = partial_volume(c - rad, c + rad, spacing, shape, spheres_inside(c[None], [rad]))
            if res and add(LACUNE, *res, no_line, deep_tissue):
                break
    # White-matter hyperintensities: irregular blobs hugging the ventricles.
    near_vent = ndimage.binary_dilation(anat.ventricles, iterations=max(1, int(4 / min(spacing))))
    wmh_flat = np.flatnonzero(near_vent & (regions == WHITE_MATTER))
    for _ in range(int(rng.poisson(1.0 + 4.0 * severity)) if len(wmh_flat) else 0):
        for _attempt in range(20):
            c = random_voxel_mm(wmh_flat, shape, spacing, rng)
            k = int(rng.integers(2, 5))
            centres = c + rng.normal(scale=3.0 * size, size=(k, 3))
            radii = rng.uniform(2.0, 6.0, k) * size
            lo = (centres - radii[:, None]).min(axis=0)
            hi = (centres + radii[:, None]).max(axis=0)
            res = partial_volume(lo, hi, spacing, shape, spheres_inside(centres, radii))
            if res is None:
                continue
            box, frac = res
            frac = frac * (regions[box] == WHITE_MATTER)  # WMH live in white matter
            if frac.max() > 0 and add(WMH, box, frac, no_line, None):
                break
    # Vessels: long, thin-to-medium, dark flow voids crossing the deep brain in any direction.
    for _ in range(int(rng.integers(3, 8))):
        for _attempt in range(20):
            c = random_voxel_mm(deep_flat, shape, spacing, rng)
            length = rng.uniform(20.0, 50.0) * size
            pts = polyline(c, rng.normal(size=3), length, rng.uniform(0.0, 0.15), rng)
            rad = 0.5 * rng.uniform(0.8, 2.0)
            res = _render_tube_checked(placer, pts, rad, regions)
            if res is None:
                continue
            box, frac = res
            line = centreline_voxels(pts, spacing, shape)
            line = line[regions[tuple(line.T)] > 0]
            if add(VESSEL, box, frac * (regions[box] > 0), line, None):
                break
    return out


def _render_tube_checked(placer: Placer, pts: np.ndarray, radius: float, regions: np.ndarray):
    """Render a vessel tube only if its centre lies in the brain (cheap rejection first)."""
    mid = np.rint(pts[1] / np.asarray(placer.spacing)).astype(int)
    if np.any(mid < 0) or np.any(mid >= np.array(regions.shape)) or regions[tuple(mid)] == 0:
        return None
    return placer.render_tube(pts, radius)

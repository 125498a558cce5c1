"""Placing objects so that none touches another (one voxel gap), and where to draw them."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from napari_pvs.phantom.shapes import partial_volume, tube_inside


class Placer:
    """Draws objects, renders them, and keeps them apart (one voxel gap) from earlier ones."""

    def __init__(self, shape, spacing) -> None:
        self.shape = tuple(shape)
        self.spacing = spacing
        self.occupied = np.zeros(shape, dtype=bool)

    def render_tube(self, points: np.ndarray, radius: float):
        pad = radius + 1e-3
        return partial_volume(
            points.min(axis=0) - pad,
            points.max(axis=0) + pad,
            self.spacing,
            self.shape,
            tube_inside(points, radius),
        )

    def footprint(self, box, frac, line_idx) -> np.ndarray:
        """Voxels the object touches: any partial volume plus its centreline voxels."""
        touched = frac > 0
        start = np.array([s.start for s in box])
        local = line_idx - start
        ok = np.all((local >= 0) & (local < np.array(frac.shape)), axis=1)
        touched[tuple(local[ok].T)] = True
        return touched

    def fits(self, box, touched, allowed: np.ndarray | None) -> bool:
        if np.any(self.occupied[box] & touched):
            return False
        return allowed is None or bool(np.all(allowed[box][touched]))

    def place(self, box, frac, line_idx, allowed: np.ndarray | None) -> np.ndarray | None:
        """Claim the object's voxels if it fits; return its solid mask (fraction >= 0.5 plus
        centreline voxels) within ``box``, or None when it overlaps or leaves ``allowed``."""
        touched = self.footprint(box, frac, line_idx)
        if not self.fits(box, touched, allowed):
            return None
        self.occupy(box, touched)
        return (frac >= 0.5) | self.footprint(box, np.zeros_like(frac), line_idx)

    def occupy(self, box, touched) -> None:
        # Grow the box by one voxel so the gap also holds across its border.
        big = tuple(
            slice(max(s.start - 1, 0), min(s.stop + 1, n))
            for s, n in zip(box, self.shape, strict=True)
        )
        pad = [(s.start - b.start, b.stop - s.stop) for s, b in zip(box, big, strict=True)]
        grown = ndimage.binary_dilation(np.pad(touched, pad), structure=np.ones((3, 3, 3), bool))
        self.occupied[big] |= grown


def random_voxel_mm(candidates: np.ndarray, shape, spacing, rng) -> np.ndarray:
    """A random point (mm) inside a random voxel of ``candidates`` (flat indices)."""
    flat = candidates[rng.integers(len(candidates))]
    idx = np.array(np.unravel_index(flat, shape), dtype=float)
    return (idx + rng.uniform(-0.5, 0.5, 3)) * np.asarray(spacing)

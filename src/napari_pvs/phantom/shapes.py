"""Small objects (tubes, spheres) rendered with partial volume, and the shapes they take."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np

#: Finest sub-voxel sampling distance (mm) for partial-volume rendering.
_SUBSAMPLE_MM = 0.35


def _subsampling(spacing) -> tuple[int, ...]:
    return tuple(int(min(5, max(2, math.ceil(sp / _SUBSAMPLE_MM)))) for sp in spacing)


def partial_volume(
    lo_mm: np.ndarray,
    hi_mm: np.ndarray,
    spacing,
    shape,
    inside: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """Fraction of each voxel (in the box around ``lo_mm``..``hi_mm``) where ``inside`` holds.

    ``inside`` receives broadcastable sub-voxel coordinates in mm (z, y, x) and returns a boolean
    array; averaging it over the sub-voxel grid gives the partial-volume fraction.
    """
    sp = np.asarray(spacing)
    start = np.maximum(np.floor(lo_mm / sp - 0.5).astype(int), 0)
    stop = np.minimum(np.ceil(hi_mm / sp + 0.5).astype(int) + 1, shape)
    if np.any(stop <= start):
        return None
    sub = _subsampling(spacing)
    axes = []
    for a in range(3):
        n = stop[a] - start[a]
        offsets = (np.arange(sub[a]) + 0.5) / sub[a] - 0.5
        c = ((np.arange(start[a], stop[a])[:, None] + offsets[None, :]) * sp[a]).ravel()
        view = [1, 1, 1]
        view[a] = n * sub[a]
        axes.append(c.astype(np.float32).reshape(view))
    mask = np.broadcast_to(inside(*axes), tuple(len(ax.ravel()) for ax in axes))
    n = stop - start
    frac = mask.reshape(n[0], sub[0], n[1], sub[1], n[2], sub[2]).mean(axis=(1, 3, 5))
    box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
    return box, frac.astype(np.float32)


def tube_inside(points: np.ndarray, radius: float):
    """Inside test for a polyline tube (a chain of capsules) of the given radius."""
    r2 = np.float32(radius * radius)
    pts = points.astype(np.float32)

    def inside(z, y, x):
        hit = None
        for a, b in itertools.pairwise(pts):
            u = b - a
            uu = float(u @ u) or 1e-12
            dz, dy, dx = z - a[0], y - a[1], x - a[2]
            t = np.clip((dz * u[0] + dy * u[1] + dx * u[2]) / np.float32(uu), 0, 1)
            d2 = (dz - t * u[0]) ** 2 + (dy - t * u[1]) ** 2 + (dx - t * u[2]) ** 2
            hit = d2 <= r2 if hit is None else hit | (d2 <= r2)
        return hit

    return inside


def spheres_inside(centres: np.ndarray, radii: np.ndarray):
    """Inside test for a union of spheres (centres in mm, radii in mm)."""

    def inside(z, y, x):
        hit = None
        for c, rad in zip(centres.astype(np.float32), radii, strict=True):
            h = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= np.float32(rad * rad)
            hit = h if hit is None else hit | h
        return hit

    return inside


def centreline_voxels(points: np.ndarray, spacing, shape) -> np.ndarray:
    """Indices (n, 3) of the voxels a polyline passes through, sampled finer than a voxel."""
    sp = np.asarray(spacing)
    step = 0.25 * float(sp.min())
    samples = []
    for a, b in itertools.pairwise(points):
        n = max(2, int(np.ceil(np.linalg.norm(b - a) / step)) + 1)
        samples.append(a[None, :] + np.linspace(0, 1, n)[:, None] * (b - a)[None, :])
    idx = np.rint(np.concatenate(samples) / sp).astype(int)
    idx = idx[np.all((idx >= 0) & (idx < np.asarray(shape)), axis=1)]
    return np.unique(idx, axis=0)


def polyline(centre: np.ndarray, direction: np.ndarray, length: float, bend: float, rng):
    """Three-point polyline of ``length`` through ``centre`` with a small sideways bend."""
    direction = direction / np.linalg.norm(direction)
    side = np.cross(direction, rng.normal(size=3))
    side /= np.linalg.norm(side) + 1e-12
    half = 0.5 * length * direction
    return np.stack([centre - half, centre + bend * length * side, centre + half])


def jitter(direction: np.ndarray, sd_degrees: float, rng) -> np.ndarray:
    """Rotate ``direction`` by a random small angle (about ``sd_degrees``)."""
    d = direction / np.linalg.norm(direction)
    perturbed = d + np.tan(np.radians(sd_degrees)) * rng.normal(size=3)
    return perturbed / np.linalg.norm(perturbed)

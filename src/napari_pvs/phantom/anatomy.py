"""The brain a phantom is drawn in: procedural (ellipsoid, folded cortex) or MNI152.

Both give a region map (:data:`~napari_pvs.phantom.maps.REGION_NAMES`) and the lateral
ventricles, in physical millimetres, for any shape and (anisotropic) spacing.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from napari_pvs.phantom.maps import BASAL_GANGLIA, CSF, GREY_MATTER, WHITE_MATTER

#: Reference brain parenchyma volume in mm^3 (about 1.2 litres) that the counts refer to.
REFERENCE_BRAIN_MM3 = 1.2e6


@dataclass
class Anatomy:
    """The brain a phantom is drawn in: region labels and the lateral ventricles."""

    regions: np.ndarray  # uint8 region labels
    ventricles: np.ndarray  # bool, lateral ventricles (part of the CSF region)


def axis_coords(shape, spacing) -> list[np.ndarray]:
    """Physical coordinates (mm) of voxel centres relative to the volume centre, broadcastable."""
    coords = []
    for axis, (n, sp) in enumerate(zip(shape, spacing, strict=True)):
        c = (np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * np.float32(sp)
        view = [1, 1, 1]
        view[axis] = n
        coords.append(c.reshape(view))
    return coords


def _ellipsoid(coords, centre, semi_axes) -> np.ndarray:
    z, y, x = coords
    return (
        ((z - centre[0]) / semi_axes[0]) ** 2
        + ((y - centre[1]) / semi_axes[1]) ** 2
        + ((x - centre[2]) / semi_axes[2]) ** 2
    ) <= 1.0


def procedural_anatomy(shape, spacing, rng: np.random.Generator) -> Anatomy:
    """Ellipsoidal brain: CSF shell, folded cortical ribbon with sulci, WM, ventricles, BG."""
    extent = np.array(shape) * np.array(spacing)
    semi = np.minimum(extent * np.array([0.42, 0.44, 0.42]), [62.0, 82.0, 68.0])
    semi *= rng.uniform(0.95, 1.05, 3)
    coords = axis_coords(shape, spacing)
    z, y, x = coords
    # Normalised ellipsoid radius and an approximate depth below its surface in mm.
    r2 = (z / semi[0]) ** 2 + (y / semi[1]) ** 2 + (x / semi[2]) ** 2
    r = np.sqrt(r2) + np.float32(1e-6)
    grad = np.sqrt(
        (z / semi[0] ** 2) ** 2 + (y / semi[1] ** 2) ** 2 + (x / semi[2] ** 2) ** 2
    ) / r + np.float32(1e-6)
    depth = (1.0 - r) / grad
    del r2, r, grad
    scale = float(np.mean(semi) / 70.0)  # anatomy size relative to an adult brain

    # Sulci: zero crossings of a sum of random plane waves, cut into the surface.
    wavelength = max(18.0 * scale, 6.0)
    n_waves = 8
    folding = np.zeros(shape, dtype=np.float32)
    for _ in range(n_waves):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        k = (2 * np.pi / wavelength) * direction.astype(np.float32)
        phase = np.float32(rng.uniform(0, 2 * np.pi))
        folding += np.cos(k[0] * z + k[1] * y + k[2] * x + phase)
    folding /= np.float32(math.sqrt(n_waves / 2.0))  # unit RMS
    # |folding| grows by about |k| per mm away from a zero crossing.
    dist_to_fold = np.abs(folding) * np.float32(wavelength / (2 * np.pi))
    del folding
    cortex_mm = 2.6
    sulcal_depth = max(14.0 * scale, 4.0)
    in_sulcal_band = depth < sulcal_depth

    regions = np.zeros(shape, dtype=np.uint8)
    regions[depth > -2.5] = CSF  # CSF shell around the brain
    parenchyma = depth >= 0
    regions[parenchyma] = WHITE_MATTER
    regions[
        parenchyma & ((depth < cortex_mm) | (in_sulcal_band & (dist_to_fold < cortex_mm + 0.6)))
    ] = GREY_MATTER
    regions[parenchyma & in_sulcal_band & (dist_to_fold < 0.6)] = CSF
    del depth, dist_to_fold, in_sulcal_band, parenchyma

    # Deep structures, placed relative to the brain's semi-axes.
    basal = np.zeros(shape, dtype=bool)
    ventricles = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        basal |= _ellipsoid(
            coords,
            (-0.12 * semi[0], 0.06 * semi[1], side * 0.28 * semi[2]),
            (0.2 * semi[0], 0.22 * semi[1], 0.12 * semi[2]),
        )
        ventricles |= _ellipsoid(
            coords,
            (0.12 * semi[0], 0.0, side * 0.10 * semi[2]),
            (0.13 * semi[0], 0.36 * semi[1], 0.065 * semi[2]),
        )
    regions[basal & (regions == WHITE_MATTER)] = BASAL_GANGLIA
    regions[ventricles] = CSF
    return Anatomy(regions=regions, ventricles=ventricles)


@functools.lru_cache(maxsize=1)
def _load_mni(resolution: int) -> dict[str, np.ndarray]:
    """MNI152 templates from nilearn's package data, as (z, y, x) arrays plus the index origin."""
    try:
        from nilearn import datasets
    except ImportError as exc:
        raise ImportError(
            "anatomy='mni' needs nilearn, which ships the MNI152 template: "
            "pip install 'napari-pvs[mni]' (or use anatomy='procedural')"
        ) from exc
    images = {
        "t1": datasets.load_mni152_template(resolution=resolution),
        "gm": datasets.load_mni152_gm_template(resolution=resolution),
        "wm": datasets.load_mni152_wm_template(resolution=resolution),
        "mask": datasets.load_mni152_brain_mask(resolution=resolution),
    }
    affine = images["t1"].affine
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))):
        raise ValueError("unexpected oblique MNI152 template affine in this nilearn version")
    out = {
        k: np.asarray(v.get_fdata(), dtype=np.float32).transpose(2, 1, 0) for k, v in images.items()
    }
    out["origin_zyx"] = affine[[2, 1, 0], 3].astype(np.float64)
    out["step_zyx"] = np.diag(affine)[[2, 1, 0]].astype(np.float64)
    return out


def mni_anatomy(shape, spacing) -> Anatomy:
    """MNI152 anatomy resampled to ``shape``/``spacing`` (shrunk isotropically to fit the FOV)."""
    resolution = 1 if min(spacing) < 1.5 else 2
    mni = _load_mni(resolution)
    mask = mni["mask"] > 0.5
    step, origin = mni["step_zyx"], mni["origin_zyx"]
    nz = np.nonzero(mask)
    lo = np.array([i.min() for i in nz]) * step + origin
    hi = np.array([i.max() for i in nz]) * step + origin
    extent = np.array(shape) * np.array(spacing)
    shrink = min(1.0, float(np.min(0.94 * extent / (hi - lo + step))))
    centre_mni = (lo + hi) / 2
    # output voxel i -> mni mm: centre + ((i - (n-1)/2) * spacing) / shrink -> template index.
    matrix = np.array(spacing) / shrink / step
    offset = (centre_mni - (np.array(shape) - 1) / 2 * np.array(spacing) / shrink - origin) / step

    def resample(name: str) -> np.ndarray:
        return ndimage.affine_transform(
            mni[name], matrix, offset=offset, output_shape=tuple(shape), order=1, cval=0.0
        )

    brain = resample("mask") > 0.5
    gm, wm, t1 = resample("gm"), resample("wm"), resample("t1")
    # MNI mm coordinates of every voxel (broadcastable), to find the deep structures.
    mz, my, mx = (
        (centre_mni[a] + (np.arange(n) - (n - 1) / 2) * spacing[a] / shrink).reshape(
            [n if b == a else 1 for b in range(3)]
        )
        for a, n in enumerate(shape)
    )
    csf = brain & (t1 < 0.45) & (wm < 0.5)
    regions = np.zeros(shape, dtype=np.uint8)
    regions[brain] = CSF
    regions[brain & ~csf & (gm >= wm)] = GREY_MATTER
    regions[brain & ~csf & (wm > gm)] = WHITE_MATTER
    # Basal ganglia: grey matter inside ellipsoids around the lentiform nucleus and the caudate
    # head (MNI mm, per hemisphere), so the thalamus and cortex stay out.
    ax = np.abs(mx)
    lentiform = ((ax - 23) / 9) ** 2 + ((my - 2) / 15) ** 2 + ((mz - 1) / 11) ** 2 <= 1
    caudate = ((ax - 13) / 6) ** 2 + ((my - 12) / 10) ** 2 + ((mz - 10) / 9) ** 2 <= 1
    basal = (lentiform | caudate) & (regions == GREY_MATTER)
    regions[basal] = BASAL_GANGLIA
    ventricles = csf & (np.abs(mx) < 28) & (my > -45) & (my < 32) & (mz > -6) & (mz < 34)
    return Anatomy(regions=regions, ventricles=ventricles)

"""Synthetic perivascular-space (PVS) volumes with exact ground truth.

No PVS data set can be downloaded here, so phantoms carry the tests, the benchmarks and the
default model's training data. :func:`make_phantom` draws a brain (procedural, or the MNI152
anatomy that nilearn ships), places PVS as thin tubes with the sizes, orientations and contrast
reported in the PVS simulation literature, adds confounders that must *not* be labelled PVS
(lacunes, white-matter hyperintensities, vessels; the ventricles and sulci are CSF), and applies
partial volume, a smooth bias field and Rician noise. Everything is placed in physical
millimetres, so any shape and (anisotropic) spacing works, and a seed makes it reproducible.

Arrays are ``(z, y, x)`` with ``z`` pointing superior; voxel ``i`` along an axis has its centre at
``i * spacing`` mm.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from napari_pvs.io import check_spacing, normalize_modality

#: Region map labels (see docs/architecture.md).
REGION_NAMES: dict[int, str] = {1: "white_matter", 2: "basal_ganglia", 3: "grey_matter", 4: "csf"}
#: Confounder map labels: structures that look like PVS but must not be labelled as PVS.
CONFOUNDER_NAMES: dict[int, str] = {1: "lacune", 2: "wmh", 3: "vessel"}

WHITE_MATTER, BASAL_GANGLIA, GREY_MATTER, CSF = 1, 2, 3, 4
LACUNE, WMH, VESSEL = 1, 2, 3

#: Tissue intensity relative to white matter, per modality (CSF range is drawn per phantom).
_TISSUE_CONTRAST = {
    "T2": {WHITE_MATTER: 1.0, BASAL_GANGLIA: 1.2, GREY_MATTER: 1.4},
    "T1": {WHITE_MATTER: 1.0, BASAL_GANGLIA: 0.82, GREY_MATTER: 0.68},
}
#: CSF-like (PVS, lacune, ventricle) contrast range relative to white matter.
_CSF_RATIO_RANGE = {"T2": (2.4, 3.6), "T1": (0.35, 0.5)}
#: White-matter hyperintensity and vessel (flow void) contrast relative to white matter.
_WMH_RATIO = {"T2": 1.9, "T1": 0.8}
_VESSEL_RATIO = {"T2": 0.25, "T1": 0.2}

#: PVS count per reference-size brain at severity 0 and 1 (interpolated linearly).
_PVS_COUNT_RANGE = (20, 300)
#: Reference brain parenchyma volume in mm^3 (about 1.2 litres) that the counts refer to.
_REFERENCE_BRAIN_MM3 = 1.2e6
#: Fraction of PVS placed in the basal ganglia (the rest go to the centrum semiovale).
_BASAL_GANGLIA_SHARE = 0.35
#: Tissue texture: correlation length (mm) and relative amplitude (standard deviation).
_TEXTURE_MM, _TEXTURE_AMPLITUDE = 1.5, 0.04
#: PVS diameters: log-normal around this median (mm), clipped to 0.6-4 mm at that median.
_PVS_DIAMETER_MEDIAN_MM, _PVS_DIAMETER_CLIP_MM = 1.4, (0.6, 4.0)
#: Finest sub-voxel sampling distance (mm) for partial-volume rendering.
_SUBSAMPLE_MM = 0.35


@dataclass
class Phantom:
    """A synthetic volume and its ground truth, all arrays ``(z, y, x)`` of the same shape."""

    image: np.ndarray  #: float32 MR-like intensities (white matter about 1 before bias/noise)
    pvs: np.ndarray  #: uint8 0/1 ground truth (PVS fraction >= 0.5 plus every centreline voxel)
    pvs_instances: np.ndarray  #: uint16, one label per PVS (0 = background)
    pvs_fraction: np.ndarray  #: float32 partial-volume fraction of PVS in each voxel
    regions: np.ndarray  #: uint8, see :data:`REGION_NAMES` (0 = outside the brain)
    confounders: np.ndarray  #: uint8, see :data:`CONFOUNDER_NAMES`
    spacing: tuple[float, float, float]  #: voxel size in mm, (z, y, x)
    modality: str  #: "T1" or "T2"
    meta: dict = field(
        default_factory=dict
    )  #: JSON-able: seed, severity, snr, counts, per-PVS table


# --------------------------------------------------------------------------------------------
# argument checking


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        dims = tuple(int(s) for s in shape)
    except TypeError as exc:
        raise ValueError(f"shape must be three integers (z, y, x), got {shape!r}") from exc
    if len(dims) != 3 or min(dims) < 8:
        raise ValueError(
            f"shape must be three integers (z, y, x), each at least 8, got {shape!r}; "
            "a phantom is a 3D volume, e.g. shape=(64, 80, 64)"
        )
    return dims  # type: ignore[return-value]


def _phantom_modality(modality: str) -> str:
    """``"T1"`` or ``"T2"`` (any spelling :func:`napari_pvs.io.normalize_modality` accepts)."""
    key = normalize_modality(modality)
    if key not in ("T1", "T2"):
        raise ValueError(f"a phantom needs modality 'T1' or 'T2', got {modality!r}")
    return key


# --------------------------------------------------------------------------------------------
# anatomy


@dataclass
class _Anatomy:
    regions: np.ndarray  # uint8 region labels
    ventricles: np.ndarray  # bool, lateral ventricles (part of the CSF region)


def _axis_coords(shape, spacing) -> list[np.ndarray]:
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


def _procedural_anatomy(shape, spacing, rng: np.random.Generator) -> _Anatomy:
    """Ellipsoidal brain: CSF shell, folded cortical ribbon with sulci, WM, ventricles, BG."""
    extent = np.array(shape) * np.array(spacing)
    semi = np.minimum(extent * np.array([0.42, 0.44, 0.42]), [62.0, 82.0, 68.0])
    semi *= rng.uniform(0.95, 1.05, 3)
    coords = _axis_coords(shape, spacing)
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
    return _Anatomy(regions=regions, ventricles=ventricles)


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


def _mni_anatomy(shape, spacing) -> _Anatomy:
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
    return _Anatomy(regions=regions, ventricles=ventricles)


# --------------------------------------------------------------------------------------------
# partial-volume rendering of small objects


def _subsampling(spacing) -> tuple[int, ...]:
    return tuple(int(min(5, max(2, math.ceil(sp / _SUBSAMPLE_MM)))) for sp in spacing)


def _render(
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


def _tube_inside(points: np.ndarray, radius: float):
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


def _spheres_inside(centres: np.ndarray, radii: np.ndarray):
    def inside(z, y, x):
        hit = None
        for c, rad in zip(centres.astype(np.float32), radii, strict=True):
            h = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= np.float32(rad * rad)
            hit = h if hit is None else hit | h
        return hit

    return inside


def _centreline_voxels(points: np.ndarray, spacing, shape) -> np.ndarray:
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


def _polyline(centre: np.ndarray, direction: np.ndarray, length: float, bend: float, rng):
    """Three-point polyline of ``length`` through ``centre`` with a small sideways bend."""
    direction = direction / np.linalg.norm(direction)
    side = np.cross(direction, rng.normal(size=3))
    side /= np.linalg.norm(side) + 1e-12
    half = 0.5 * length * direction
    return np.stack([centre - half, centre + bend * length * side, centre + half])


def _jitter(direction: np.ndarray, sd_degrees: float, rng) -> np.ndarray:
    """Rotate ``direction`` by a random small angle (about ``sd_degrees``)."""
    d = direction / np.linalg.norm(direction)
    perturbed = d + np.tan(np.radians(sd_degrees)) * rng.normal(size=3)
    return perturbed / np.linalg.norm(perturbed)


# --------------------------------------------------------------------------------------------
# the generator


class _Placer:
    """Draws objects, renders them, and keeps them apart (one voxel gap) from earlier ones."""

    def __init__(self, shape, spacing) -> None:
        self.shape = tuple(shape)
        self.spacing = spacing
        self.occupied = np.zeros(shape, dtype=bool)

    def render_tube(self, points: np.ndarray, radius: float):
        pad = radius + 1e-3
        return _render(
            points.min(axis=0) - pad,
            points.max(axis=0) + pad,
            self.spacing,
            self.shape,
            _tube_inside(points, radius),
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


def _random_voxel_mm(candidates: np.ndarray, shape, spacing, rng) -> np.ndarray:
    """A random point (mm) inside a random voxel of ``candidates`` (flat indices)."""
    flat = candidates[rng.integers(len(candidates))]
    idx = np.array(np.unravel_index(flat, shape), dtype=float)
    return (idx + rng.uniform(-0.5, 0.5, 3)) * np.asarray(spacing)


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


def _pvs_count(severity: float, brain_mm3: float, per_brain: float | None = None) -> int:
    if per_brain is None:
        per_brain = _PVS_COUNT_RANGE[0] + severity * (_PVS_COUNT_RANGE[1] - _PVS_COUNT_RANGE[0])
    return max(1, round(per_brain * brain_mm3 / _REFERENCE_BRAIN_MM3))


@dataclass
class _Confounders:
    labels: np.ndarray  # uint8 CONFOUNDER_NAMES where solid
    owner: np.ndarray  # uint8 label of the confounder holding each partial-volume voxel
    fraction: np.ndarray  # float32 partial volume
    counts: dict[str, int]


def _place_confounders(
    placer: _Placer, anat: _Anatomy, severity: float, brain_scale: float, rng, enabled: bool
) -> _Confounders:
    """Lacunes, white-matter hyperintensities and vessels, each kept apart from the others."""
    shape, spacing, regions = placer.shape, placer.spacing, anat.regions
    out = _Confounders(
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
            c = _random_voxel_mm(deep_flat, shape, spacing, rng)
            rad = 0.5 * rng.uniform(3.0, 15.0) * size
            res = _render(c - rad, c + rad, spacing, shape, _spheres_inside(c[None], [rad]))
            if res and add(LACUNE, *res, no_line, deep_tissue):
                break
    # White-matter hyperintensities: irregular blobs hugging the ventricles.
    near_vent = ndimage.binary_dilation(anat.ventricles, iterations=max(1, int(4 / min(spacing))))
    wmh_flat = np.flatnonzero(near_vent & (regions == WHITE_MATTER))
    for _ in range(int(rng.poisson(1.0 + 4.0 * severity)) if len(wmh_flat) else 0):
        for _attempt in range(20):
            c = _random_voxel_mm(wmh_flat, shape, spacing, rng)
            k = int(rng.integers(2, 5))
            centres = c + rng.normal(scale=3.0 * size, size=(k, 3))
            radii = rng.uniform(2.0, 6.0, k) * size
            lo = (centres - radii[:, None]).min(axis=0)
            hi = (centres + radii[:, None]).max(axis=0)
            res = _render(lo, hi, spacing, shape, _spheres_inside(centres, radii))
            if res is None:
                continue
            box, frac = res
            frac = frac * (regions[box] == WHITE_MATTER)  # WMH live in white matter
            if frac.max() > 0 and add(WMH, box, frac, no_line, None):
                break
    # Vessels: long, thin-to-medium, dark flow voids crossing the deep brain in any direction.
    for _ in range(int(rng.integers(3, 8))):
        for _attempt in range(20):
            c = _random_voxel_mm(deep_flat, shape, spacing, rng)
            length = rng.uniform(20.0, 50.0) * size
            pts = _polyline(c, rng.normal(size=3), length, rng.uniform(0.0, 0.15), rng)
            rad = 0.5 * rng.uniform(0.8, 2.0)
            res = _render_tube_checked(placer, pts, rad, regions)
            if res is None:
                continue
            box, frac = res
            line = _centreline_voxels(pts, spacing, shape)
            line = line[regions[tuple(line.T)] > 0]
            if add(VESSEL, box, frac * (regions[box] > 0), line, None):
                break
    return out


@dataclass
class _PVS:
    mask: np.ndarray  # uint8 0/1 ground truth
    instances: np.ndarray  # uint16 labels
    fraction: np.ndarray  # float32 partial volume
    table: list[dict]


def _place_pvs(
    placer: _Placer, anat: _Anatomy, target: int, rng, diameter_mm: float | None = None
) -> _PVS:
    """Radial tubes in the centrum semiovale, near-vertical ones in the basal ganglia.

    Diameters are log-normal around ``diameter_mm`` (default 1.4 mm), clipped in proportion.
    """
    median = _PVS_DIAMETER_MEDIAN_MM if diameter_mm is None else float(diameter_mm)
    scale = median / _PVS_DIAMETER_MEDIAN_MM
    low, high = (_PVS_DIAMETER_CLIP_MM[0] * scale, _PVS_DIAMETER_CLIP_MM[1] * scale)
    shape, spacing, regions = placer.shape, placer.spacing, anat.regions
    out = _PVS(
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
        centre = _random_voxel_mm(pool, shape, spacing, rng)
        if in_bg:
            direction = _jitter(np.array([1.0, 0.0, 0.0]), 12.0, rng)
        else:
            direction = _jitter(_radial_direction(depth, centre, spacing), 8.0, rng)
        pts = _polyline(centre, direction, length, rng.uniform(0.0, 0.08), rng)
        res = placer.render_tube(pts, diameter / 2)
        if res is None:
            continue
        box, frac = res
        solid = placer.place(box, frac, _centreline_voxels(pts, spacing, shape), allowed)
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


def _compose_image(
    regions: np.ndarray,
    modality: str,
    conf: _Confounders,
    pvs_fraction: np.ndarray,
    spacing,
    rng,
    bias_field: bool,
    snr: float,
    csf_ratio: float | None = None,
) -> tuple[np.ndarray, float]:
    """MR-like intensities: tissue contrast with partial volume and texture, confounders and PVS
    mixed in by their partial volume, then bias field and Rician noise. Returns (image, CSF/WM).

    ``csf_ratio`` replaces the drawn CSF/PVS contrast (the draw is still made, so everything
    else about the phantom stays the same)."""
    shape = regions.shape
    drawn = float(rng.uniform(*_CSF_RATIO_RANGE[modality]))
    csf_ratio = drawn if csf_ratio is None else float(csf_ratio)
    lut = np.zeros(5, dtype=np.float32)
    for label, value in _TISSUE_CONTRAST[modality].items():
        lut[label] = value
    lut[CSF] = csf_ratio
    # Blurring the tissue map gives partial volume at tissue borders.
    image = ndimage.gaussian_filter(lut[regions], sigma=[0.5 / max(sp, 0.5) for sp in spacing])
    # Tissue texture: smooth +-few-percent fluctuations, so that tissue is not perfectly flat
    # and noise-sized specks compete with small PVS as in real scans.
    texture = ndimage.gaussian_filter(
        rng.standard_normal(shape, dtype=np.float32), sigma=[_TEXTURE_MM / sp for sp in spacing]
    )
    texture *= np.float32(_TEXTURE_AMPLITUDE / max(float(texture.std()), 1e-6))
    image *= 1.0 + texture * (regions != CSF)
    del texture
    conf_value = np.zeros(len(CONFOUNDER_NAMES) + 1, dtype=np.float32)
    conf_value[LACUNE] = csf_ratio
    conf_value[WMH] = _WMH_RATIO[modality]
    conf_value[VESSEL] = _VESSEL_RATIO[modality]
    image += conf.fraction * (conf_value[conf.owner] - image)
    image += pvs_fraction * (np.float32(csf_ratio) - image)
    image *= (regions > 0) | (image > 0.05)
    if bias_field:
        image *= _bias_field(shape, spacing, rng)
    if math.isfinite(snr):
        sigma = np.float32(1.0 / snr)
        noise_re = rng.standard_normal(shape, dtype=np.float32) * sigma
        noise_im = rng.standard_normal(shape, dtype=np.float32) * sigma
        image = np.sqrt((image + noise_re) ** 2 + noise_im**2)
    return image.astype(np.float32, copy=False), csf_ratio


def make_phantom(
    shape: tuple[int, int, int] = (64, 80, 64),
    spacing: float | tuple[float, float, float] = 2.0,
    modality: str = "T2",
    seed: int = 0,
    severity: float = 0.5,
    anatomy: str = "procedural",
    snr: float | None = None,
    bias_field: bool = True,
    n_pvs: int | None = None,
    confounders: bool = True,
    csf_ratio: float | None = None,
    pvs_diameter_mm: float | None = None,
    pvs_per_brain: float | None = None,
) -> Phantom:
    """Make a synthetic brain volume with PVS and their exact ground truth.

    ``severity`` (0..1) sets the PVS burden: 20 to 300 PVS per adult-size brain, scaled by the
    brain volume in the field of view (``n_pvs`` overrides it). ``snr`` is the white-matter
    signal over the Rician noise sigma (default drawn from 15..60; ``math.inf`` disables noise).
    ``csf_ratio`` fixes the CSF-like (PVS, lacune, ventricle) intensity relative to white matter
    (default drawn from 2.4..3.6 on T2w, 0.35..0.5 on T1w); ``pvs_diameter_mm`` moves the median
    PVS diameter (default 1.4 mm); ``pvs_per_brain`` replaces severity's 20..300 PVS per
    adult-size brain (still scaled by the brain volume; ``n_pvs`` overrides it), so PVS can be
    denser than any severity gives. These exist to make data unlike the default model's
    training data. The same arguments and ``seed`` always give the same phantom.
    """
    shape = _check_shape(shape)
    spacing = check_spacing(spacing)
    modality = _phantom_modality(modality)
    if not 0.0 <= float(severity) <= 1.0:
        raise ValueError(f"severity must be between 0 and 1, got {severity!r}")
    if anatomy not in ("procedural", "mni"):
        raise ValueError(f"anatomy must be 'procedural' or 'mni', got {anatomy!r}")
    if snr is not None and not float(snr) > 0:
        raise ValueError(f"snr must be positive (or None for a random 15..60), got {snr!r}")
    if n_pvs is not None and int(n_pvs) < 0:
        raise ValueError(f"n_pvs must be >= 0, got {n_pvs!r}")
    if pvs_per_brain is not None and not float(pvs_per_brain) >= 0:
        raise ValueError(f"pvs_per_brain must be >= 0 (or None), got {pvs_per_brain!r}")
    if csf_ratio is not None and not float(csf_ratio) > 0:
        raise ValueError(f"csf_ratio must be positive (or None to draw it), got {csf_ratio!r}")
    if pvs_diameter_mm is not None and not float(pvs_diameter_mm) > 0:
        raise ValueError(
            f"pvs_diameter_mm must be positive (or None for 1.4 mm), got {pvs_diameter_mm!r}"
        )

    rng = np.random.default_rng(seed)
    snr_value = float(rng.uniform(15, 60)) if snr is None else float(snr)
    anat = (
        _procedural_anatomy(shape, spacing, rng)
        if anatomy == "procedural"
        else _mni_anatomy(shape, spacing)
    )
    regions = anat.regions
    parenchyma = np.isin(regions, (WHITE_MATTER, BASAL_GANGLIA, GREY_MATTER))
    brain_mm3 = float(parenchyma.sum()) * float(np.prod(spacing))
    del parenchyma
    brain_scale = (brain_mm3 / _REFERENCE_BRAIN_MM3) ** (1 / 3)

    placer = _Placer(shape, spacing)
    conf = _place_confounders(placer, anat, float(severity), brain_scale, rng, confounders)
    target = (
        _pvs_count(float(severity), brain_mm3, pvs_per_brain) if n_pvs is None else int(n_pvs)
    )
    pvs = _place_pvs(placer, anat, target if brain_mm3 > 0 else 0, rng, pvs_diameter_mm)
    del placer
    image, csf_ratio = _compose_image(
        regions, modality, conf, pvs.fraction, spacing, rng, bias_field, snr_value, csf_ratio
    )

    n_bg = sum(1 for row in pvs.table if row["region"] == "basal_ganglia")
    meta = {
        "seed": int(seed),
        "severity": float(severity),
        "snr": snr_value,
        "anatomy": anatomy,
        "bias_field": bool(bias_field),
        "contrast": {
            "csf_pvs_over_wm": csf_ratio,
            **{REGION_NAMES[k]: v for k, v in _TISSUE_CONTRAST[modality].items()},
        },
        "counts": {
            "pvs": len(pvs.table),
            "pvs_requested": target,
            "pvs_white_matter": len(pvs.table) - n_bg,
            "pvs_basal_ganglia": n_bg,
            **conf.counts,
        },
        "brain_volume_mm3": brain_mm3,
        "pvs_table": pvs.table,
    }
    return Phantom(
        image=image,
        pvs=pvs.mask,
        pvs_instances=pvs.instances,
        pvs_fraction=pvs.fraction,
        regions=regions,
        confounders=conf.labels,
        spacing=spacing,
        modality=modality,
        meta=meta,
    )


def _render_tube_checked(placer: _Placer, pts: np.ndarray, radius: float, regions: np.ndarray):
    """Render a vessel tube only if its centre lies in the brain (cheap rejection first)."""
    mid = np.rint(pts[1] / np.asarray(placer.spacing)).astype(int)
    if np.any(mid < 0) or np.any(mid >= np.array(regions.shape)) or regions[tuple(mid)] == 0:
        return None
    return placer.render_tube(pts, radius)


def _bias_field(shape, spacing, rng) -> np.ndarray:
    """Smooth multiplicative field (about +-10-20%) from a few long-wavelength cosines."""
    z, y, x = _axis_coords(shape, spacing)
    extent = float(np.max(np.array(shape) * np.array(spacing)))
    log_field = np.zeros(shape, dtype=np.float32)
    amplitude = rng.uniform(0.08, 0.18)
    for _ in range(3):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        k = (2 * np.pi / (extent * rng.uniform(1.2, 2.5))) * d.astype(np.float32)
        log_field += np.float32(amplitude / 3 * 2) * np.cos(
            k[0] * z + k[1] * y + k[2] * x + np.float32(rng.uniform(0, 2 * np.pi))
        )
    return np.exp(log_field)

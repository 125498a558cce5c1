"""Frangi baseline: polarity, physical scales, chunked == in-memory, masking, tuning."""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import pytest

from napari_pvs.metrics import evaluate
from napari_pvs.models.frangi import (
    frangi_segment,
    frangi_vesselness,
    tune_threshold,
    white_matter_mask,
)
from napari_pvs.phantom import make_phantom


def _tube_volume(shape, spacing, radius_mm: float, value: float, background: float = 1.0):
    """A straight tube along y through the centre (analytic partial volume by supersampling)."""
    sub = 4
    axes = [
        ((np.arange(n * sub) + 0.5) / sub - 0.5) * sp - (n - 1) / 2 * sp
        for n, sp in zip(shape, spacing, strict=True)
    ]
    z, x = np.meshgrid(axes[0], axes[2], indexing="ij")
    inside = (z**2 + x**2 <= radius_mm**2).reshape(shape[0], sub, shape[2], sub).mean(axis=(1, 3))
    frac = np.broadcast_to(inside[:, None, :], shape)
    return (background + frac * (value - background)).astype(np.float32)


def test_bright_tube_on_t2_dark_tube_on_t1():
    shape, spacing = (25, 24, 25), (1.0, 1.0, 1.0)
    bright = _tube_volume(shape, spacing, 1.0, 3.0)
    dark = _tube_volume(shape, spacing, 1.0, 0.4)
    centre = (12, 12, 12)
    v_bright_t2 = frangi_vesselness(bright, spacing, "T2", intensity_range=(0.0, 3.0))
    v_bright_t1 = frangi_vesselness(bright, spacing, "T1", intensity_range=(0.0, 3.0))
    v_dark_t1 = frangi_vesselness(dark, spacing, "T1", intensity_range=(0.0, 1.0))
    assert v_bright_t2[centre] > 0.5
    assert v_dark_t1[centre] > 0.5
    assert v_bright_t1[centre] < 0.05 * v_bright_t2[centre]  # wrong polarity: (almost) none
    assert v_bright_t2[2, 12, 2] < 0.01  # far from the tube


def test_scales_are_millimetres_so_anisotropic_voxels_work():
    """A 1 mm-radius tube gives a similar centre response at 1 mm and at 1 x 0.5 x 0.5 mm voxels."""
    iso = frangi_vesselness(
        _tube_volume((25, 24, 25), (1.0, 1.0, 1.0), 1.0, 3.0),
        (1, 1, 1),
        "T2",
        intensity_range=(0, 3),
    )
    aniso_spacing = (1.0, 0.5, 0.5)
    aniso = frangi_vesselness(
        _tube_volume((25, 24, 49), aniso_spacing, 1.0, 3.0),
        aniso_spacing,
        "T2",
        intensity_range=(0, 3),
    )
    centre_iso = iso[12, 12, 12]
    centre_aniso = aniso[12, 12, 24]
    assert centre_aniso == pytest.approx(centre_iso, rel=0.35)
    # treating the anisotropic grid as isotropic (ignoring spacing) distorts the tube
    wrong = frangi_vesselness(
        _tube_volume((25, 24, 49), aniso_spacing, 1.0, 3.0), (1, 1, 1), "T2", intensity_range=(0, 3)
    )
    assert wrong[12, 12, 24] < 0.8 * centre_aniso


@pytest.fixture(scope="module")
def small_t2():
    return make_phantom((40, 56, 48), 2.0, "T2", seed=21, severity=1.0)


def test_chunked_dask_equals_in_memory_and_mask_applies(small_t2):
    p = small_t2
    mask = white_matter_mask(p.regions)
    whole = frangi_segment(p.image, p.spacing, "T2", threshold=0.05, mask=mask)
    lazy = frangi_segment(
        da.from_array(p.image, chunks=(16, 20, 24)),
        p.spacing,
        "T2",
        threshold=0.05,
        mask=da.from_array(mask, chunks=(16, 20, 24)),
    )
    assert isinstance(lazy, da.Array)
    chunked = lazy.compute()
    assert chunked.dtype == np.uint8 and whole.dtype == np.uint8
    assert whole.sum() > 0
    assert np.array_equal(chunked, whole)
    assert not np.any(whole[~mask])


def test_tuned_threshold_transfers_to_a_fresh_phantom(small_t2):
    best, rows = tune_threshold(
        small_t2.image,
        small_t2.pvs,
        small_t2.spacing,
        "T2",
        mask=white_matter_mask(small_t2.regions),
    )
    assert rows[0]["threshold"] == best
    assert rows[0]["dice"] == max(r["dice"] for r in rows)
    fresh = make_phantom((40, 56, 48), 2.0, "T2", seed=22, severity=1.0)
    seg = frangi_segment(
        fresh.image, fresh.spacing, "T2", threshold=best, mask=white_matter_mask(fresh.regions)
    )
    result = evaluate(seg, fresh.pvs, spacing=fresh.spacing)
    assert result["dice"] > 0.4
    assert result["cluster"]["f1"] > 0.6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image": np.zeros((8, 8))}, "3D"),
        ({"modality": "unknown"}, "polarity"),
        ({"threshold": 0.0}, "threshold"),
        ({"sigmas": (-1.0,)}, "sigmas"),
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
        ({"mask": np.ones((4, 4, 4), bool)}, "mask shape"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, message):
    args = {"image": np.random.default_rng(0).random((8, 8, 8), dtype=np.float32), **kwargs}
    with pytest.raises(ValueError, match=message):
        frangi_segment(**args)


def test_nan_voxels_are_rejected():
    image = np.ones((8, 8, 8), np.float32)
    image[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        frangi_segment(image)


def _tube_phantom(value: float, n: int = 48, seed: int = 0):
    """Four straight tubes (radii 0.8-1.8 mm; axial, diagonal, oblique) in noise, 1 mm voxels.

    Returns the image (background 1, tubes ``value``, Gaussian noise sd 0.08) and the ground
    truth (tube covers at least half of the voxel, from 2x supersampling).
    """
    sub = 2
    grid = (np.arange(n * sub) + 0.5) / sub - 0.5
    zz, yy, xx = np.meshgrid(grid, grid, grid, indexing="ij", sparse=True)
    tubes = [
        ((24, 24, 24), (0, 1, 0), 0.8),
        ((14, 24, 34), (1, 0, 1), 1.2),
        ((34, 10, 14), (0, 1, 1), 1.8),
        ((24, 36, 12), (1, 1, 1), 1.0),
    ]
    cover = np.zeros((n, n, n), np.float32)
    for point, direction, radius in tubes:
        unit = np.asarray(direction, float) / np.linalg.norm(direction)
        offset = (zz - point[0], yy - point[1], xx - point[2])
        along = sum(o * u for o, u in zip(offset, unit, strict=True))
        dist2 = sum(o**2 for o in offset) - along**2
        inside = (dist2 <= radius**2) & (np.abs(along) <= 18)
        cover = np.maximum(cover, inside.reshape(n, sub, n, sub, n, sub).mean(axis=(1, 3, 5)))
    noise = np.random.default_rng(seed).normal(0.0, 0.08, cover.shape)
    image = (1.0 + cover * (value - 1.0) + noise).astype(np.float32)
    return image, cover >= 0.5


def _best_dice(response: np.ndarray, truth: np.ndarray) -> float:
    """Dice at the best of 80 thresholds (quantiles of the response, so any scale works)."""
    best = 0.0
    for t in np.unique(np.quantile(response, np.linspace(0.9, 0.999, 80))):
        if t > 0:
            seg = response >= t
            best = max(best, 2 * (seg & truth).sum() / (seg.sum() + truth.sum()))
    return best


@pytest.mark.parametrize(
    ("modality", "tube_value", "black_ridges"), [("T2", 2.0, False), ("T1", 0.4, True)]
)
def test_agrees_with_scikit_image_frangi_on_isotropic_tubes(modality, tube_value, black_ridges):
    """At 1 mm, sigmas in mm == sigmas in voxels: ours must track ``skimage.filters.frangi``.

    Same tubes and polarity, so the responses near the tubes must rank (Spearman) and scale
    (Pearson) alike, and ours must segment at least as well at each one's best threshold.
    """
    from scipy import ndimage, stats
    from skimage.filters import frangi

    from napari_pvs.models.frangi import DEFAULT_SIGMAS_MM

    image, truth = _tube_phantom(tube_value)
    ours = frangi_vesselness(image, (1.0, 1.0, 1.0), modality)
    reference = frangi(image, sigmas=DEFAULT_SIGMAS_MM, black_ridges=black_ridges)
    near = ndimage.binary_dilation(truth, iterations=2)
    assert stats.spearmanr(ours[near], reference[near]).statistic > 0.95
    assert stats.pearsonr(ours[near], reference[near]).statistic > 0.95
    dice_ours, dice_reference = _best_dice(ours, truth), _best_dice(reference, truth)
    assert dice_reference > 0.4  # the reference itself finds the tubes
    assert dice_ours >= dice_reference - 0.03

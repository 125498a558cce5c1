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

"""Phantom statistics: sizes, counts, contrast, confounders, orientation, determinism, spacing."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from scipy import ndimage

from napari_pvs.metrics import label_clusters
from napari_pvs.phantom import (
    BASAL_GANGLIA,
    CONFOUNDER_NAMES,
    REGION_NAMES,
    WHITE_MATTER,
    make_phantom,
)

SMALL = {"shape": (56, 72, 60), "spacing": 2.0}
#: noise-free, bias-free, 1 mm: for geometry and contrast measurements
FINE = {
    "shape": (72, 96, 80),
    "spacing": 1.0,
    "seed": 7,
    "severity": 1.0,
    "snr": math.inf,
    "bias_field": False,
}


@pytest.fixture(scope="module")
def t2_fine():
    """A noise-free, bias-free T2 phantom at 1 mm, for geometry and contrast measurements."""
    return make_phantom(
        (72, 96, 80), 1.0, "T2", seed=7, severity=1.0, snr=math.inf, bias_field=False
    )


def _capsule_mm3(row: dict) -> float:
    r = row["diameter_mm"] / 2
    return math.pi * r * r * row["length_mm"] + 4 / 3 * math.pi * r**3


def _axis(coords_mm: np.ndarray) -> np.ndarray:
    """Principal axis of a point cloud (unit vector)."""
    centred = coords_mm - coords_mm.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return vt[0]


def test_arrays_and_meta_are_consistent(t2_fine):
    p = t2_fine
    assert p.image.dtype == np.float32 and p.pvs.dtype == np.uint8
    assert p.image.shape == p.pvs.shape == p.regions.shape == p.confounders.shape
    assert set(np.unique(p.pvs)) <= {0, 1}
    assert set(np.unique(p.regions)) == {0, *REGION_NAMES}
    assert set(np.unique(p.confounders)) <= {0, *CONFOUNDER_NAMES}
    n = p.meta["counts"]["pvs"]
    assert n == len(p.meta["pvs_table"]) == p.pvs_instances.max()
    assert np.array_equal(p.pvs_instances > 0, p.pvs == 1)
    json.dumps(p.meta)  # JSON-able


def test_every_pvs_is_one_separate_cluster(t2_fine):
    """Ground truth holds each PVS as exactly one 26-connected cluster, so counts are exact."""
    p = t2_fine
    labels, n = label_clusters(p.pvs > 0)
    assert n == p.meta["counts"]["pvs"]
    # each cluster carries exactly one instance label
    pairs = np.unique(np.stack([labels[p.pvs > 0], p.pvs_instances[p.pvs > 0]]), axis=1)
    assert pairs.shape[1] == n


def test_pvs_only_in_white_matter_and_basal_ganglia(t2_fine):
    p = t2_fine
    tissue = p.regions[p.pvs > 0]
    assert np.all((tissue == WHITE_MATTER) | (tissue == BASAL_GANGLIA))
    counts = p.meta["counts"]
    assert counts["pvs_white_matter"] > 0 and counts["pvs_basal_ganglia"] > 0


def test_diameters_and_lengths_follow_literature(t2_fine):
    rows = t2_fine.meta["pvs_table"]
    d = np.array([r["diameter_mm"] for r in rows])
    length = np.array([r["length_mm"] for r in rows])
    assert 1.2 < np.median(d) < 1.6
    assert np.mean((d >= 0.7) & (d <= 3.0)) > 0.85
    assert length.min() >= 2.0 and length.max() <= 20.0


def test_partial_volume_matches_analytic_tube_volume(t2_fine):
    """Summed PVS fraction equals the drawn tubes' volume: diameters are rendered as drawn."""
    p = t2_fine
    rendered = float(p.pvs_fraction.sum()) * float(np.prod(p.spacing))
    analytic = sum(_capsule_mm3(r) for r in p.meta["pvs_table"])
    assert rendered == pytest.approx(analytic, rel=0.06)
    # thin PVS are faint: most centreline-only voxels hold less than half a voxel of PVS
    assert np.any((p.pvs == 1) & (p.pvs_fraction < 0.5))


def test_contrast_ratios_in_literature_range(t2_fine):
    for modality, (lo, hi) in (("T2", (2.0, 4.0)), ("T1", (0.3, 0.6))):
        p = t2_fine if modality == "T2" else make_phantom(**FINE, modality="T1")
        wm = (p.regions == WHITE_MATTER) & (p.pvs_fraction == 0) & (p.confounders == 0)
        wm = ndimage.binary_erosion(wm, iterations=2)
        core = p.pvs_fraction >= 0.99
        assert core.sum() > 5
        ratio = np.median(p.image[core]) / np.median(p.image[wm])
        assert lo <= ratio <= hi, (modality, ratio)


def test_contrast_and_diameter_knobs_change_only_what_they_name(t2_fine):
    """csf_ratio sets the measured PVS/WM contrast and leaves the anatomy and ground truth as
    they were; pvs_diameter_mm moves the diameter distribution (thinner PVS, fainter voxels)."""
    faint = make_phantom(
        (72, 96, 80), 1.0, "T2", seed=7, severity=1.0, snr=math.inf, bias_field=False,
        csf_ratio=1.6,
    )  # fmt: skip
    np.testing.assert_array_equal(faint.pvs, t2_fine.pvs)
    np.testing.assert_array_equal(faint.regions, t2_fine.regions)
    assert faint.meta["contrast"]["csf_pvs_over_wm"] == 1.6
    wm = (faint.regions == WHITE_MATTER) & (faint.pvs_fraction == 0) & (faint.confounders == 0)
    wm = ndimage.binary_erosion(wm, iterations=2)
    core = faint.pvs_fraction >= 0.99
    ratio = np.median(faint.image[core]) / np.median(faint.image[wm])
    assert ratio == pytest.approx(1.6, rel=0.05)

    thin = make_phantom(**FINE, pvs_diameter_mm=0.7)
    diameters = [row["diameter_mm"] for row in thin.meta["pvs_table"]]
    assert np.median(diameters) == pytest.approx(0.7, rel=0.15)
    assert min(diameters) >= 0.3 - 1e-9 and max(diameters) <= 2.0 + 1e-9  # clipped in proportion
    default = [row["diameter_mm"] for row in t2_fine.meta["pvs_table"]]
    assert np.median(default) > 1.2


def test_counts_grow_with_severity():
    counts = [
        make_phantom(**SMALL, seed=1, severity=s).meta["counts"]["pvs"] for s in (0.0, 0.5, 1.0)
    ]
    assert counts[0] < counts[1] < counts[2]
    assert counts[0] >= 1
    # pvs_per_brain: denser than severity 1 allows (300 per brain), scaled like it
    dense = make_phantom(**SMALL, seed=1, pvs_per_brain=600).meta["counts"]
    assert dense["pvs_requested"] == pytest.approx(2 * counts[2], abs=1)


def test_confounders_disjoint_from_pvs_and_present():
    p = make_phantom((80, 96, 80), 1.5, "T2", seed=5, severity=1.0)
    grown = ndimage.binary_dilation(p.pvs > 0, structure=np.ones((3, 3, 3), bool))
    assert not np.any(grown & (p.confounders > 0))
    c = p.meta["counts"]
    assert c["vessel"] >= 3 and c["wmh"] >= 1
    for label in (1, 2, 3):
        assert (p.confounders == label).sum() > 0 or c[CONFOUNDER_NAMES[label]] == 0
    # WMH are T2-bright, vessels dark
    wm = np.median(p.image[p.regions == WHITE_MATTER])
    assert np.median(p.image[p.confounders == 2]) > 1.3 * wm
    assert np.median(p.image[p.confounders == 3]) < 0.8 * wm


def test_orientation_radial_in_white_matter_vertical_in_basal_ganglia(t2_fine):
    p = t2_fine
    sp = np.array(p.spacing)
    depth = ndimage.distance_transform_edt(p.regions > 0, sampling=p.spacing)
    wm_cos, bg_cos = [], []
    for row in p.meta["pvs_table"]:
        if row["length_mm"] < 6:
            continue
        coords = np.argwhere(p.pvs_instances == row["label"]) * sp
        axis = _axis(coords)
        if row["region"] == "basal_ganglia":
            bg_cos.append(abs(axis[0]))
        else:  # radial: along the depth gradient (towards the nearest brain surface)
            c = np.rint(coords.mean(axis=0) / sp).astype(int)
            grad = np.array(
                [depth[tuple(c + 3 * e)] - depth[tuple(c - 3 * e)] for e in np.eye(3, dtype=int)]
            )
            wm_cos.append(abs(axis @ grad) / np.linalg.norm(grad))
    assert len(wm_cos) > 10 and len(bg_cos) > 3
    assert np.median(wm_cos) > math.cos(math.radians(25))
    assert np.median(bg_cos) > math.cos(math.radians(25))


def test_same_seed_same_phantom_other_seed_differs():
    a = make_phantom(**SMALL, seed=11)
    b = make_phantom(**SMALL, seed=11)
    c = make_phantom(**SMALL, seed=12)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.pvs, b.pvs)
    assert a.meta == b.meta
    assert not np.array_equal(a.pvs, c.pvs)


def test_anisotropic_spacing_keeps_physical_sizes():
    spacing = (3.0, 1.0, 1.0)
    p = make_phantom((32, 96, 80), spacing, "T2", seed=2, snr=math.inf, bias_field=False)
    assert p.spacing == spacing
    rendered = float(p.pvs_fraction.sum()) * 3.0
    analytic = sum(_capsule_mm3(r) for r in p.meta["pvs_table"])
    assert rendered == pytest.approx(analytic, rel=0.08)
    # basal ganglia PVS stay vertical in millimetres although z voxels are 3x longer
    cos = []
    for row in p.meta["pvs_table"]:
        if row["region"] == "basal_ganglia" and row["length_mm"] >= 6:
            axis = _axis(np.argwhere(p.pvs_instances == row["label"]) * np.array(spacing))
            cos.append(abs(axis[0]))
    assert cos and np.median(cos) > math.cos(math.radians(30))


def test_rician_noise_floor_matches_snr():
    p = make_phantom(**SMALL, seed=4, snr=20.0, bias_field=False)
    background = p.image[p.regions == 0]
    # Rayleigh mean of pure-noise magnitude: sigma * sqrt(pi / 2), sigma = WM / snr = 1 / 20
    assert background.mean() == pytest.approx(math.sqrt(math.pi / 2) / 20, rel=0.05)


def test_mni_anatomy():
    pytest.importorskip("nilearn")
    p = make_phantom((64, 80, 64), 2.0, "T1", seed=0, anatomy="mni")
    assert set(np.unique(p.regions)) == {0, *REGION_NAMES}
    assert p.meta["counts"]["pvs_basal_ganglia"] > 0 and p.meta["counts"]["pvs_white_matter"] > 0
    wm = np.median(p.image[p.regions == WHITE_MATTER])
    gm = np.median(p.image[p.regions == 3])
    assert gm < wm  # T1: grey matter darker than white matter


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shape": (64, 64)}, "three integers"),
        ({"shape": (64, 64, 4)}, "at least 8"),
        ({"spacing": -1.0}, "positive"),
        ({"modality": "PD"}, "modality"),
        ({"modality": "unknown"}, "'T1' or 'T2'"),
        ({"severity": 1.5}, "between 0 and 1"),
        ({"anatomy": "atlas"}, "procedural"),
        ({"snr": 0}, "snr"),
        ({"csf_ratio": 0}, "csf_ratio"),
        ({"pvs_diameter_mm": -1}, "pvs_diameter_mm"),
        ({"pvs_per_brain": -5}, "pvs_per_brain"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_phantom(**{"shape": (32, 32, 32), **kwargs})


def test_mni_without_nilearn_names_the_extra(monkeypatch):
    from napari_pvs.phantom import anatomy

    anatomy._load_mni.cache_clear()
    monkeypatch.setitem(sys.modules, "nilearn", None)  # import nilearn now fails
    with pytest.raises(ImportError, match=r"pip install 'napari-pvs\[mni\]'"):
        make_phantom((32, 32, 32), anatomy="mni")


def test_bias_strength_scales_the_bias_fields_log_amplitude():
    """Everything but the bias field is the same phantom; the field's log is scaled."""
    options = dict(shape=(32, 40, 36), spacing=2.0, seed=5, snr=math.inf)
    flat = make_phantom(**options, bias_field=False).image
    usual = make_phantom(**options).image
    strong = make_phantom(**options, bias_strength=2.5).image
    inside = flat > 0.05
    log_usual = np.log(usual[inside] / flat[inside])
    np.testing.assert_allclose(np.log(strong[inside] / flat[inside]), 2.5 * log_usual, atol=1e-4)
    assert 0.05 < np.abs(log_usual).max() < 0.5
    with pytest.raises(ValueError, match="bias_strength"):
        make_phantom(**options, bias_strength=-1)

"""Candidate extraction (napari_pvs.candidates) against a hand-made volume: clusters, sizes,
mm³ with anisotropic voxels, mean probability and entropy, exclusion and the orders."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from napari_pvs.candidates import ORDERS, cluster_mask, find_candidates
from napari_pvs.uncertainty import binary_entropy

SHAPE = (16, 20, 24)
SPACING = (0.5, 1.0, 2.0)  # 1 mm³ per voxel, but no axis is 1 mm


def hand_made():
    """Three clusters: A (7 voxels, one joined only by a corner: 26-connectivity), B (3), C (2)."""
    seg = np.zeros(SHAPE, np.uint8)
    prob = np.full(SHAPE, 0.1, np.float32)
    a = [(2, 2, 2), (2, 2, 3), (2, 3, 2), (2, 3, 3), (3, 2, 2), (3, 3, 3), (4, 4, 4)]
    b = [(10, 10, 10), (11, 10, 10), (12, 10, 10)]
    c = [(8, 15, 20), (8, 15, 21)]
    for voxels, p in ((a, 0.9), (b, 0.6), (c, 0.55)):
        for index in voxels:
            seg[index] = 1
            prob[index] = p
    prob[2, 2, 2] = 0.7  # A's mean probability is not one value
    return seg, prob, {"A": a, "B": b, "C": c}


def by_seed(candidates):
    return {c.seed: c for c in candidates}


def test_clusters_sizes_probability_and_uncertainty():
    seg, prob, clusters = hand_made()
    found = find_candidates(seg, prob, volume_id=3, spacing=SPACING)
    assert len(found) == 3
    for name, voxels in clusters.items():
        candidate = by_seed(found)[min(voxels)]
        points = np.array(voxels)
        assert candidate.volume_id == 3
        assert candidate.voxels == len(voxels)
        assert candidate.volume_mm3 == pytest.approx(len(voxels) * 0.5 * 1.0 * 2.0), name
        assert candidate.bbox_start == tuple(points.min(axis=0))
        assert candidate.bbox_stop == tuple(points.max(axis=0) + 1)
        assert candidate.centre == pytest.approx(tuple(points.mean(axis=0)))
        values = np.array([prob[v] for v in voxels], np.float64)
        assert candidate.mean_probability == pytest.approx(values.mean())
        entropy = np.asarray(binary_entropy(values.astype(np.float32)), np.float64).mean()
        assert candidate.uncertainty == pytest.approx(entropy, rel=1e-5)
        assert candidate.score == candidate.uncertainty
    # Uncertain first: C (p 0.55) before B (0.6) before A (mostly 0.9).
    assert [c.voxels for c in found] == [2, 3, 7]


def test_given_entropy_is_averaged_over_the_cluster_only():
    seg, prob, _clusters = hand_made()
    entropy = np.zeros(SHAPE, np.float32)
    entropy[10:13, 10, 10] = [0.2, 0.4, 0.9]
    entropy[11, 11, 10] = 5.0  # next to B, not in it: must not count
    found = by_seed(find_candidates(seg, prob, entropy, volume_id=1, spacing=SPACING))
    assert found[(10, 10, 10)].uncertainty == pytest.approx(0.5)
    assert found[(2, 2, 2)].uncertainty == 0.0


def test_a_cluster_touching_a_labelled_voxel_is_no_candidate():
    seg, prob, _clusters = hand_made()
    labels = np.full(SHAPE, 255, np.uint8)
    labels[4:9, 12:16, 16:21] = 0  # a reviewed patch holding one voxel of C
    labels[4, 4, 4] = 255  # nothing changes for A
    found = find_candidates(seg, prob, volume_id=1, spacing=SPACING, exclude=labels)
    assert sorted(c.voxels for c in found) == [3, 7]
    labels[8, 15, 21] = 1  # now C's other voxel too; and A's corner voxel answered
    labels[4, 4, 4] = 0
    found = find_candidates(seg, prob, volume_id=1, spacing=SPACING, exclude=labels)
    assert [c.voxels for c in found] == [3]


def test_lazy_stores_give_the_same_candidates(tmp_path):
    seg, prob, _ = hand_made()
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="w")
    for name, data in (("segmentation", seg), ("probability", prob)):
        group.create_array(name, shape=SHAPE, chunks=(8, 8, 8), dtype=data.dtype)[:] = data
    assert find_candidates(
        group["segmentation"], group["probability"], volume_id=1, spacing=SPACING
    ) == find_candidates(seg, prob, volume_id=1, spacing=SPACING)


def size_volume():
    """Nine single-line clusters of sizes 1..9 along z, each with its own probability."""
    seg = np.zeros((12, 40, 4), np.uint8)
    prob = np.full(seg.shape, 0.05, np.float32)
    probabilities = [0.9, 0.6, 0.8, 0.55, 0.95, 0.7, 0.65, 0.85, 0.51]
    for size in range(1, 10):
        seg[0:size, 4 * size, 1] = 1
        prob[0:size, 4 * size, 1] = probabilities[size - 1]
    return seg, prob


def test_size_order_interleaves_terciles_each_by_uncertainty():
    seg, prob = size_volume()
    found = find_candidates(seg, prob, volume_id=1, spacing=(1, 1, 1), order="size")
    # terciles: sizes {1,2,3}, {4,5,6}, {7,8,9}; each most uncertain first (p closest to 0.5)
    assert [c.voxels for c in found] == [2, 4, 9, 3, 6, 7, 1, 5, 8]
    uncertain = find_candidates(seg, prob, volume_id=1, spacing=(1, 1, 1))
    assert [c.voxels for c in uncertain] == [9, 4, 2, 7, 6, 3, 8, 1, 5]
    assert find_candidates(seg, prob, volume_id=1, spacing=(1, 1, 1), min_voxels=8) == [
        c for c in uncertain if c.voxels >= 8
    ]


def test_region_order_needs_a_region_map_and_interleaves_regions():
    seg, prob = size_volume()
    with pytest.raises(ValueError, match="needs a region map"):
        find_candidates(seg, prob, volume_id=1, spacing=(1, 1, 1), order="region")
    regions = np.ones(seg.shape, np.uint8)
    regions[:, 20:, :] = 2  # sizes 5..9 lie in region 2
    regions[0:2, 24, :] = 1  # size 6: two of six voxels in region 1, still region 2's
    found = find_candidates(
        seg, prob, volume_id=1, spacing=(1, 1, 1), order="region", regions=regions
    )
    # region 1 by uncertainty: 4, 2, 3, 1; region 2: 9, 7, 6, 8, 5
    assert [c.voxels for c in found] == [4, 9, 2, 7, 3, 6, 1, 8, 5]
    with pytest.raises(ValueError, match="unknown candidate order 'biggest'"):
        find_candidates(seg, prob, volume_id=1, spacing=(1, 1, 1), order="biggest")


def test_cluster_mask_recovers_exactly_the_cluster_in_its_box():
    seg, prob, _clusters = hand_made()
    for candidate in find_candidates(seg, prob, volume_id=1, spacing=SPACING):
        box = tuple(slice(a, b) for a, b in zip(candidate.bbox_start, candidate.bbox_stop,
                                                strict=True))  # fmt: skip
        seed = [s - a for s, a in zip(candidate.seed, candidate.bbox_start, strict=True)]
        mask = cluster_mask(seg[box], seed)
        assert mask.sum() == candidate.voxels
        assert seg[box][mask].all()
    box = np.zeros((5, 5, 5), np.uint8)
    box[0, 0, 0:3] = 1
    box[1, 1, 3] = 1  # joined by an edge-diagonal only (26-connectivity)
    box[4, 4, 4] = 1  # another cluster in the same box
    mask = cluster_mask(box, (0, 0, 1))
    assert mask.sum() == 4 and mask[1, 1, 3] and not mask[4, 4, 4]
    assert cluster_mask(box, (4, 4, 4)).sum() == 1
    with pytest.raises(ValueError, match="not a segmented voxel"):
        cluster_mask(box, (2, 2, 2))
    with pytest.raises(ValueError, match="outside the box"):
        cluster_mask(box, (5, 0, 0))


def test_cli_lists_mirror_the_core():
    from napari_pvs.cli import candidates as cli
    from napari_pvs.project.answers import ANSWERS

    assert cli.ORDERS == ORDERS
    assert cli.ANSWERS == ANSWERS

"""Error yield: wrong voxels and clusters inside queued boxes against random patches."""

from __future__ import annotations

import numpy as np
import pytest

from napari_pvs.error_yield import error_yield, format_error_yield, pooled_error_yield


def line_case():
    """A 1 x 1 x 10 volume worked by hand (see the test's comments)."""
    #        index: 0  1  2  3  4  5  6  7  8  9
    gt = np.array([1, 1, 0, 0, 0, 1, 0, 0, 0, 255], np.uint8).reshape(1, 1, 10)
    pred = np.array([1, 0, 0, 0, 0, 0, 0, 1, 0, 1], np.uint8).reshape(1, 1, 10)
    # wrong voxels: 1 (missed), 5 (missed), 7 (false); 9 is unlabelled and not scored.
    # wrong clusters: predicted {7} (false) and true {5} (missed); {0} matches {0, 1}.
    return pred, gt


def test_hand_made_case_one_box():
    pred, gt = line_case()
    result = error_yield(pred, gt, [((0, 0, 5), (1, 1, 8))])  # voxels 5, 6, 7
    assert (result.wrong_voxels, result.wrong_voxels_inside) == (3, 2)
    assert result.voxel_share == pytest.approx(2 / 3)
    # a random 3-voxel window has 8 starts; it covers voxel 1 from 2, voxels 5 and 7 from 3
    assert result.voxel_random_share == pytest.approx((2 + 3 + 3) / 8 / 3)
    assert result.voxel_yield == pytest.approx(2.0)
    assert (result.wrong_clusters, result.wrong_clusters_inside) == (2, 2)
    assert result.cluster_random_share == pytest.approx((3 / 8 + 3 / 8) / 2)
    assert result.cluster_yield == pytest.approx(8 / 3)
    assert format_error_yield("clasp", result) == "clasp: error yield 2.00 (clusters 2.67)"


def test_hand_made_case_two_boxes_of_different_sizes():
    pred, gt = line_case()
    boxes = [((0, 0, 5), (1, 1, 8)), ((0, 0, 0), (1, 1, 2))]  # voxels 5-7 and 0-1
    result = error_yield(pred, gt, boxes)
    assert result.voxel_share == pytest.approx(1.0)
    # the 2-voxel window has 9 starts and covers each wrong voxel from 2 of them
    assert result.voxel_random_share == pytest.approx(1 / 3 + 6 / 9 / 3)
    assert result.voxel_yield == pytest.approx(9 / 5)
    assert result.cluster_share == pytest.approx(1.0)  # box 0-1 holds no wrong cluster
    assert result.cluster_random_share == pytest.approx(3 / 8 + 2 / 9)
    assert result.cluster_yield == pytest.approx(72 / 43)


def test_pooled_over_two_volumes_places_random_patches_in_either():
    pred, gt = line_case()
    clean = np.zeros((1, 1, 5), np.uint8)  # no error; a 3-voxel window has 3 starts here
    box = ((0, 0, 5), (1, 1, 8))
    result = pooled_error_yield([(pred, gt, [box]), (clean, clean, [])])
    assert result.voxel_share == pytest.approx(2 / 3)
    # a random window lands in the first volume with probability 8 / (8 + 3)
    assert result.voxel_random_share == pytest.approx(8 / 11 * (8 / 8 / 3))
    assert result.voxel_yield == pytest.approx(2 / 3 / (8 / 11 / 3))
    assert result.cluster_random_share == pytest.approx(8 / 11 * 3 / 8)
    assert error_yield(pred, gt, [box]) == pooled_error_yield([(pred, gt, [box])])


def test_analytic_reference_is_the_mean_over_every_placement():
    rng = np.random.default_rng(3)
    gt = (rng.random((6, 7, 6)) > 0.9).astype(np.uint8)
    pred = (rng.random((6, 7, 6)) > 0.9).astype(np.uint8)
    size = np.array([3, 4, 2])
    result = error_yield(pred, gt, [((0, 0, 0), tuple(size))])
    voxel, cluster = [], []
    for start in np.ndindex(*(np.array(gt.shape) - size + 1)):
        sample = error_yield(pred, gt, [(start, tuple(np.array(start) + size))])
        voxel.append(sample.voxel_share)
        cluster.append(sample.cluster_share)
    assert result.wrong_clusters > 1
    assert result.voxel_random_share == pytest.approx(np.mean(voxel), abs=1e-12)
    assert result.cluster_random_share == pytest.approx(np.mean(cluster), abs=1e-12)


def test_no_error_and_bad_boxes():
    gt = np.zeros((4, 4, 4), np.uint8)
    result = error_yield(gt, gt, [((0, 0, 0), (2, 2, 2))])
    assert result.voxel_yield is None and result.cluster_yield is None
    assert "n/a" in format_error_yield("random", result)
    with pytest.raises(ValueError, match="outside the volume"):
        error_yield(gt, gt, [((0, 0, 0), (5, 2, 2))])
    with pytest.raises(ValueError, match="empty queue"):
        error_yield(gt, gt, [])

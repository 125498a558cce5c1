"""Metrics against hand-built cases whose answers are known by construction."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest

from napari_pvs.metrics import as_mask, evaluate, format_table, label_clusters, match_clusters


def _blank(shape=(20, 20, 20)) -> np.ndarray:
    return np.zeros(shape, dtype=np.uint8)


def test_voxel_dice_known_value():
    gt = _blank()
    pred = _blank()
    gt[2:6, 2:4, 2:4] = 1  # 16 voxels
    pred[4:8, 2:4, 2:4] = 1  # 16 voxels, 8 shared
    result = evaluate(pred, gt)
    assert result["dice"] == pytest.approx(2 * 8 / 32)


def test_probabilities_are_thresholded_at_half():
    gt = _blank()
    gt[5, 5, 5:9] = 1
    prob = np.zeros(gt.shape, dtype=np.float32)
    prob[5, 5, 5:9] = [0.9, 0.5, 0.49, 0.1]
    assert as_mask(prob).sum() == 2
    assert evaluate(prob, gt)["dice"] == pytest.approx(2 * 2 / 6)


def test_empty_prediction_and_empty_truth():
    assert evaluate(_blank(), _blank())["dice"] == 1.0
    gt = _blank()
    gt[1, 1, 1] = 1
    r = evaluate(_blank(), gt)
    assert r["dice"] == 0.0
    assert r["cluster"]["recall"] == 0.0
    assert r["cluster"]["false_negatives"] == 1


def test_26_connectivity_joins_diagonal_voxels():
    mask = _blank().astype(bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # corner neighbours: one cluster under 26-connectivity
    mask[10, 10, 10] = True
    _, n = label_clusters(mask)
    assert n == 2


def test_cluster_detection_counts_and_volumes():
    gt = _blank((30, 30, 30))
    pred = _blank((30, 30, 30))
    gt[2:4, 2:4, 2:4] = 1  # A: found
    gt[10:12, 10:12, 10:12] = 1  # B: found by a one-voxel overlap
    gt[20:22, 20:22, 20:22] = 1  # C: missed
    pred[2:4, 2:4, 2:4] = 1
    pred[11:14, 11:14, 11:14] = 1
    pred[25, 2, 2] = 1  # false positive
    pred[2, 25, 2] = 1  # false positive
    r = evaluate(pred, gt, spacing=(0.5, 1.0, 2.0))
    c = r["cluster"]
    assert (c["true_positives"], c["false_positives"], c["false_negatives"]) == (2, 2, 1)
    assert c["precision"] == pytest.approx(2 / 4)
    assert c["recall"] == pytest.approx(2 / 3)
    assert c["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert r["count"] == {"pred": 4, "gt": 3, "abs_diff": 1}
    # volumes: voxel = 1 mm^3; gt 24 voxels, pred 8 + 27 + 2 = 37 voxels
    assert r["volume_mm3"]["gt"] == pytest.approx(24.0)
    assert r["volume_mm3"]["pred"] == pytest.approx(37.0)
    assert r["volume_mm3"]["abs_diff"] == pytest.approx(13.0)


def test_merged_prediction_matches_only_one_truth():
    gt = _blank()
    gt[5, 5, 2:5] = 1  # 3 voxels
    gt[5, 5, 7:12] = 1  # 5 voxels
    pred = _blank()
    pred[5, 5, 2:12] = 1  # one cluster bridging both
    r = evaluate(pred, gt)
    c = r["cluster"]
    assert (c["true_positives"], c["false_positives"], c["false_negatives"]) == (1, 0, 1)
    assert c["precision"] == 1.0 and c["recall"] == 0.5
    # the larger overlap wins the one-to-one match
    pl, np_ = label_clusters(pred.astype(bool))
    gl, ng = label_clusters(gt.astype(bool))
    ((_, g, overlap),) = match_clusters(pl, np_, gl, ng)
    assert overlap == 5 and gl[5, 5, 8] == g


def test_split_prediction_matches_one_and_adds_false_positive():
    gt = _blank()
    gt[5, 5, 2:12] = 1
    pred = _blank()
    pred[5, 5, 2:5] = 1
    pred[5, 5, 7:12] = 1
    c = evaluate(pred, gt)["cluster"]
    assert (c["true_positives"], c["false_positives"], c["false_negatives"]) == (1, 1, 0)


def test_greedy_matching_prefers_largest_overlap_first():
    # In the plane z=2: P1 covers G1 (4 voxels) and touches G2 with one voxel; P2 shares 2 with G2.
    gt = _blank()
    pred = _blank()
    gt[2, 2, 2:6] = 1  # G1
    gt[2, 6, 2:8] = 1  # G2
    pred[2, 2, 2:6] = 1  # P1 ...
    pred[2, 3:7, 2] = 1  # ... with an arm reaching G2 at (2, 6, 2)
    pred[2, 6, 5:7] = 1  # P2
    pl, n_pred = label_clusters(pred.astype(bool))
    gl, n_gt = label_clusters(gt.astype(bool))
    p1, p2 = pl[2, 2, 2], pl[2, 6, 5]
    g1, g2 = gl[2, 2, 2], gl[2, 6, 2]
    assert match_clusters(pl, n_pred, gl, n_gt) == [(p1, g1, 4), (p2, g2, 2)]
    assert evaluate(pred, gt)["cluster"]["true_positives"] == 2


def test_per_region_assignment_by_majority():
    gt = _blank((20, 20, 20))
    pred = _blank((20, 20, 20))
    regions = np.ones((20, 20, 20), dtype=np.uint8)  # white matter
    regions[:, :, 10:] = 2  # basal ganglia
    gt[5, 5, 8:13] = 1  # 2 voxels WM, 3 voxels BG -> basal ganglia
    gt[5, 15, 2:5] = 1  # white matter
    pred[5, 5, 8:13] = 1  # hits the BG one
    pred[15, 15, 15] = 1  # false positive in BG
    r = evaluate(pred, gt, regions=regions)
    wm, bg = r["regions"]["white_matter"], r["regions"]["basal_ganglia"]
    assert bg["count"] == {"pred": 2, "gt": 1, "abs_diff": 1}
    assert bg["cluster"]["recall"] == 1.0 and bg["cluster"]["precision"] == 0.5
    assert wm["count"] == {"pred": 0, "gt": 1, "abs_diff": 1}
    assert wm["cluster"]["recall"] == 0.0
    # voxel Dice per region uses only the voxels inside the region
    assert wm["dice"] == pytest.approx(2 * 2 / (2 + 5))
    assert bg["dice"] == pytest.approx(2 * 3 / (4 + 3))


def test_dask_inputs_and_json_roundtrip():
    gt = _blank()
    gt[3:6, 3:6, 3:6] = 1
    result = evaluate(da.from_array(gt, chunks=7), da.from_array(gt, chunks=5), regions=gt)
    assert result["dice"] == 1.0
    again = json.loads(json.dumps(result))
    assert again["cluster"]["f1"] == 1.0
    table = format_table(result)
    assert "overall" in table and "region_1" not in table and "white_matter" in table


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="does not match"):
        evaluate(_blank((10, 10, 10)), _blank((10, 10, 11)))
    with pytest.raises(ValueError, match="NaN"):
        evaluate(np.full((4, 4, 4), np.nan), _blank((4, 4, 4)))
    with pytest.raises(ValueError, match="numeric"):
        evaluate(np.full((4, 4, 4), "a"), _blank((4, 4, 4)))
    with pytest.raises(ValueError, match="region map shape"):
        evaluate(_blank(), _blank(), regions=_blank((3, 3, 3)))

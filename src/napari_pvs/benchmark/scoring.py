"""Test metrics of a model: the product's segmentation rule on every test case, averaged.

Beside the rule's own figures, each score sweeps the threshold (:data:`SWEEP_THRESHOLDS`, the
rule's smallest cluster kept) for the cluster precision and recall at each one: a model that
only moves along its precision-recall curve (more conservative after training on many "no"
answers, say) shows a higher precision at the rule and the same or a lower one at a matched
recall (:func:`precision_at_recall`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_pvs.benchmark.cases import Case

#: Thresholds of the precision-recall sweep on the test volumes.
SWEEP_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: A recall counts as matched when it is at most this far below the one it is matched to (the
#: yes/no issue's "recall within 0.02 of where it started").
RECALL_TOLERANCE = 0.02


def score(model, cases: Sequence[Case], tta: int = 1, device: str = "cpu") -> dict[str, Any]:
    """Segment every test case with the product's rule and average the metrics over cases;
    ``cluster_sweep``: per threshold, the case-mean cluster precision and recall."""
    import zarr

    from napari_pvs.inference import Predictor, min_cluster_voxels
    from napari_pvs.inference.segmentation import segmentation_rule
    from napari_pvs.io import Volume
    from napari_pvs.metrics import evaluate

    _, min_cluster_mm3, _ = segmentation_rule(model, None, None, None)
    per_case, sweeps = [], []
    with tempfile.TemporaryDirectory(prefix="napari-pvs-score-") as tmp:
        for index, case in enumerate(cases):
            out = Path(tmp) / f"{index}.zarr"
            volume = Volume(case.image, case.spacing, case.affine, modality=case.modality)
            Predictor(model, modality=case.modality, tta=tta, device=device).predict(volume, out)
            store = zarr.open_group(str(out), mode="r")
            segmentation = np.asarray(store["segmentation"][:])
            result = evaluate(segmentation, case.truth, case.regions, case.spacing)
            regions = result.get("regions", {})
            per_case.append(
                {
                    "dice": result["dice"],
                    "cluster_f1": result["cluster"]["f1"],
                    "cluster_precision": result["cluster"]["precision"],
                    "cluster_recall": result["cluster"]["recall"],
                    "dice_white_matter": regions.get("white_matter", {}).get("dice"),
                    "dice_basal_ganglia": regions.get("basal_ganglia", {}).get("dice"),
                    "predicted_pvs": result["count"]["pred"],
                    "true_pvs": result["count"]["gt"],
                }
            )
            min_voxels = min_cluster_voxels(min_cluster_mm3, case.spacing)
            sweeps.append(cluster_sweep(np.asarray(store["probability"][:]), case, min_voxels))
    merged: dict[str, Any] = {}
    for key in per_case[0]:
        values = [c[key] for c in per_case if c[key] is not None]
        if not values:
            merged[key] = None
        elif key in ("predicted_pvs", "true_pvs"):
            merged[key] = int(sum(values))
        else:
            merged[key] = float(np.mean(values))
    merged["cluster_sweep"] = [
        [threshold, float(np.mean([s[i][1] for s in sweeps])),
         float(np.mean([s[i][2] for s in sweeps]))]
        for i, threshold in enumerate(SWEEP_THRESHOLDS)
    ]  # fmt: skip
    return merged


def cluster_sweep(probability: np.ndarray, case: Case, min_voxels: int) -> list[list[float]]:
    """``[threshold, cluster precision, cluster recall]`` at each of :data:`SWEEP_THRESHOLDS`,
    clusters under ``min_voxels`` removed as the segmentation rule removes them."""
    from napari_pvs.inference import remove_small_clusters
    from napari_pvs.metrics import evaluate

    rows = []
    for threshold in SWEEP_THRESHOLDS:
        mask = (probability >= threshold).astype(np.uint8)
        if min_voxels > 1:
            remove_small_clusters(mask, min_voxels, mask.shape)
        result = evaluate(mask, case.truth, spacing=case.spacing)["cluster"]
        rows.append([threshold, float(result["precision"]), float(result["recall"])])
    return rows


def precision_at_recall(
    metrics: dict[str, Any], recall: float, tolerance: float = RECALL_TOLERANCE
) -> float | None:
    """The highest cluster precision of ``metrics`` (the rule's point and every point of its
    ``cluster_sweep``) whose recall is at least ``recall - tolerance``; None when none is."""
    points = [(metrics["cluster_precision"], metrics["cluster_recall"])]
    points += [(p, r) for _, p, r in metrics.get("cluster_sweep") or []]
    kept = [p for p, r in points if p is not None and r is not None and r >= recall - tolerance]
    return max(kept) if kept else None

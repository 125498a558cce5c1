"""Test metrics of a model: the product's segmentation rule on every test case, averaged."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_pvs.benchmark.cases import Case


def score(model, cases: Sequence[Case], tta: int = 1, device: str = "cpu") -> dict[str, Any]:
    """Segment every test case with the product's rule and average the metrics over cases."""
    import zarr

    from napari_pvs.inference import Predictor
    from napari_pvs.io import Volume
    from napari_pvs.metrics import evaluate

    per_case = []
    with tempfile.TemporaryDirectory(prefix="napari-pvs-score-") as tmp:
        for index, case in enumerate(cases):
            out = Path(tmp) / f"{index}.zarr"
            volume = Volume(case.image, case.spacing, case.affine, modality=case.modality)
            Predictor(model, modality=case.modality, tta=tta, device=device).predict(volume, out)
            segmentation = np.asarray(zarr.open_group(str(out), mode="r")["segmentation"][:])
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
    merged: dict[str, Any] = {}
    for key in per_case[0]:
        values = [c[key] for c in per_case if c[key] is not None]
        if not values:
            merged[key] = None
        elif key in ("predicted_pvs", "true_pvs"):
            merged[key] = int(sum(values))
        else:
            merged[key] = float(np.mean(values))
    return merged

"""Choosing test-time mirrorings and the smallest PVS cluster to keep, on held-out volumes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from napari_pvs.progress import ProgressCallback, no_progress
from napari_pvs.training.data import TrainingVolume


def calibrate_segmentation(
    model,
    volumes: Sequence[TrainingVolume],
    spacings: Sequence[Sequence[float]] | None = None,
    candidates_mm3: Sequence[float] = (0, 1, 2, 3, 4, 5, 6, 8),
    candidates_tta: Sequence[int] = (1, 4),
    min_tta_gain: float = 0.005,
    progress: ProgressCallback = no_progress,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Choose the test-time mirrorings and the smallest PVS cluster to keep, on fully labelled
    volumes the model has not seen.

    Isolated specks of one or two voxels are mostly noise, but real PVS can be that small, and
    averaging mirrored predictions sharpens thin structures but costs a network pass per mirror:
    both are trade-offs to measure, not to guess. Every (mirrorings, cut-off) pair is scored by
    the mean of voxel Dice and cluster F1 (threshold 0.5) over ``volumes``; more mirrorings are
    chosen only when they raise that score by at least ``min_tta_gain``. Returns the
    checkpoint's ``segmentation`` rule and one row per candidate pair. Use volumes held out
    from training and from any test set.
    """
    import tempfile

    import zarr

    from napari_pvs.inference import Predictor, min_cluster_voxels, remove_small_clusters
    from napari_pvs.metrics import evaluate

    spacings = spacings or [(1.0, 1.0, 1.0)] * len(volumes)
    pairs = [(int(t), float(c)) for t in candidates_tta for c in candidates_mm3]
    scores: dict[tuple[int, float], list[tuple[float, float]]] = {pair: [] for pair in pairs}
    steps, step = len(volumes) * len(candidates_tta), 0
    for index, (volume, spacing) in enumerate(zip(volumes, spacings, strict=True)):
        truth = np.asarray(volume.labels) == 1
        for tta in candidates_tta:
            progress(step, steps, f"calibrating on {volume.name or index} ({tta} mirrorings)")
            step += 1
            with tempfile.TemporaryDirectory() as tmp:
                predictor = Predictor(
                    model, modality=volume.modality, threshold=0.5, min_cluster_mm3=0, tta=tta
                )
                predictor.predict(np.asarray(volume.image), Path(tmp) / "p.zarr")
                mask = np.asarray(zarr.open_group(str(Path(tmp) / "p.zarr"))["segmentation"][:])
            for candidate in candidates_mm3:
                kept = mask.copy()
                remove_small_clusters(kept, min_cluster_voxels(candidate, spacing), kept.shape)
                result = evaluate(kept, truth, spacing=spacing)
                scores[(int(tta), float(candidate))].append(
                    (result["dice"], result["cluster"]["f1"])
                )
    progress(steps, steps, "calibrated")
    rows = [
        {
            "tta": tta,
            "min_cluster_mm3": candidate,
            "dice": float(np.mean([d for d, _ in values])),
            "f1": float(np.mean([f for _, f in values])),
        }
        for (tta, candidate), values in scores.items()
    ]

    def score(row: dict[str, float]) -> float:
        return (row["dice"] + row["f1"]) / 2

    best = None
    for tta in sorted(set(int(t) for t in candidates_tta)):
        own = max(
            (row for row in rows if row["tta"] == tta),
            key=lambda row: (score(row), -row["min_cluster_mm3"]),
        )
        if best is None or score(own) >= score(best) + min_tta_gain:
            best = own
    assert best is not None
    rule = {"threshold": 0.5, "min_cluster_mm3": best["min_cluster_mm3"], "tta": best["tta"]}
    return rule, rows

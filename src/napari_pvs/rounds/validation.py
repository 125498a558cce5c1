"""A model's per-patch counts and validation Dice on a round's validation crops (the same crops
for base and new), by the one definition of :mod:`napari_pvs.validation` (imported when used:
``napari-pvs round --help`` stays light); and its precision on held-out answered candidates."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from napari_pvs.validation import PatchCounts


def validation_counts(model, crops: list, device: str | Any = "cpu") -> list[PatchCounts]:
    """TP/FP/FN of each validation crop (whole crop, one deterministic pass, threshold 0.5,
    labelled voxels only), in the crops' order: what the guard and the Dice are made of."""
    from napari_pvs import validation as one_dice

    return [
        one_dice.patch_counts(probability, crop.labels)
        for crop, probability in zip(crops, _probabilities(model, crops, device), strict=True)
    ]


def _probabilities(model, crops: list, device: str | Any = "cpu") -> Iterator[np.ndarray]:
    """Each crop's probability (whole crop, one deterministic pass), in the crops' order."""
    import torch

    from napari_pvs.intensity import normalize
    from napari_pvs.models import resolve_device

    if not crops:
        return
    device = resolve_device(device) if isinstance(device, str) else device
    was_training = model.training
    model.to(device).eval()
    try:
        with torch.no_grad():
            for crop in crops:
                image = normalize(np.asarray(crop.image), *crop.intensity_range)
                logits = model(torch.from_numpy(image)[None, None].to(device), crop.modality)
                yield torch.sigmoid(logits)[0, 0].float().cpu().numpy()
    finally:
        model.train(was_training)


def validation_dice(model, crops: list, device: str | Any = "cpu") -> tuple[float | None, int]:
    """The one validation Dice of ``model`` on ``crops`` and the set's size in patches
    ((None, 0) without crops). Every round scores its base and its new model on the same
    crops, so the gain is fair even when the validation set has grown since the last round."""
    from napari_pvs import validation as one_dice

    return one_dice.validation_dice(validation_counts(model, crops, device))


def counts_as_lists(counts: list[PatchCounts]) -> list[list[int]]:
    """Per-patch counts as JSON-able ``[tp, fp, fn]`` rows (stored in a version's metrics)."""
    return [[c.tp, c.fp, c.fn] for c in counts]


def cluster_predicted(probability: np.ndarray, cluster: np.ndarray, threshold: float) -> bool:
    """True when at least half of the cluster's voxels are at or above ``threshold`` (the
    segmentation's own rule, ``probability >= threshold``): the version predicts it."""
    inside = np.asarray(probability)[np.asarray(cluster, dtype=bool)]
    if inside.size == 0:
        raise ValueError("an answered cluster has at least one voxel; got none")
    return 2 * int((inside >= threshold).sum()) >= inside.size


def answer_precision(
    predicted: Sequence[bool], confirmed: Sequence[bool]
) -> tuple[float | None, int]:
    """Precision on answered candidates: of the clusters predicted, the share answered yes
    (``confirmed``); and how many were predicted (None, 0 when none was)."""
    pairs = list(zip(predicted, confirmed, strict=True))
    n = sum(bool(p) for p, _ in pairs)
    yes = sum(bool(p) and bool(c) for p, c in pairs)
    return (yes / n if n else None), n


def held_out_precision(model, crops: list, device: str | Any = "cpu") -> dict[str, Any]:
    """``model``'s precision on the held-out answered candidates (crops of
    :func:`napari_pvs.rounds.snapshot.load_held_out`: 1 yes, 0 no on the cluster, 255
    elsewhere) at its own threshold: ``answer_precision`` (None when it predicts none of
    them), ``answer_precision_n`` (clusters it predicts) and ``held_out_answers``."""
    from napari_pvs.inference.segmentation import segmentation_rule

    threshold, _, _ = segmentation_rule(model, None, None, None)
    predicted, confirmed = [], []
    for crop, probability in zip(crops, _probabilities(model, crops, device), strict=True):
        labels = np.asarray(crop.labels)
        predicted.append(cluster_predicted(probability, labels != 255, threshold))
        confirmed.append(bool((labels == 1).any()))
    precision, n = answer_precision(predicted, confirmed)
    return {"answer_precision": precision, "answer_precision_n": n, "held_out_answers": len(crops)}

"""A model's per-patch counts and validation Dice on a round's validation crops (the same crops
for base and new), by the one definition of :mod:`napari_pvs.validation` (imported when used:
``napari-pvs round --help`` stays light)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from napari_pvs.validation import PatchCounts


def validation_counts(model, crops: list, device: str | Any = "cpu") -> list[PatchCounts]:
    """TP/FP/FN of each validation crop (whole crop, one deterministic pass, threshold 0.5,
    labelled voxels only), in the crops' order: what the guard and the Dice are made of."""
    import torch

    from napari_pvs import validation as one_dice
    from napari_pvs.intensity import normalize
    from napari_pvs.models import resolve_device

    if not crops:
        return []
    device = resolve_device(device) if isinstance(device, str) else device
    was_training = model.training
    model.to(device).eval()
    counts = []
    with torch.no_grad():
        for crop in crops:
            image = normalize(np.asarray(crop.image), *crop.intensity_range)
            logits = model(torch.from_numpy(image)[None, None].to(device), crop.modality)
            probability = torch.sigmoid(logits)[0, 0].float().cpu().numpy()
            counts.append(one_dice.patch_counts(probability, crop.labels))
    model.train(was_training)
    return counts


def validation_dice(model, crops: list, device: str | Any = "cpu") -> tuple[float | None, int]:
    """The one validation Dice of ``model`` on ``crops`` and the set's size in patches
    ((None, 0) without crops). Every round scores its base and its new model on the same
    crops, so the gain is fair even when the validation set has grown since the last round."""
    from napari_pvs import validation as one_dice

    return one_dice.validation_dice(validation_counts(model, crops, device))


def counts_as_lists(counts: list[PatchCounts]) -> list[list[int]]:
    """Per-patch counts as JSON-able ``[tp, fp, fn]`` rows (stored in a version's metrics)."""
    return [[c.tp, c.fp, c.fn] for c in counts]

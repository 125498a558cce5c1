"""Validation Dice of a model on a round's validation crops (the same crops for base and new)."""

from __future__ import annotations

from typing import Any

import numpy as np


def validation_dice(model, crops: list, device: str | Any = "cpu") -> tuple[float | None, int]:
    """Pooled voxel Dice over the labelled voxels of the validation crops (whole crops, one
    deterministic pass each, the model's calibrated threshold) and the labelled voxel count.

    Every round scores its base and its new model on the same crops, so the gain is fair even
    when the validation set has grown since the previous round.
    """
    import torch

    from napari_pvs.intensity import normalize
    from napari_pvs.models import resolve_device

    if not crops:
        return None, 0
    device = resolve_device(device) if isinstance(device, str) else device
    threshold = float((getattr(model, "segmentation_rule", None) or {}).get("threshold", 0.5))
    model.to(device).eval()
    inter = total = labelled = 0
    with torch.no_grad():
        for crop in crops:
            image = normalize(np.asarray(crop.image), *crop.intensity_range)
            logits = model(torch.from_numpy(image)[None, None].to(device), crop.modality)
            pred = torch.sigmoid(logits)[0, 0].float().cpu().numpy() >= threshold
            labels = np.asarray(crop.labels)
            mask = labels != 255
            truth = (labels == 1) & mask
            pred &= mask
            inter += int((pred & truth).sum())
            total += int(pred.sum() + truth.sum())
            labelled += int(mask.sum())
    return (1.0 if total == 0 else 2.0 * inter / total), labelled

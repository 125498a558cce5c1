"""Validation Dice of a model on fixed patches, pooled over patches and over processes."""

from __future__ import annotations

import torch
import torch.distributed as dist

from napari_pvs.validation import patch_counts


def evaluate_patches(model, batches, device: torch.device, world: int = 1) -> float:
    """Dice over all validation patches pooled (labelled voxels only).

    With ``world`` > 1 each process holds a share of the patches: the counts are summed over
    the processes, so every process gets the same Dice and takes the same best/stop decision.
    """
    inter, total = overlap_counts(model, batches, device)
    if world > 1:
        counts = torch.tensor([inter, total], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        inter, total = counts.tolist()
    return 1.0 if total == 0 else 2 * inter / total


def overlap_counts(model, batches, device: torch.device) -> tuple[float, float]:
    """(prediction & truth, prediction + truth) voxel counts over ``batches`` by the one
    definition of :func:`napari_pvs.validation.patch_counts` (threshold 0.5, labelled voxels):
    they add up across processes exactly, so every process derives the same validation Dice."""
    model.eval()
    inter = total = 0.0
    with torch.no_grad():
        for image, label, modality in batches:
            prob = torch.sigmoid(model(torch.from_numpy(image).to(device), modality))
            counts = patch_counts(prob[0, 0].float().cpu().numpy(), label)
            inter += float(counts.tp)
            total += float(2 * counts.tp + counts.fp + counts.fn)
    return inter, total

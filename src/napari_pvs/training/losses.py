"""The masked loss (BCE + soft Dice over labelled voxels; 255 = not reviewed is ignored), its
global-batch form for several processes, and the labelled-voxel Dice."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from napari_pvs.metrics import dice
from napari_pvs.training.data import UNLABELLED


def masked_loss(outputs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice over labelled voxels; coarse deep-supervision logits are upsampled.

    ``labels`` is ``(B, 1, D, H, W)`` with 0/1 and :data:`UNLABELLED`. Levels are weighted
    1, 1/2, 1/4... (normalised). Returns zero (with a graph) when nothing is labelled.
    """
    return _loss_from_sums(_loss_sums(outputs, labels))


def distributed_masked_loss(
    outputs: list[torch.Tensor], labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`masked_loss` of the global batch when each process holds a share of it.

    The loss is a function of sums over the whole batch (labelled voxels, BCE, the soft-Dice
    terms), not a mean of per-sample losses, so averaging per-process losses (what DDP's
    gradient averaging would do) weights a share with few labelled voxels as much as one
    with many. Instead the sums are all-reduced and each process differentiates the global
    loss through its own share only. Returns ``(to_backward, value)``: ``value`` is the global
    loss (identical on every process); ``to_backward`` is it times the world size, because DDP
    divides the summed gradients by the world size, so the step equals one process's step on
    the global batch.
    """
    local = _loss_sums(outputs, labels)
    total = local.detach().clone()
    dist.all_reduce(total)
    loss = _loss_from_sums(local + (total - local.detach()))  # global value, local gradient
    return loss * dist.get_world_size(), loss.detach()


def _loss_sums(outputs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Per level: BCE sum, labelled voxels, soft intersection, prediction sum, PVS voxels."""
    mask = (labels != UNLABELLED).float()
    target = (labels == 1).float()
    rows = []
    for logits in outputs:
        if logits.shape[2:] != labels.shape[2:]:
            logits = F.interpolate(logits, size=labels.shape[2:], mode="trilinear")
        logits = logits.float()
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        prob = torch.sigmoid(logits) * mask
        rows.append(
            torch.stack(
                [
                    (bce * mask).sum(),
                    mask.sum(),
                    (prob * target).sum(),
                    prob.sum(),
                    (target * mask).sum(),
                ]
            )
        )
    return torch.stack(rows)


def _loss_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """The loss from :func:`_loss_sums` (of one batch, or all-reduced over processes)."""
    weights = sums.new_tensor([0.5**i for i in range(len(sums))])
    bce = sums[:, 0] / sums[:, 1].clamp(min=1.0)
    dice = 1 - (2 * sums[:, 2] + 1.0) / (sums[:, 3] + sums[:, 4] + 1.0)
    return (weights * (bce + dice)).sum() / weights.sum()


def labelled_dice(prob: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> float:
    """Voxel Dice at ``threshold`` over labelled voxels (1.0 when both are empty)."""
    mask = labels != UNLABELLED
    return dice((prob >= threshold) & mask, (labels == 1) & mask)

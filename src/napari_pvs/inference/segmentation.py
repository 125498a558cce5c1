"""From probability to segmentation: the model's calibrated rule and the small-cluster pass.

A checkpoint may carry a ``segmentation_rule`` calibrated on tuning data (threshold, smallest
cluster kept, test-time mirrorings); the predictor's own settings override it, and
:data:`napari_pvs.models.DEFAULT_SEGMENTATION_RULE` fills what neither gives. After the last
chunk, clusters too small to be a PVS are removed from the stored segmentation (never from the
probability), exactly and chunk by chunk.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch

from napari_pvs.models import DEFAULT_SEGMENTATION_RULE, MAX_MIN_CLUSTER_MM3
from napari_pvs.progress import CancelToken, check_cancelled


def segmentation_rule(
    model: torch.nn.Module,
    threshold: float | None,
    min_cluster_mm3: float | None,
    tta: bool | int | None,
) -> tuple[float, float, bool | int]:
    """Threshold, smallest cluster (mm^3) and mirrorings asked for, the model's calibrated
    ``segmentation_rule`` standing in for each one that is None; the first two checked."""
    rule = {
        **DEFAULT_SEGMENTATION_RULE,
        **dict(getattr(model, "segmentation_rule", None) or {}),
    }
    threshold = float(rule["threshold"] if threshold is None else threshold)
    min_cluster_mm3 = float(rule["min_cluster_mm3"] if min_cluster_mm3 is None else min_cluster_mm3)
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    if not 0 <= min_cluster_mm3 <= MAX_MIN_CLUSTER_MM3:
        raise ValueError(
            f"min_cluster_mm3 must be between 0 (keep every cluster) and "
            f"{MAX_MIN_CLUSTER_MM3:g} mm3, got {min_cluster_mm3}"
        )
    return threshold, min_cluster_mm3, rule["tta"] if tta is None else tta


def min_cluster_voxels(min_cluster_mm3: float, spacing: Sequence[float]) -> int:
    """Smallest cluster kept, in voxels: clusters under ``min_cluster_mm3`` mm^3 are removed."""
    if min_cluster_mm3 <= 0:
        return 0
    return max(1, math.ceil(min_cluster_mm3 / math.prod(float(s) for s in spacing) - 1e-9))


def remove_small_clusters(
    segmentation,
    min_voxels: int,
    chunks: Sequence[int],
    cancel: CancelToken | None = None,
) -> int:
    """Delete 26-connected clusters of fewer than ``min_voxels`` voxels from a stored mask.

    Works chunk by chunk (zarr or numpy, changed in place) and is exact without labelling the
    whole volume: a cluster of fewer than ``min_voxels`` voxels lies within ``min_voxels - 2``
    voxels of each of its voxels, so it is complete inside the chunk grown by a halo of
    ``min_voxels`` and does not touch that box's inner border; clusters that touch it are kept
    (they are larger, or go on outside). Clusters never merge, so removing some leaves the rest
    unchanged: the pass is idempotent and an interrupted one simply runs again. Returns the
    number of voxels removed.
    """
    from napari_pvs.metrics import label_clusters

    if min_voxels <= 1:
        return 0
    shape = tuple(int(s) for s in segmentation.shape)
    halo = int(min_voxels)
    removed = 0
    starts = [range(0, size, int(step)) for size, step in zip(shape, chunks, strict=True)]
    for start in itertools.product(*starts):
        check_cancelled(cancel)
        inner = tuple(
            slice(a, min(a + int(c), size)) for a, c, size in zip(start, chunks, shape, strict=True)
        )
        outer = tuple(
            slice(max(sl.start - halo, 0), min(sl.stop + halo, size))
            for sl, size in zip(inner, shape, strict=True)
        )
        local = tuple(
            slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer, strict=True)
        )
        box = np.asarray(segmentation[outer]) > 0
        if not box[local].any():
            continue
        labels, count = label_clusters(box)
        small = np.bincount(labels.ravel(), minlength=count + 1) < min_voxels
        small[0] = False
        for axis, (sl, size) in enumerate(zip(outer, shape, strict=True)):
            if sl.start > 0:  # an inner border: what touches it may go on outside
                small[np.unique(labels.take(0, axis=axis))] = False
            if sl.stop < size:
                small[np.unique(labels.take(-1, axis=axis))] = False
        drop = small[labels[local]]
        if drop.any():
            piece = np.asarray(segmentation[inner]).copy()
            piece[drop] = 0
            segmentation[inner] = piece
            removed += int(drop.sum())
    return removed

"""Segmentation metrics for PVS: voxel Dice, cluster detection, counts and volumes, per region.

PVS are many tiny objects, so voxel Dice alone hides whether each PVS was found. Clusters are
26-connected components. A predicted cluster matches a true one when they share at least one
voxel; matching is one-to-one, **greedy by overlap size** (the pair sharing the most voxels is
matched first, then the next among still-unmatched clusters, ties broken by the lower labels),
so a prediction that merges two PVS counts one hit and one miss. Per-region figures assign each
cluster to the region holding most of its voxels (ties: the lower region label).

Ground truth holds 0 (background), 1 (PVS) and 255 (not labelled); any other value is refused
with the values found. Voxels where the ground truth is 255 are not scored: they are removed from
both masks before anything is computed, so Dice, clusters, counts and volumes cover the labelled
voxels only (a predicted cluster reaching into unlabelled voxels is judged by its labelled part;
one lying wholly in them is not counted). An integer prediction must be a 0/1 mask (floats are
probabilities, thresholded at 0.5).

Cluster labelling needs whole masks in memory (dask inputs are computed): one byte per voxel for
each mask plus 4 bytes per voxel for each label image.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from napari_pvs.io import UNLABELLED, check_label_values
from napari_pvs.phantom import REGION_NAMES

#: 26-connectivity in 3D (full connectivity in any dimension).
MATCHING_RULE = "one-to-one, greedy by overlap size (>= 1 shared voxel), 26-connectivity"


def as_mask(array, name: str = "mask") -> np.ndarray:
    """Boolean foreground of a mask, label image or probability map (threshold 0.5 for floats).

    Dask and other lazy arrays are computed. Raises ``ValueError`` for non-numeric data or NaN.
    """
    data = np.asarray(array.compute() if hasattr(array, "compute") else array)
    if data.dtype == bool:
        return data
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise ValueError(
            f"{name} must be a numeric mask, label image or probability map, got dtype {data.dtype}"
        )
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)):
            raise ValueError(f"{name} contains NaN or infinite values; fix or mask them first")
        return data >= 0.5
    return data != 0


def _computed(array) -> np.ndarray:
    return np.asarray(array.compute() if hasattr(array, "compute") else array)


def _prediction_mask(pred) -> np.ndarray:
    """The predicted mask: a 0/1 (or bool) mask, or a probability map thresholded at 0.5."""
    data = _computed(pred)
    if np.issubdtype(data.dtype, np.integer):
        values = np.unique(data)
        extra = [int(v) for v in values if v not in (0, 1)]
        if extra:
            shown = ", ".join(map(str, extra[:10])) + (", ..." if len(extra) > 10 else "")
            raise ValueError(
                f"the prediction holds values {shown} besides 0 and 1; pass a 0/1 mask or a "
                "probability map (a label image must be thresholded first, e.g. labels > 0)"
            )
    return as_mask(data, "prediction")


def _truth(gt) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth as (PVS mask, labelled mask); values other than 0/1/255 are refused."""
    data = _computed(gt)
    if data.dtype == np.bool_:
        return data, np.ones(data.shape, dtype=bool)
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise ValueError(f"ground truth must be a numeric label image, got dtype {data.dtype}")
    check_label_values(data, "ground truth labels")
    return data == 1, data != UNLABELLED


def _structure(ndim: int) -> np.ndarray:
    return np.ones((3,) * ndim, dtype=bool)


def label_clusters(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 26-connected (full-connectivity) clusters of a boolean mask."""
    labels, n = ndimage.label(mask, structure=_structure(mask.ndim))
    return labels.astype(np.int32, copy=False), int(n)


#: Counting clusters labels the whole mask in memory (5 bytes per voxel); above this many voxels
#: only the segmented voxels are counted (streamed), and the clusters are not.
MAX_COUNT_VOXELS = 256**3


def count_pvs(segmentation) -> tuple[int, int | None]:
    """Segmented voxels and 26-connected clusters of a stored mask (zarr, dask or numpy); the
    voxels are summed chunk by chunk, the clusters counted only up to :data:`MAX_COUNT_VOXELS`
    (None above it)."""
    import dask.array as da

    if isinstance(segmentation, da.Array | np.ndarray):
        lazy = da.asarray(segmentation)
    else:  # a store's array: one task per stored chunk
        lazy = da.from_array(segmentation, chunks=segmentation.chunks)
    voxels = int(lazy.sum(dtype=np.int64).compute(scheduler="synchronous"))
    clusters = None
    if int(np.prod(segmentation.shape)) <= MAX_COUNT_VOXELS:
        clusters = label_clusters(np.asarray(segmentation[...]) > 0)[1] if voxels else 0
    return voxels, clusters


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Voxel Dice of two boolean masks; 1.0 when both are empty (nothing to find, nothing found)."""
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def match_clusters(
    pred_labels: np.ndarray, n_pred: int, gt_labels: np.ndarray, n_gt: int
) -> list[tuple[int, int, int]]:
    """One-to-one (pred, gt, overlap) matches, greedy by overlap size; see the module notes."""
    both = (pred_labels > 0) & (gt_labels > 0)
    if not both.any():
        return []
    pairs = pred_labels[both].astype(np.int64) * (n_gt + 1) + gt_labels[both]
    keys, overlaps = np.unique(pairs, return_counts=True)
    pred_ids, gt_ids = np.divmod(keys, n_gt + 1)
    order = np.lexsort((gt_ids, pred_ids, -overlaps))
    used_pred: set[int] = set()
    used_gt: set[int] = set()
    matches = []
    for i in order:
        p, g = int(pred_ids[i]), int(gt_ids[i])
        if p in used_pred or g in used_gt:
            continue
        used_pred.add(p)
        used_gt.add(g)
        matches.append((p, g, int(overlaps[i])))
    return matches


def _cluster_regions(labels: np.ndarray, n: int, regions: np.ndarray) -> np.ndarray:
    """Region of each cluster (index = cluster label): the region holding most of its voxels."""
    fg = labels > 0
    n_regions = int(regions.max()) + 1 if regions.size else 1
    table = np.bincount(
        labels[fg].astype(np.int64) * n_regions + regions[fg], minlength=(n + 1) * n_regions
    ).reshape(n + 1, n_regions)
    return table.argmax(axis=1)


def _prf(hits_pred: int, n_pred: int, hits_gt: int, n_gt: int) -> dict[str, float]:
    precision = hits_pred / n_pred if n_pred else (1.0 if n_gt == 0 else 0.0)
    recall = hits_gt / n_gt if n_gt else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _summary(
    pred: np.ndarray,
    gt: np.ndarray,
    n_pred: int,
    n_gt: int,
    matched_pred: int,
    matched_gt: int,
    voxel_mm3: float,
) -> dict:
    pred_mm3 = float(pred.sum()) * voxel_mm3
    gt_mm3 = float(gt.sum()) * voxel_mm3
    return {
        "dice": dice(pred, gt),
        "cluster": {
            "true_positives": matched_gt,
            "false_positives": n_pred - matched_pred,
            "false_negatives": n_gt - matched_gt,
            **_prf(matched_pred, n_pred, matched_gt, n_gt),
        },
        "count": {"pred": n_pred, "gt": n_gt, "abs_diff": abs(n_pred - n_gt)},
        "volume_mm3": {"pred": pred_mm3, "gt": gt_mm3, "abs_diff": abs(pred_mm3 - gt_mm3)},
    }


def evaluate(pred, gt, regions=None, spacing=(1.0, 1.0, 1.0)) -> dict:
    """All PVS metrics of ``pred`` against ``gt`` as a JSON-able dict.

    ``pred`` may be a mask, label image or probability map (thresholded at 0.5); ``gt`` a mask or
    label image; ``regions`` an optional region map (:data:`napari_pvs.phantom.REGION_NAMES`
    labels name the per-region entries, other labels appear as ``region_<n>``). ``spacing`` (mm)
    turns voxel counts into volumes. ``gt`` values must be 0, 1 or 255; voxels at 255 (not
    labelled) are left out of every figure (see the module notes); the result says how many
    (``unlabelled_voxels``). A :class:`napari_pvs.io.LabelWarning` says when ``gt`` has no PVS.
    """
    p = _prediction_mask(pred)
    g, labelled = _truth(gt)
    if p.shape != g.shape:
        raise ValueError(
            f"prediction shape {p.shape} does not match ground-truth shape {g.shape}; "
            "both must cover the same voxel grid (resample or crop one of them first)"
        )
    sp = (float(spacing),) * p.ndim if np.isscalar(spacing) else tuple(float(s) for s in spacing)
    if len(sp) != p.ndim or not all(s > 0 for s in sp):
        raise ValueError(f"spacing must be {p.ndim} positive numbers in mm, got {spacing!r}")
    voxel_mm3 = float(np.prod(sp))
    unlabelled = int(labelled.size - np.count_nonzero(labelled))
    if unlabelled:
        p = p & labelled
    pred_labels, n_pred = label_clusters(p)
    gt_labels, n_gt = label_clusters(g)
    matches = match_clusters(pred_labels, n_pred, gt_labels, n_gt)
    result = _summary(p, g, n_pred, n_gt, len(matches), len(matches), voxel_mm3)
    result["matching"] = MATCHING_RULE
    result["spacing"] = list(sp)
    result["unlabelled_voxels"] = unlabelled
    if regions is None:
        return result

    reg = np.asarray(regions.compute() if hasattr(regions, "compute") else regions)
    if reg.shape != p.shape:
        raise ValueError(
            f"region map shape {reg.shape} does not match the prediction shape {p.shape}"
        )
    if not np.issubdtype(reg.dtype, np.integer) or (reg.size and reg.min() < 0):
        raise ValueError("the region map must hold non-negative integer labels")
    pred_region = _cluster_regions(pred_labels, n_pred, reg)
    gt_region = _cluster_regions(gt_labels, n_gt, reg)
    matched_pred = np.zeros(n_pred + 1, dtype=bool)
    matched_gt = np.zeros(n_gt + 1, dtype=bool)
    for pl, gl, _ in matches:
        matched_pred[pl] = True
        matched_gt[gl] = True
    per_region = {}
    for label in np.unique(reg):
        if label == 0:
            continue
        inside = reg == label
        in_pred = pred_region[1:] == label
        in_gt = gt_region[1:] == label
        name = REGION_NAMES.get(int(label), f"region_{int(label)}")
        per_region[name] = _summary(
            p & inside,
            g & inside,
            int(in_pred.sum()),
            int(in_gt.sum()),
            int((matched_pred[1:] & in_pred).sum()),
            int((matched_gt[1:] & in_gt).sum()),
            voxel_mm3,
        )
    result["regions"] = per_region
    return result


def format_table(result: dict) -> str:
    """A readable text table of :func:`evaluate`'s result: overall, then each region that has
    predicted or true PVS (the JSON keeps every region)."""
    regions = {
        name: r
        for name, r in result.get("regions", {}).items()
        if r["count"]["pred"] or r["count"]["gt"]  # regions with nothing in them are noise
    }
    rows = [("overall", result), *regions.items()]
    header = (
        f"{'scope':<16}{'dice':>7}{'prec':>7}{'recall':>7}{'F1':>7}"
        f"{'n_pred':>8}{'n_gt':>7}{'vol_pred':>11}{'vol_gt':>11}"
    )
    lines = [header, "-" * len(header)]
    for name, r in rows:
        c = r["cluster"]
        lines.append(
            f"{name:<16}{r['dice']:>7.3f}{c['precision']:>7.3f}{c['recall']:>7.3f}{c['f1']:>7.3f}"
            f"{r['count']['pred']:>8d}{r['count']['gt']:>7d}"
            f"{r['volume_mm3']['pred']:>11.1f}{r['volume_mm3']['gt']:>11.1f}"
        )
    lines.append(f"clusters: {result.get('matching', MATCHING_RULE)}; volumes in mm^3")
    if result.get("unlabelled_voxels"):
        lines.append(
            f"{result['unlabelled_voxels']} ground-truth voxels are 255 (not labelled) and were "
            "not scored"
        )
    return "\n".join(lines)

"""Error yield: how much of a model's error a queue puts in front of the annotator.

For a prediction, its ground truth and the queued patch boxes, :func:`error_yield` gives

* the **voxel** share: of the wrong voxels (false positives plus false negatives over the
  labelled voxels; ground truth 255 is excluded), the share that lies inside the boxes;
* the **cluster** share: of the wrong clusters (predicted clusters matching no true PVS, and
  true PVS no predicted cluster matches, with :mod:`napari_pvs.metrics`' 26-connectivity and
  one-to-one matching), the share that is *inside*: a cluster is inside when at least one of its
  voxels lies in a box;

each divided by the share that random patches of the same number and sizes would hold on
average. The random reference is analytic, not sampled: a random patch of size ``s`` is placed
uniformly over every start that keeps it inside the volume, so a voxel ``v`` is covered with
probability ``prod_axis (#starts covering v) / (#starts)``, and a cluster is hit with
probability ``#starts whose box meets the cluster / #starts``. The reference for the queue is
the sum of these expectations over its boxes (random patches are not kept apart, so for a
queue of non-overlapping boxes it is the expected share of as many independent patches,
overlaps counted twice; capped at 1). A yield of 2 means the queue holds twice the error that
random patches of the same size would. Over several volumes (:func:`pooled_error_yield`, the
benchmark's pool) the shares are pooled and each random patch is placed uniformly over every
position, in any volume, where it fits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from napari_pvs.metrics import _prediction_mask, _truth, label_clusters, match_clusters

Box = tuple[Sequence[int], Sequence[int]]


@dataclass(frozen=True)
class ErrorYield:
    """Shares of the wrong voxels and clusters inside the queued boxes, and the yields."""

    wrong_voxels: int
    wrong_voxels_inside: int
    voxel_share: float
    voxel_random_share: float
    wrong_clusters: int
    wrong_clusters_inside: int
    cluster_share: float
    cluster_random_share: float

    @property
    def voxel_yield(self) -> float | None:
        """Voxel share over random's (None when there is no wrong voxel to find)."""
        return _ratio(self.voxel_share, self.voxel_random_share)

    @property
    def cluster_yield(self) -> float | None:
        """Cluster share over random's (None when there is no wrong cluster to find)."""
        return _ratio(self.cluster_share, self.cluster_random_share)


def _ratio(share: float, reference: float) -> float | None:
    return share / reference if reference > 0 else None


def _box_slices(box: Box, shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[int, ...]]:
    start, stop = (np.asarray(b, dtype=np.int64) for b in box)
    if start.shape != (len(shape),) or stop.shape != (len(shape),):
        raise ValueError(f"a box needs {len(shape)} start and stop coordinates, got {box!r}")
    if np.any(start < 0) or np.any(stop > np.asarray(shape)) or np.any(stop <= start):
        raise ValueError(f"box {box!r} is empty or outside the volume of shape {tuple(shape)}")
    slices = tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
    return slices, tuple(int(b - a) for a, b in zip(start, stop, strict=True))


def _coverage_1d(length: int, size: int) -> np.ndarray:
    """Probability that each coordinate is covered by a uniformly placed window of ``size``."""
    starts = length - size + 1
    first = np.maximum(np.arange(length) - size + 1, 0)
    last = np.minimum(np.arange(length), starts - 1)
    return (last - first + 1) / starts


def _random_voxels_covered(wrong: np.ndarray, size: Sequence[int]) -> float:
    """Expected number of ``wrong`` voxels one random patch of ``size`` covers."""
    covered = wrong.astype(np.float64)
    for axis, (length, s) in enumerate(zip(wrong.shape, size, strict=True)):
        shape = [1] * wrong.ndim
        shape[axis] = length
        covered = covered * _coverage_1d(length, s).reshape(shape)
    return float(covered.sum())


@dataclass(frozen=True)
class _Cluster:
    """One wrong cluster: its label image, label and bounding box."""

    labels: np.ndarray
    label: int
    box: tuple[slice, ...]

    def mask(self, region: tuple[slice, ...]) -> np.ndarray:
        return self.labels[region] == self.label


def _clusters(labels: np.ndarray, ids: Sequence[int]) -> list[_Cluster]:
    objects = ndimage.find_objects(labels)
    return [_Cluster(labels, i, objects[i - 1]) for i in ids]


def _random_cluster_hits(
    clusters: list[_Cluster], shape: Sequence[int], size: Sequence[int]
) -> float:
    """Expected number of ``clusters`` one random patch of ``size`` meets.

    A start ``t`` meets a cluster when its window ``[t, t + size)`` holds a cluster voxel, i.e.
    the window sum of the cluster's indicator is positive; computed near each cluster only.
    """
    positions = float(np.prod([n - s + 1 for n, s in zip(shape, size, strict=True)]))
    hits = 0.0
    for cluster in clusters:
        lo = np.array([b.start for b in cluster.box])
        hi = np.array([b.stop for b in cluster.box])
        first = np.maximum(lo - np.asarray(size) + 1, 0)
        last = np.minimum(hi - 1, np.asarray(shape) - np.asarray(size))  # inclusive
        region = tuple(
            slice(int(a), int(b) + s) for a, b, s in zip(first, last, size, strict=True)
        )
        sums = cluster.mask(region).astype(np.int64)
        for axis, s in enumerate(size):
            cumulative = np.cumsum(sums, axis=axis)
            pad = [(0, 0)] * sums.ndim
            pad[axis] = (1, 0)
            cumulative = np.pad(cumulative, pad)
            count = sums.shape[axis] - s + 1
            sums = cumulative.take(np.arange(s, s + count), axis=axis) - cumulative.take(
                np.arange(count), axis=axis
            )
        hits += float(np.count_nonzero(sums)) / positions
    return hits


@dataclass
class _VolumeErrors:
    """One volume's wrong voxels and clusters, and which of them the queue's boxes hold."""

    shape: tuple[int, ...]
    wrong: np.ndarray
    clusters: list[_Cluster]
    wrong_inside: int
    clusters_inside: int
    sizes: list[tuple[int, ...]]

    def positions(self, size: Sequence[int]) -> int:
        """Starts at which a patch of ``size`` fits in this volume (0: it does not fit)."""
        return int(np.prod([max(n - s + 1, 0) for n, s in zip(self.shape, size, strict=True)]))


def _volume_errors(pred, gt, boxes: Sequence[Box]) -> _VolumeErrors:
    p = _prediction_mask(pred)
    g, labelled = _truth(gt)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} does not match ground truth {g.shape}")
    p = p & labelled
    wrong = (p != g) & labelled
    inside = np.zeros(p.shape, dtype=bool)
    sizes = []
    for box in boxes:
        slices, size = _box_slices(box, p.shape)
        inside[slices] = True
        sizes.append(size)
    pred_labels, n_pred = label_clusters(p)
    gt_labels, n_gt = label_clusters(g)
    matches = match_clusters(pred_labels, n_pred, gt_labels, n_gt)
    false_ids = sorted(set(range(1, n_pred + 1)) - {m[0] for m in matches})
    missed_ids = sorted(set(range(1, n_gt + 1)) - {m[1] for m in matches})
    clusters = _clusters(pred_labels, false_ids) + _clusters(gt_labels, missed_ids)
    return _VolumeErrors(
        shape=p.shape,
        wrong=wrong,
        clusters=clusters,
        wrong_inside=int((wrong & inside).sum()),
        clusters_inside=sum(bool((c.mask(c.box) & inside[c.box]).any()) for c in clusters),
        sizes=sizes,
    )


def pooled_error_yield(volumes: Sequence[tuple[object, object, Sequence[Box]]]) -> ErrorYield:
    """The error yield of a queue over several volumes: ``(pred, gt, boxes)`` per volume.

    Shares are pooled (wrong voxels and clusters of all volumes together); each random patch of
    the reference is placed uniformly over every position, in any volume, where it fits.
    """
    errors = [_volume_errors(pred, gt, boxes) for pred, gt, boxes in volumes]
    sizes = [size for e in errors for size in e.sizes]
    if not sizes:
        raise ValueError("no queued boxes: the error yield of an empty queue is undefined")
    n_wrong = sum(int(e.wrong.sum()) for e in errors)
    n_clusters = sum(len(e.clusters) for e in errors)
    expected_voxels = expected_clusters = 0.0
    for size, boxes_of_size in Counter(sizes).items():  # queues hold mostly one patch size
        positions = [e.positions(size) for e in errors]
        total = sum(positions)
        for e, count in zip(errors, positions, strict=True):
            if count:
                weight = boxes_of_size * count / total
                expected_voxels += weight * _random_voxels_covered(e.wrong, size)
                expected_clusters += weight * _random_cluster_hits(e.clusters, e.shape, size)
    wrong_inside = sum(e.wrong_inside for e in errors)
    clusters_inside = sum(e.clusters_inside for e in errors)
    return ErrorYield(
        wrong_voxels=n_wrong,
        wrong_voxels_inside=wrong_inside,
        voxel_share=wrong_inside / n_wrong if n_wrong else 0.0,
        voxel_random_share=min(1.0, expected_voxels / n_wrong) if n_wrong else 0.0,
        wrong_clusters=n_clusters,
        wrong_clusters_inside=clusters_inside,
        cluster_share=clusters_inside / n_clusters if n_clusters else 0.0,
        cluster_random_share=min(1.0, expected_clusters / n_clusters) if n_clusters else 0.0,
    )


def error_yield(pred, gt, boxes: Sequence[Box]) -> ErrorYield:
    """The error yield of the queued ``boxes`` ((start, stop) voxel corners, stop exclusive)
    for ``pred`` (0/1 mask or probability, 0.5) against ``gt`` (0/1/255); see the module notes.
    """
    return pooled_error_yield([(pred, gt, boxes)])


def format_error_yield(strategy: str, result: ErrorYield) -> str:
    """The benchmark's line: ``STRATEGY: error yield X (clusters Y)``; ``n/a`` when undefined."""
    return format_yields(strategy, result.voxel_yield, result.cluster_yield)


def format_yields(strategy: str, voxel: float | None, cluster: float | None) -> str:
    """``STRATEGY: error yield X (clusters Y)`` from the two yields (e.g. means over seeds)."""

    def shown(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    return f"{strategy}: error yield {shown(voxel)} (clusters {shown(cluster)})"

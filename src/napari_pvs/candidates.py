"""Candidates for yes/no review: every connected predicted-PVS cluster of a prediction.

A candidate is one 26-connected cluster of a volume's segmentation (the same clusters
:mod:`napari_pvs.metrics` counts), with its bounding box, size (voxels and mm³), mean
probability and uncertainty (mean predictive entropy over its voxels, in bits). An annotator
answers "is this a PVS?" with one key; the answer is a partial label of the cluster's voxels
(:mod:`napari_pvs.project.answers`).

Clusters are labelled once over the whole segmentation (one byte plus four bytes per voxel);
probability, entropy, labels and regions are read only inside each cluster's box, so a lazy
store (zarr, dask) is never read whole. A cluster with any voxel already labelled (``exclude``
holds something other than ``unlabelled_value`` there: a reviewed patch or an earlier answer) is
no candidate: it is not asked again.

Orders (:data:`ORDERS`; the list returned is the order to ask in, and ``score`` is the
uncertainty, what each order sorts by within a stratum):

* ``uncertain`` (default): highest uncertainty first;
* ``size``: size-stratified: the clusters are split into terciles by voxel count, each tercile
  sorted by uncertainty, and the terciles interleaved small, medium, large, small, ... so small
  and large clusters are asked alike;
* ``region``: stratified by the region holding most of each cluster's voxels (needs a region
  map, e.g. ``phantom.REGION_NAMES``), regions interleaved in label order.

Ties are broken by the seed voxel, so the same inputs always give the same order.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: The candidate orders :func:`find_candidates` knows; the first is the default.
ORDERS = ("uncertain", "size", "region")
DEFAULT_ORDER = ORDERS[0]


@dataclass(frozen=True)
class Candidate:
    """One connected predicted-PVS cluster (26-connectivity) of a volume's prediction."""

    volume_id: int
    seed: tuple[int, int, int]  # a voxel of the cluster (identifies it within a prediction)
    bbox_start: tuple[int, int, int]  # the cluster's bounding box, [start, stop), voxel order
    bbox_stop: tuple[int, int, int]
    centre: tuple[float, float, float]  # voxel centroid
    voxels: int
    volume_mm3: float
    mean_probability: float
    uncertainty: float  # mean predictive entropy (bits) over the cluster's voxels
    score: float  # what the order sorts by within a stratum (higher = ask first)


def check_order(order: str) -> str:
    """``order`` if it is one of :data:`ORDERS`, else a ValueError listing them."""
    if order not in ORDERS:
        raise ValueError(f"unknown candidate order {order!r}; choose one of {', '.join(ORDERS)}")
    return order


def find_candidates(
    segmentation,
    probability,
    entropy=None,
    *,
    volume_id: int,
    spacing: Sequence[float],
    exclude=None,
    unlabelled_value: int = 255,
    order: str = DEFAULT_ORDER,
    regions=None,
    min_voxels: int = 1,
) -> list[Candidate]:
    """The candidates of a prediction, in the order to ask them (see the module docstring).

    ``segmentation`` (0/1), ``probability`` and ``entropy`` (bits; None: the binary entropy
    of the probability) are arrays or stores of one shape; ``exclude`` is a label array or
    store of that shape in which ``unlabelled_value`` marks voxels nobody labelled;
    ``regions`` a region map (needed by ``order="region"``). Clusters smaller than
    ``min_voxels`` are left out.
    """
    from scipy import ndimage

    from napari_pvs.metrics import label_clusters

    check_order(order)
    if order == "region" and regions is None:
        raise ValueError(
            "order 'region' needs a region map (labels/regions of the volume); this volume has "
            "none: use order 'uncertain' or 'size'"
        )
    if int(min_voxels) < 1:
        raise ValueError(f"min_voxels must be at least 1, got {min_voxels}")
    shape = tuple(int(s) for s in segmentation.shape)
    for name, array in (("probability", probability), ("entropy", entropy),
                        ("exclude", exclude), ("regions", regions)):  # fmt: skip
        if array is not None and tuple(int(s) for s in array.shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(array.shape)} but the segmentation has {shape}; pass "
                "arrays of the same prediction and volume"
            )
    if len(spacing) != 3:
        raise ValueError(f"spacing must be three values in mm, got {list(spacing)}")
    voxel_mm3 = float(np.prod([float(s) for s in spacing]))
    labels, _ = label_clusters(_read(segmentation, None) > 0)
    found: list[tuple[Candidate, int]] = []  # (candidate, region)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        mask = labels[box] == index
        voxels = int(mask.sum())
        if voxels < min_voxels:
            continue
        if exclude is not None and (_read(exclude, box)[mask] != unlabelled_value).any():
            continue
        p = _read(probability, box)[mask].astype(np.float64)
        if entropy is not None:
            h = _read(entropy, box)[mask].astype(np.float64)
        else:
            from napari_pvs.uncertainty import binary_entropy

            h = np.asarray(binary_entropy(p), dtype=np.float64)
        start = tuple(int(s.start) for s in box)
        points = np.argwhere(mask)
        seed = tuple(int(a + b) for a, b in zip(points[0], start, strict=True))
        centre = tuple(float(c + a) for c, a in zip(points.mean(axis=0), start, strict=True))
        region = 0
        if regions is not None:
            region = int(np.bincount(_read(regions, box)[mask].astype(np.int64).ravel()).argmax())
        uncertainty = float(h.mean())
        candidate = Candidate(
            volume_id=int(volume_id),
            seed=seed,  # type: ignore[arg-type]
            bbox_start=start,  # type: ignore[arg-type]
            bbox_stop=tuple(int(s.stop) for s in box),  # type: ignore[arg-type]
            centre=centre,  # type: ignore[arg-type]
            voxels=voxels,
            volume_mm3=voxels * voxel_mm3,
            mean_probability=float(p.mean()),
            uncertainty=uncertainty,
            score=uncertainty,
        )
        found.append((candidate, region))
    return _ordered(found, order)


def _ordered(found: list[tuple[Candidate, int]], order: str) -> list[Candidate]:
    def by_score(items: list[tuple[Candidate, int]]) -> list[Candidate]:
        return [c for c, _ in sorted(items, key=lambda item: (-item[0].score, item[0].seed))]

    if order == "uncertain":
        return by_score(found)
    if order == "size":
        by_size = sorted(found, key=lambda item: (item[0].voxels, item[0].seed))
        strata = [by_score(list(part)) for part in _terciles(by_size)]
    else:  # region
        names = sorted({region for _, region in found})
        strata = [by_score([item for item in found if item[1] == name]) for name in names]
    return _interleave(strata)


def _terciles(items: list) -> list[list]:
    """Three consecutive, nearly equal parts of ``items`` (empty parts dropped)."""
    n = len(items)
    bounds = [0, (n + 2) // 3, (2 * n + 2) // 3, n]
    return [items[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def _interleave(strata: list[list[Candidate]]) -> list[Candidate]:
    """One from each stratum in turn, until all are used."""
    out: list[Candidate] = []
    for turn in range(max((len(s) for s in strata), default=0)):
        out.extend(s[turn] for s in strata if turn < len(s))
    return out


def cluster_mask(segmentation_box, seed_in_box: Sequence[int]) -> np.ndarray:
    """The 26-connected component of the box's segmentation that holds the seed voxel.

    Given a candidate's bounding box of the segmentation and its seed relative to the box,
    this is exactly the candidate's cluster (no other cluster is connected to it).
    """
    from napari_pvs.metrics import label_clusters

    foreground = np.asarray(segmentation_box) > 0
    seed = tuple(int(v) for v in seed_in_box)
    if len(seed) != foreground.ndim or not all(
        0 <= v < s for v, s in zip(seed, foreground.shape, strict=True)
    ):
        raise ValueError(f"seed {list(seed)} is outside the box of shape {foreground.shape}")
    if not foreground[seed]:
        raise ValueError(
            f"seed {list(seed)} is not a segmented voxel of the box; the segmentation is not "
            "the one the candidate was found in"
        )
    labels, _ = label_clusters(foreground)
    return labels == labels[seed]


def _read(array, box) -> np.ndarray:
    """The array's values in ``box`` (all when None), computed if lazy."""
    part = array if box is None else array[box]
    if hasattr(part, "compute"):
        part = part.compute()
    return np.asarray(part)

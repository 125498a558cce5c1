"""Where training patches come from: indexed volumes, patch centres and the seeded batches.

Patches are read from lazy arrays (numpy, dask or zarr) one at a time; memory does not grow
with the volume. Every patch's sampling and augmentation derive from ``(seed, epoch, step,
index in the batch)``, so a run resumed from its last checkpoint continues exactly as the
uninterrupted run would, and a run split over several processes draws the same global batches
as one process: each process draws only its contiguous share.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from napari_pvs.intensity import normalize, robust_range, tissue_mask
from napari_pvs.training.augmentation import augment
from napari_pvs.training.config import TrainConfig
from napari_pvs.training.data import UNLABELLED, TrainingVolume


class IndexedVolume:
    """A training volume with its intensity range and where its (labelled) voxels are."""

    #: Hard negatives: background voxels in the top 2% of local contrast of their slab.
    HARD_NEGATIVE_QUANTILE = 0.98

    def __init__(self, volume: TrainingVolume, max_points: int = 200_000) -> None:
        self.volume = volume
        self.shape = tuple(int(s) for s in volume.image.shape)
        self.range = volume.intensity_range or robust_range(volume.image)
        foreground, labelled, hard = [], [], []
        slab = 32
        rng = np.random.default_rng(0)
        for z0 in range(0, self.shape[0], slab):
            block = np.asarray(volume.labels[z0 : z0 + slab])
            raw = np.asarray(volume.image[z0 : z0 + slab])
            tissue = tissue_mask(raw, *self.range)
            image = normalize(raw, *self.range)
            fg = np.argwhere(block == 1)
            # Background patches centre on labelled tissue: air outside the head teaches nothing.
            lab = np.argwhere((block != UNLABELLED) & tissue)
            if len(lab) == 0:
                lab = np.argwhere(block != UNLABELLED)
            # PVS look-alikes: thin bright or dark structures stand out from their surroundings.
            # The head's outline is the strongest edge of all and teaches nothing: skip it.
            contrast = np.abs(image - ndimage.gaussian_filter(image, 2.0))
            inner = ndimage.binary_erosion(tissue, np.ones((1, 3, 3), bool), iterations=3)
            negative = (block == 0) & inner
            hn = np.empty((0, 3), dtype=np.int64)
            if negative.any() and inner.any():
                cut = np.quantile(contrast[inner], self.HARD_NEGATIVE_QUANTILE)
                hn = np.argwhere(negative & (contrast > cut))
            labelled.append(_in_volume(_limit(lab, 4096, rng), z0))
            hard.append(_in_volume(_limit(hn, 4096, rng), z0))
            foreground.append(_in_volume(fg, z0))
        self.foreground = _limit(np.concatenate(foreground), max_points, rng)
        self.labelled = _limit(np.concatenate(labelled), max_points, rng)
        self.hard_negatives = _limit(np.concatenate(hard), max_points, rng)
        if len(self.labelled) == 0:
            raise ValueError(
                f"{volume.name or 'a training volume'} has no labelled voxels (all are "
                f"{UNLABELLED} = unlabelled); label at least one patch or drop it"
            )

    def patch(self, centre: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Image (normalised) and labels around ``centre``; padded where it leaves the volume."""
        starts = [int(c) - s // 2 for c, s in zip(centre, size, strict=True)]
        src, dst = [], []
        for start, s, dim in zip(starts, size, self.shape, strict=True):
            lo, hi = max(start, 0), min(start + s, dim)
            src.append(slice(lo, hi))
            dst.append(slice(lo - start, hi - start))
        image = np.zeros(size, np.float32)
        labels = np.full(size, UNLABELLED, np.uint8)
        image[tuple(dst)] = normalize(np.asarray(self.volume.image[tuple(src)]), *self.range)
        labels[tuple(dst)] = np.asarray(self.volume.labels[tuple(src)])
        return image, labels

    def focus_centre(self, rng: np.random.Generator, size: Sequence[int]) -> np.ndarray:
        """A patch centre whose patch holds the whole focus box (an answered cluster) when it
        fits, jittered by up to a quarter patch and, where it can, kept inside the item (a
        crop with context): the box's centre otherwise."""
        start, stop = self.volume.focus  # type: ignore[misc]
        centre = []
        for a, b, s, dim in zip(start, stop, size, self.shape, strict=True):
            middle = (a + b) // 2
            # the patch [c - s//2, c - s//2 + s) holds [a, b) for c in [b - s + s//2, a + s//2]
            low, high = max(b - s + s // 2, middle - s // 4), min(a + s // 2, middle + s // 4)
            inner_low, inner_high = max(low, s // 2), min(high, dim - s + s // 2)
            if inner_low <= inner_high:
                low, high = inner_low, inner_high
            centre.append(int(rng.integers(low, high + 1)) if low <= high else middle)
        return np.asarray(centre)

    def centre(self, rng: np.random.Generator, kind: str = "any") -> np.ndarray:
        """A patch centre: ``kind`` 'foreground', 'hard' (negative) or 'any' labelled voxel."""
        pools = {"foreground": self.foreground, "hard": self.hard_negatives}
        points = pools.get(kind, self.labelled)
        if not len(points):
            points = self.labelled
        return points[rng.integers(len(points))]


def _in_volume(points: np.ndarray, z0: int) -> np.ndarray:
    """Slab coordinates -> volume coordinates (the slab starts at ``z0``)."""
    points[:, 0] += z0
    return points


def _limit(points: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return points if len(points) <= n else points[rng.choice(len(points), n, replace=False)]


#: Share of training patches drawn from answered clusters (items with a ``focus``) when there
#: are also other items (reviewed patches, volumes): each kind gets its share however many
#: items it has, because a reviewed patch's thousands of labelled voxels teach what background
#: looks like everywhere, and a few dozen voxels of an answer teach what the model got wrong.
ANSWER_SHARE = 0.5


def _item_group(items: list[IndexedVolume], rng: np.random.Generator) -> list[IndexedVolume]:
    """The items a patch is drawn from: all of them, or, when answers and other items are
    mixed, the answers (with probability :data:`ANSWER_SHARE`) or the others."""
    answers = [item for item in items if item.volume.focus is not None]
    if not answers or len(answers) == len(items):
        return items
    if rng.random() < ANSWER_SHARE:
        return answers
    return [item for item in items if item.volume.focus is None]


def draw_batch(
    items: list[IndexedVolume],
    config: TrainConfig,
    epoch: int,
    step: int,
    indices: Sequence[int],
    train: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Patches ``indices`` of the step's global batch, each drawn from its own seed.

    Seeding per ``(seed, epoch, step, index)`` makes a patch independent of which process
    draws it: one process draws ``range(batch_size)``, each of N processes its contiguous
    share, and together they draw the same patches with the same augmentations.
    """
    images, labels, modalities = [], [], []
    for index in indices:
        rng = np.random.default_rng([config.seed, epoch, step, index])
        group = _item_group(items, rng)
        item = group[rng.integers(len(group))]
        draw = rng.random()
        if draw < config.foreground_fraction:
            kind = "foreground"
        elif draw < config.foreground_fraction + config.hard_negative_fraction:
            kind = "hard"
        else:
            kind = "any"
        # Many small items (reviewed patches) mostly hold no PVS: draw a foreground (or hard)
        # centre from an item that has one, so the share stays what the config says.
        pool = {"foreground": "foreground", "hard": "hard_negatives"}.get(kind)
        if pool is not None and not len(getattr(item, pool)):
            having = [other for other in group if len(getattr(other, pool))] or [
                other for other in items if len(getattr(other, pool))
            ]
            if having:
                item = having[rng.integers(len(having))]
        if item.volume.focus is not None:  # an answer: the patch holds its cluster
            centre = item.focus_centre(rng, config.patch)
        else:
            centre = item.centre(rng, kind)
            centre = centre + rng.integers(-config.patch[0] // 4, config.patch[0] // 4 + 1, 3)
        image, label = item.patch(centre, config.patch)
        if train and config.augment:
            image, label = augment(image, label, rng)
        images.append(image)
        labels.append(label)
        modalities.append(item.volume.modality)
    return np.stack(images)[:, None], np.stack(labels)[:, None], modalities


def validation_batches(items: list[IndexedVolume], config: TrainConfig):
    """The run's fixed validation patches (a third each centred on PVS, look-alikes and any
    labelled voxel), drawn from their own seed: the same every epoch and every resume."""
    rng = np.random.default_rng([config.seed, 999_999])
    batches = []
    for i in range(config.validation_patches):
        item = items[i % len(items)]
        centre = item.centre(rng, ("foreground", "hard", "any")[i % 3])
        image, label = item.patch(centre, config.patch)
        batches.append((image[None, None], label, item.volume.modality))
    return batches

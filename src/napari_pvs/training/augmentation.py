"""PVS-suited augmentation of one normalised training patch."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from napari_pvs.training.data import UNLABELLED


def augment(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """PVS-suited augmentation of one normalised patch (labels keep 0/1/255 exactly)."""
    for axis in range(3):
        if rng.random() < 0.5:
            image, labels = np.flip(image, axis), np.flip(labels, axis)
    if rng.random() < 0.3:  # small rotation: PVS orientation varies with anatomy
        axes = [(0, 1), (0, 2), (1, 2)][rng.integers(3)]
        angle = rng.uniform(-12, 12)
        image = ndimage.rotate(image, angle, axes, reshape=False, order=1, mode="nearest")
        labels = ndimage.rotate(
            labels, angle, axes, reshape=False, order=0, mode="constant", cval=UNLABELLED
        )
    if rng.random() < 0.2:  # resolution jitter: thick slices blur thin PVS
        axis = rng.integers(3)
        factor = rng.uniform(1.3, 2.2)
        zoom = [1.0, 1.0, 1.0]
        zoom[axis] = 1.0 / factor
        small = ndimage.zoom(image, zoom, order=1)
        image = ndimage.zoom(small, np.array(image.shape) / np.array(small.shape), order=1)
    image = np.ascontiguousarray(image, dtype=np.float32)
    if rng.random() < 0.3:  # smooth multiplicative bias field
        grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in image.shape], indexing="ij")
        field_ = sum(rng.normal(0, 0.15) * g for g in grids)
        field_ = field_ + sum(rng.normal(0, 0.1) * g * g for g in grids)
        image = image * np.exp(field_).astype(np.float32)
    if rng.random() < 0.3:  # gamma on the positive part
        gamma = rng.uniform(0.7, 1.5)
        image = np.sign(image) * np.abs(image) ** gamma
    if rng.random() < 0.5:  # global scale and shift
        image = image * rng.uniform(0.85, 1.15) + rng.uniform(-0.08, 0.08)
    if rng.random() < 0.3:
        image = image + rng.normal(0, rng.uniform(0.01, 0.06), image.shape)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(labels)

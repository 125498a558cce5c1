"""What training reads: labelled volumes (255 = not annotated) and their train/validation split.

Labels are uint8: 1 = PVS, 0 = not PVS, 255 = unlabelled. The loss and validation count only
labelled voxels, so a volume of which the annotator corrected a few patches trains correctly:
that is what active learning produces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_pvs.io import check_label_values
from napari_pvs.models import canonical_modality

#: Label value meaning "not annotated": ignored by the loss and by validation.
UNLABELLED = 255


@dataclass
class TrainingVolume:
    """One labelled image: a whole volume or a patch (arrays may be lazy)."""

    image: Any
    labels: Any
    modality: str = "unknown"
    name: str = ""
    intensity_range: tuple[float, float] | None = None  # robust (low, high); computed if None
    # (start, stop) of a box every training patch drawn from this item must hold, when it
    # fits a patch: an answered candidate's cluster, whose crop is labelled only there.
    focus: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None

    def __post_init__(self) -> None:
        if tuple(self.image.shape) != tuple(self.labels.shape):
            raise ValueError(
                f"image {tuple(self.image.shape)} and labels {tuple(self.labels.shape)} of "
                f"{self.name or 'a training volume'} differ in shape; they must match voxel "
                "for voxel"
            )
        if len(self.image.shape) != 3:
            raise ValueError(f"training images must be 3D, got shape {tuple(self.image.shape)}")
        self.modality = canonical_modality(self.modality)
        if self.focus is not None:
            start, stop = (tuple(int(v) for v in corner) for corner in self.focus)
            inside = len(start) == len(stop) == 3 and all(
                0 <= a < b <= s for a, b, s in zip(start, stop, self.image.shape, strict=True)
            )
            if not inside:
                raise ValueError(
                    f"focus box {start}..{stop} of {self.name or 'a training volume'} must lie "
                    f"inside its shape {tuple(self.image.shape)} with start < stop"
                )
            self.focus = (start, stop)  # type: ignore[assignment]
        # 0 background, 1 PVS, 255 unlabelled; anything else refused, no PVS at all warned about
        check_label_values(self.labels, f"labels of {self.name or 'a training volume'}")


def split_volumes(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Fixed (train, validation) indices; with one item, it serves both (stated in history)."""
    if n == 1 or fraction <= 0:
        return list(range(n)), list(range(n))
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(fraction * n)))
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())

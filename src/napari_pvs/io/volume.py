"""The :class:`Volume`: a lazy 3D array with its spacing, affine, pyramid and display views."""

from __future__ import annotations

from dataclasses import dataclass, field

import dask.array as da
import numpy as np

from napari_pvs.display import DisplayLevel


@dataclass
class Volume:
    """A lazy 3D volume with its geometry.

    ``data`` is ``levels[0]``; ``levels`` holds the multiscale pyramid finest first (one entry
    for single-resolution files). ``spacing`` is mm per array axis of ``data``; ``affine`` maps
    voxel indices (in array order) to world mm. ``label_names`` lists OME-Zarr label images
    stored with the volume (open them with :func:`open_labels`). ``display`` holds the same
    levels as :class:`~napari_pvs.display.DisplayLevel` views when they are plain store reads
    (zarr, OME-Zarr, an unscaled ``.nii``): what napari is given (see :meth:`display_levels`).
    """

    data: da.Array
    spacing: tuple[float, float, float]
    affine: np.ndarray
    modality: str = "unknown"
    source: str | None = None
    axes: tuple[str, str, str] = ("z", "y", "x")
    levels: list[da.Array] = field(default_factory=list)
    label_names: tuple[str, ...] = ()
    display: list[DisplayLevel] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.levels:
            self.levels = [self.data]
        if self.display and len(self.display) != len(self.levels):
            raise ValueError(f"{len(self.display)} display levels for {len(self.levels)} levels")

    def display_levels(self) -> list:
        """The levels as napari should read them: direct store views when there are, else dask."""
        return list(self.display) if self.display else list(self.levels)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)

    @property
    def level_spacings(self) -> list[tuple[float, float, float]]:
        """Spacing (mm) of every pyramid level, derived from the shape ratio to level 0."""
        out = []
        for level in self.levels:
            ratio = [s0 / max(s, 1) for s0, s in zip(self.data.shape, level.shape, strict=True)]
            out.append(tuple(float(sp * r) for sp, r in zip(self.spacing, ratio, strict=True)))
        return out


def describe(volume: Volume) -> dict:
    """A JSON-able summary (shape, spacing, modality, levels, dtype) for the CLI and widgets."""
    return {
        "source": volume.source,
        "shape": list(volume.shape),
        "dtype": str(volume.data.dtype),
        "spacing_mm": [round(s, 6) for s in volume.spacing],
        "axes": list(volume.axes),
        "modality": volume.modality,
        "levels": [list(map(int, level.shape)) for level in volume.levels],
        "labels": list(volume.label_names),
    }

"""The input side of a run: what the predictor needs from a volume, and its windows read from it.

Windows are read from the lazy array (numpy, zarr or dask), normalised with
:mod:`napari_pvs.intensity` (range estimated once per volume) and zero-padded where they reach
past the volume, on a reader thread while the network runs the previous batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_pvs.inference.planning import Window, WindowPlan
from napari_pvs.intensity import normalize


@dataclass
class VolumeSource:
    """What the inferer needs from a volume: the lazy array and its geometry."""

    data: Any
    spacing: tuple[float, float, float]
    affine: np.ndarray
    modality: str
    axes: tuple[str, str, str]
    source: str | None


def as_source(volume) -> VolumeSource:
    """The volume's array and geometry: an :class:`napari_pvs.io.Volume` or a bare 3D array
    (then spacing 1 mm, its diagonal affine, modality ``unknown``, axes z-y-x)."""
    # numpy arrays have a .data buffer too, so only unwrap Volume-like objects
    data = volume if getattr(volume, "ndim", None) is not None else getattr(volume, "data", None)
    if getattr(data, "ndim", None) != 3:
        raise ValueError(
            f"expected a 3D volume, got shape {tuple(getattr(data, 'shape', ()))}; "
            "open files with napari_pvs.io.open_volume or pass a 3D array"
        )
    spacing = tuple(float(s) for s in getattr(volume, "spacing", (1.0, 1.0, 1.0)))
    affine = np.asarray(getattr(volume, "affine", np.diag([*spacing, 1.0])), dtype=np.float64)
    return VolumeSource(
        data=data,
        spacing=spacing,  # type: ignore[arg-type]
        affine=affine,
        modality=str(getattr(volume, "modality", "unknown") or "unknown"),
        axes=tuple(getattr(volume, "axes", ("z", "y", "x"))),  # type: ignore[arg-type]
        source=getattr(volume, "source", None),
    )


def _read_box(data, slices: tuple[slice, ...]) -> np.ndarray:
    """Read a box of a numpy/zarr/dask array (dask computed synchronously: no thread storm)."""
    block = data[slices]
    if hasattr(block, "compute"):
        block = block.compute(scheduler="synchronous")
    return np.asarray(block)


def read_windows(
    data,
    plan: WindowPlan,
    windows: list[Window],
    intensity: tuple[float, float],
) -> np.ndarray:
    """Normalised, zero-padded input windows ``(B, 1, *window)`` for one batch."""
    boxes = [plan.window_box(idx) for idx in windows]
    clipped = [
        [(max(s, 0), min(e, size)) for s, e, size in zip(*box, plan.shape, strict=True)]
        for box in boxes
    ]
    lo = [min(c[a][0] for c in clipped) for a in range(3)]
    hi = [max(c[a][1] for c in clipped) for a in range(3)]
    union = math.prod(h - low for low, h in zip(lo, hi, strict=True))
    single = sum(math.prod(e - s for s, e in c) for c in clipped)
    shared = (
        _read_box(data, tuple(slice(a, b) for a, b in zip(lo, hi, strict=True)))
        if union <= 2 * single
        else None
    )
    out = np.zeros((len(windows), 1, *plan.window), dtype=np.float32)
    for k, ((starts, _), box) in enumerate(zip(boxes, clipped, strict=True)):
        if shared is not None:
            sl = tuple(slice(a - o, b - o) for (a, b), o in zip(box, lo, strict=True))
            block = shared[sl]
        else:
            block = _read_box(data, tuple(slice(a, b) for a, b in box))
        dst = tuple(slice(a - s, b - s) for (a, b), s in zip(box, starts, strict=True))
        out[(k, 0, *dst)] = normalize(block, *intensity)
    return out

"""The input side of a run: what the predictor needs from a volume, and its windows read from it.

Windows are read from the lazy array (numpy, zarr or dask) through a cache of its decoded
chunks (:class:`ChunkCache`), normalised with
:mod:`napari_pvs.intensity` (range estimated once per volume) and zero-padded where they reach
past the volume, on a reader thread while the network runs the previous batch.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
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


def _read_box(data, slices: tuple[slice, ...] | tuple[int, ...]) -> np.ndarray:
    """Read a box of a numpy/zarr/dask array (or one stored block: ``slices`` an index into
    its ``.blocks``, for dask half the overhead of slicing, measured per 64^3 chunk):
    dask computed synchronously (no thread storm)
    and without dask's global callbacks. napari registers its chunk cache as one; dask hands
    the global callbacks from thread to thread without a lock, so a read here while napari
    sliced the same chunks on the GUI thread ran the cache's callbacks twice for one chunk
    (a KeyError in napari's slicing, seen in the whole-loop test)."""
    block = data[slices]
    if hasattr(block, "compute"):
        block = block.compute(scheduler="synchronous", callbacks=[])
    return np.asarray(block)


#: Decoded source chunks the reader keeps between windows. Neighbouring 64^3 windows at
#: overlap 0.25 share most of the 8 stored chunks each one touches, and decoding them again
#: for every window made the reader thread take as much CPU as a third of the network's, on
#: the same 2 cores (256^3, 64^3 zstd chunks: 1,000 chunk decodes for 125 windows). The
#: budget keeps memory flat with volume size. In tile order (64^3 float32 chunks) 32 MB
#: decoded as few chunks as 48 MB did (256^3: 64, each once; 512^3: 1,088 of 512) and 24 MB
#: 1.6x as many; 32 MB held 14 MB less at the peak than 48 MB.
INPUT_CACHE_BYTES = 32 * 2**20


def chunk_bounds(data) -> list[np.ndarray] | None:
    """Each axis's stored-chunk boundaries (dask or zarr chunking), or None for an array that
    is not chunked (numpy: nothing to decode twice)."""
    chunks = getattr(data, "chunks", None)
    if chunks is None or len(chunks) != 3:
        return None
    bounds = []
    for size, axis in zip(data.shape, chunks, strict=True):
        if isinstance(axis, tuple | list):  # dask: the sizes of each block
            edges = np.concatenate([[0], np.cumsum(axis)])
        else:  # zarr: one regular chunk size
            edges = np.append(np.arange(0, int(size), int(axis)), int(size))
        bounds.append(edges.astype(np.int64))
    return bounds


class ChunkCache:
    """Boxes of a chunked array read through its decoded chunks, kept least recently used
    first out within :data:`INPUT_CACHE_BYTES`. A chunk larger than a quarter of the budget
    (a volume stored as one chunk) is not kept: those boxes are read directly, as without a
    cache. Used from one thread (the engine's reader)."""

    def __init__(self, data, budget_bytes: int = INPUT_CACHE_BYTES) -> None:
        self.data = data
        self.budget = int(budget_bytes)
        self.bounds = chunk_bounds(data)
        self._blocks: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        if self.bounds is not None:
            largest = math.prod(int(np.diff(edges).max()) for edges in self.bounds)
            if largest * np.dtype(data.dtype).itemsize * 4 > self.budget:
                self.bounds = None

    def read(self, box: list[tuple[int, int]]) -> np.ndarray:
        """The array's values in ``box`` (``(start, stop)`` per axis, inside the array)."""
        if self.bounds is None:
            return _read_box(self.data, tuple(slice(a, b) for a, b in box))
        out = np.empty([b - a for a, b in box], dtype=self.data.dtype)
        ranges = [  # the chunks each axis's [a, b) touches
            range(int(np.searchsorted(edges, a, "right")) - 1, int(np.searchsorted(edges, b)))
            for edges, (a, b) in zip(self.bounds, box, strict=True)
        ]
        for index in itertools.product(*ranges):
            block = self._block(index)
            starts = [int(edges[i]) for edges, i in zip(self.bounds, index, strict=True)]
            src, dst = [], []
            for (a, b), start, extent in zip(box, starts, block.shape, strict=True):
                lo, hi = max(a, start), min(b, start + extent)
                src.append(slice(lo - start, hi - start))
                dst.append(slice(lo - a, hi - a))
            out[tuple(dst)] = block[tuple(src)]
        return out

    def _block(self, index: tuple[int, int, int]) -> np.ndarray:
        block = self._blocks.get(index)
        if block is not None:
            self._blocks.move_to_end(index)
            return block
        if hasattr(self.data, "blocks"):  # dask or zarr: the stored block by its index
            block = _read_box(self.data.blocks, index)
        else:
            slices = tuple(
                slice(int(edges[i]), int(edges[i + 1]))
                for edges, i in zip(self.bounds, index, strict=True)
            )
            block = _read_box(self.data, slices)
        self._blocks[index] = block
        self._bytes += block.nbytes
        while self._bytes > self.budget and len(self._blocks) > 1:
            _, dropped = self._blocks.popitem(last=False)
            self._bytes -= dropped.nbytes
        return block


def read_windows(
    data: ChunkCache,
    plan: WindowPlan,
    windows: list[Window],
    intensity: tuple[float, float],
) -> np.ndarray:
    """Normalised, zero-padded input windows ``(B, 1, *window)`` for one batch, read through
    the run's :class:`ChunkCache` (each stored chunk decoded once while it stays in use)."""
    out = np.zeros((len(windows), 1, *plan.window), dtype=np.float32)
    for k, idx in enumerate(windows):
        starts, stops = plan.window_box(idx)
        box = [
            (max(s, 0), min(e, size)) for s, e, size in zip(starts, stops, plan.shape, strict=True)
        ]
        block = data.read(box)
        dst = tuple(slice(a - s, b - s) for (a, b), s in zip(box, starts, strict=True))
        out[(k, 0, *dst)] = normalize(block, *intensity)
    return out

"""NaN/inf in float volumes: a bounded sample at open time, every chunk again when computed."""

from __future__ import annotations

import math

import dask.array as da
import numpy as np

from napari_pvs.intensity import strided_sample

#: Voxels read at open time to look for NaN/inf in float volumes (from the coarsest level).
FINITE_SAMPLE_VOXELS = 262_144
#: Above this many chunks, the open-time sample reads a few chunks instead of a strided sample
#: (which touches every chunk, and whose dask graph grows with the declared size).
FINITE_SAMPLE_CHUNKS = 64
#: Chunks read (each at most :data:`FINITE_SAMPLE_EDGE`^3 voxels) when there are more.
SAMPLED_CHUNKS = 8
FINITE_SAMPLE_EDGE = 64


def bounded_sample(array: da.Array, reader=None) -> np.ndarray:
    """A sample of ``array`` whose cost does not grow with its declared size.

    Few chunks: a strided sample of the whole array. Many: the first corner of
    :data:`SAMPLED_CHUNKS` chunks spread along the diagonal, read through ``reader`` (an
    array-like over the same voxels that reads the store directly, e.g. a display view) when
    given, so no dask graph over every chunk is ever built.
    """
    if math.prod(array.numblocks) <= FINITE_SAMPLE_CHUNKS:
        return strided_sample(array, FINITE_SAMPLE_VOXELS)
    source = array if reader is None else reader
    offsets = [np.concatenate([[0], np.cumsum(c)]) for c in array.chunks]
    parts = []
    for k in range(SAMPLED_CHUNKS):
        box = []
        for axis, chunks in enumerate(array.chunks):
            index = round(k * (len(chunks) - 1) / (SAMPLED_CHUNKS - 1))
            start = int(offsets[axis][index])
            box.append(slice(start, start + min(int(chunks[index]), FINITE_SAMPLE_EDGE)))
        block = source[tuple(box)]
        if hasattr(block, "compute"):
            block = block.compute(scheduler="synchronous")
        parts.append(np.asarray(block).ravel())
    return np.concatenate(parts)


def check_finite_sample(array: da.Array, what: str, reader=None) -> None:
    """Raise if a bounded sample of a float array holds NaN/inf (see :func:`bounded_sample`;
    never reads the whole array)."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    sample = bounded_sample(array, reader)
    if not np.all(np.isfinite(sample)):
        raise ValueError(
            f"{what} contains NaN or infinite voxels; replace them (for example with "
            "numpy.nan_to_num) and save the volume again"
        )


def _raise_if_nonfinite(block: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(block)):
        raise ValueError(
            "the volume contains NaN or infinite voxels in a chunk being read; replace them "
            "(for example with numpy.nan_to_num) and save the volume again"
        )
    return block


def finite_guard(array: da.Array) -> da.Array:
    """Wrap a float dask array so each chunk is checked for NaN/inf when it is computed.

    This is the lazy half of the NaN/inf check: the open-time check only samples, so a NaN
    missed by the sample raises a clear ``ValueError`` when its chunk is consumed.
    """
    if not np.issubdtype(array.dtype, np.floating):
        return array
    return array.map_blocks(_raise_if_nonfinite, dtype=array.dtype)

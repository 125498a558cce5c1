"""NaN/inf in float volumes: a strided sample at open time, every chunk again when computed."""

from __future__ import annotations

import dask.array as da
import numpy as np

from napari_pvs.intensity import strided_sample

#: Voxels read at open time to look for NaN/inf in float volumes (from the coarsest level).
FINITE_SAMPLE_VOXELS = 262_144


def check_finite_sample(array: da.Array, what: str) -> None:
    """Raise if a strided sample of a float array holds NaN/inf (never reads the whole array)."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    sample = strided_sample(array, FINITE_SAMPLE_VOXELS)
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

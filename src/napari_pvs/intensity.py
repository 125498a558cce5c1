"""Robust intensity range and normalisation, shared by the reader, training and inference.

MRI intensities have no fixed scale, so models see intensities mapped by robust percentiles of
the brain (non-zero) voxels. The percentiles are estimated from a strided sample of the array,
never from the whole array, so this works on lazy volumes of any size.
"""

from __future__ import annotations

import math

import numpy as np

#: Default lower/upper percentiles of the non-zero voxels that map to 0 and 1.
DEFAULT_PERCENTILES = (0.5, 99.5)
#: In magnitude images, voxels under this fraction of the robust maximum are (noisy) air.
AIR_LEVEL = 0.1
#: Voxels of the strided sample a volume's robust intensity range is taken from.
RANGE_SAMPLE_VOXELS = 2_000_000


def strided_sample(array, max_voxels: int = RANGE_SAMPLE_VOXELS) -> np.ndarray:
    """Return a regular strided subsample of ``array`` with at most about ``max_voxels`` voxels.

    Works for numpy and dask arrays (and zarr arrays); for dask only the sampled voxels are read.
    """
    return strided_samples(array, max_voxels)[0]


def strided_samples(array, *max_voxels: int) -> list[np.ndarray]:
    """:func:`strided_sample` of ``array`` at each of ``max_voxels``, read in one pass: a
    lazy array's chunks are decoded once for all of them (at 256^3 two samples took 0.11 s
    together against 0.10 s each)."""
    n = int(np.prod(array.shape))
    samples = []
    for limit in max_voxels:
        step = max(1, math.ceil((n / limit) ** (1.0 / array.ndim)))
        samples.append(array[tuple(slice(None, None, step) for _ in range(array.ndim))])
    lazy = [i for i, sample in enumerate(samples) if hasattr(sample, "compute")]
    if lazy:
        import dask

        for i, value in zip(lazy, dask.compute(*(samples[i] for i in lazy)), strict=True):
            samples[i] = value
    return [np.asarray(sample) for sample in samples]


def robust_range(
    array,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    max_voxels: int = RANGE_SAMPLE_VOXELS,
) -> tuple[float, float]:
    """Robust (low, high) intensity of the non-zero voxels, from a strided sample.

    Falls back to all sampled voxels when fewer than 1% are non-zero. Raises ``ValueError``
    with a clear message for arrays with NaN/inf or no finite spread.
    """
    return sample_range(strided_sample(array, max_voxels), percentiles)


def sample_range(
    sample: np.ndarray, percentiles: tuple[float, float] = DEFAULT_PERCENTILES
) -> tuple[float, float]:
    """:func:`robust_range` of a sample already drawn (:func:`strided_sample`)."""
    sample = np.asarray(sample).astype(np.float64, copy=False)
    if not np.all(np.isfinite(sample)):
        raise ValueError(
            "the volume contains NaN or infinite voxels; replace them (for example with 0) "
            "before segmenting, e.g. numpy.nan_to_num(volume)"
        )
    nonzero = sample[sample != 0]
    values = nonzero if nonzero.size >= 0.01 * sample.size and nonzero.size > 0 else sample.ravel()
    lo, hi = np.percentile(values, percentiles)
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def normalize(block: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map intensities so that ``low`` -> 0 and ``high`` -> 1 (float32, not clipped above)."""
    out = (np.asarray(block, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return out


def tissue_mask(block: np.ndarray, low: float, high: float) -> np.ndarray:
    """Voxels of ``block`` that are tissue rather than air, given the volume's robust range.

    Zero voxels are background (skull-stripped or padded); in magnitude images (``low >= 0``)
    so is anything under :data:`AIR_LEVEL` of ``high``: air carries Rician noise, not zeros.
    Signed images (z-scored) have no air level. Used to keep training patches and the
    annotation queue on the head, not in the air around it.
    """
    block = np.asarray(block)
    mask = block != 0
    if low >= 0:
        mask &= block > AIR_LEVEL * high
    return mask

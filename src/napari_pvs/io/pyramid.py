"""Multiscale pyramids: level shapes, downsampling, and writing levels chunk by chunk.

Writers stream from dask a few chunks at a time, so memory does not grow with the volume.
"""

from __future__ import annotations

from collections.abc import Sequence

import dask.array as da
import numpy as np
import zarr

from napari_pvs.progress import CancelToken, ProgressCallback, check_cancelled

#: Roughly how many bytes a writer keeps in flight per batch of chunks (bounds its memory).
WRITE_BATCH_BYTES = 64 << 20


def _downsample_factors(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(2 if s >= 2 else 1 for s in shape)


def pyramid_shapes(shape: Sequence[int], levels: int) -> list[tuple[int, ...]]:
    """Shapes of a pyramid that halves every axis longer than 1 per level (floor)."""
    shapes = [tuple(int(s) for s in shape)]
    for _ in range(levels - 1):
        prev = shapes[-1]
        if all(s < 2 for s in prev):
            break
        shapes.append(tuple(s // f for s, f in zip(prev, _downsample_factors(prev), strict=True)))
    return shapes


def downsample(level: da.Array, chunks: tuple[int, ...], how: str) -> da.Array:
    """Halve every axis longer than 1 (floor), chunked ``chunks``.

    ``how``: ``"mean"`` block mean (images; integers rounded back), ``"stride"`` every other
    voxel (label images: values stay valid labels), ``"max"`` block maximum (display levels of
    sparse bright structures: a PVS one voxel wide survives every halving).
    """
    if how not in ("mean", "stride", "max"):
        raise ValueError(f"how must be 'mean', 'stride' or 'max', got {how!r}")
    factors = _downsample_factors(level.shape)
    even = tuple(slice(0, (s // f) * f) for s, f in zip(level.shape, factors, strict=True))
    level = level[even]
    if how == "stride":
        out = level[tuple(slice(None, None, f) for f in factors)]
    else:
        level = level.rechunk(
            tuple(min(c * f, s) for c, f, s in zip(chunks, factors, level.shape, strict=True))
        )
        if how == "max":
            out = da.coarsen(np.max, level, dict(enumerate(factors)))
        else:
            mean = da.coarsen(np.mean, level.astype(np.float32), dict(enumerate(factors)))
            if np.issubdtype(level.dtype, np.integer):
                info = np.iinfo(level.dtype)
                mean = da.clip(da.round(mean), info.min, info.max)
            out = mean.astype(level.dtype)
    return out.rechunk(tuple(min(c, s) for c, s in zip(chunks, out.shape, strict=True)))


def store_chunked(
    source: da.Array,
    target: zarr.Array,
    progress: ProgressCallback,
    cancel: CancelToken | None,
    done: list[int],
    total: int,
    message: str,
    batch: int = 8,
) -> None:
    """Write ``source`` into ``target`` a few chunks at a time, reporting progress.

    Each batch computes at most ``batch`` chunks (in parallel), so memory is bounded by the
    chunk size, not the volume. ``done`` is a one-element counter shared across calls.
    """
    source = source.rechunk(target.chunks)
    slices = list(da.core.slices_from_chunks(source.chunks))
    for start in range(0, len(slices), batch):
        check_cancelled(cancel)
        regions = slices[start : start + batch]
        da.store([source[r] for r in regions], [target] * len(regions), regions=regions, lock=False)
        done[0] += len(regions)
        progress(done[0], total, message)


def write_multiscale(
    group: zarr.Group,
    array: da.Array,
    chunks: tuple[int, ...],
    n_levels: int,
    is_label: bool,
    progress: ProgressCallback,
    cancel: CancelToken | None,
    counter: list[int],
    total: int,
    message: str,
) -> list[tuple[int, ...]]:
    """Write a pyramid into ``group/0, 1, ...``, each level computed from the stored one above."""
    shapes = pyramid_shapes(array.shape, n_levels)
    level = array
    for i, shape in enumerate(shapes):
        if i > 0:
            above = da.from_zarr(group[str(i - 1)])
            level = downsample(above, chunks, "stride" if is_label else "mean")
        assert tuple(level.shape) == shape
        target = group.create_array(
            str(i),
            shape=shape,
            chunks=tuple(min(c, s) for c, s in zip(chunks, shape, strict=True)),
            dtype=level.dtype,
            fill_value=0,
            overwrite=True,
            # OME-Zarr 0.4 requires "/" chunk keys in zarr v2 (0.5 uses the v3 default, "/")
            chunk_key_encoding={"name": "v2", "separator": "/"}
            if group.metadata.zarr_format == 2
            else {"name": "default", "separator": "/"},
        )
        # bytes in flight per output chunk: the chunk itself, or for a downsampled level the
        # 2x2x2 input chunks plus their float32 copy (about 3 x 8 chunk sizes)
        in_flight = int(np.prod(target.chunks)) * level.dtype.itemsize * (1 if i == 0 else 24)
        batch = int(min(32, max(2, WRITE_BATCH_BYTES // in_flight)))
        store_chunked(
            level, target, progress, cancel, counter, total, f"{message} level {i}", batch
        )
    return shapes

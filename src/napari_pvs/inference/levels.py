"""Display levels of a large prediction: max-pooled halvings the viewer draws it from.

Written into the store after the prediction (and the small-cluster pass), before the store is
marked complete; read back by :func:`napari_pvs.io.prediction_levels`. They are for display
only: every figure reads level 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import dask.array as da
import zarr

from napari_pvs.io import PREDICTION_LEVELS, downsample, pyramid_shapes, store_chunked
from napari_pvs.progress import CancelToken, no_progress

#: Predictions larger than this edge (voxels) also get coarser display levels, halving until
#: the largest edge is at most half of it: a 1024^3 probability is drawn from its 512^3 or
#: 256^3 level at the zoom that needs no more, and napari, which reads a plane of the coarsest
#: level for the layer's thumbnail at every slice (and draws 3D from it), reads 256^2 there.
#: Smaller ones are shown (and stay editable) at full resolution alone.
DISPLAY_EDGE = 512


def check_display_edge(display_edge: int | None) -> int:
    """The display edge a predictor uses: ``display_edge``, or :data:`DISPLAY_EDGE` (read at
    each call) when it is None; at least 16 voxels."""
    display_edge = DISPLAY_EDGE if display_edge is None else display_edge
    if display_edge < 16:
        raise ValueError(f"display_edge must be at least 16 voxels, got {display_edge}")
    return int(display_edge)


def display_level_shapes(shape: Sequence[int], display_edge: int = DISPLAY_EDGE) -> list:
    """Shapes of the display levels below full resolution: none for a volume within
    ``display_edge``, else halvings until the largest edge is at most ``display_edge // 2``."""
    shapes = [tuple(int(s) for s in shape)]
    if max(shapes[0]) <= display_edge:
        return []
    while max(shapes[-1]) > display_edge // 2:
        nxt = pyramid_shapes(shapes[-1], 2)
        if len(nxt) < 2:
            break
        shapes.append(nxt[1])
    return shapes[1:]


def write_display_levels(
    group: zarr.Group,
    names: Sequence[str],
    display_edge: int = DISPLAY_EDGE,
    cancel: CancelToken | None = None,
) -> int:
    """Write max-pooled display levels ``levels/<name>/1, 2, ...`` of a prediction store.

    Each level is computed chunk by chunk from the stored level above (memory bounded by a
    few chunks); a level group is marked complete only once all its levels are written, and
    readers (:func:`napari_pvs.io.prediction_levels`) ignore an incomplete one, so a cancel or
    a kill leaves the store displayable at full resolution and a rerun writes the levels
    again. Returns the number of levels per array.
    """
    shapes = display_level_shapes(group[names[0]].shape, display_edge)
    if not shapes:
        return 0
    pyramid = group.require_group(PREDICTION_LEVELS)
    for name in names:
        source = group[name]
        if name in pyramid:
            del pyramid[name]  # an earlier, interrupted or older set: rewritten whole
        stored = pyramid.create_group(name, attributes={"complete": False})
        chunks = tuple(int(c) for c in source.chunks)
        above = da.from_zarr(source)
        for k, shape in enumerate(shapes, start=1):
            level = downsample(above, chunks, "max")
            assert tuple(level.shape) == shape, (level.shape, shape)
            target = stored.create_array(
                str(k),
                shape=shape,
                chunks=tuple(min(c, s) for c, s in zip(chunks, shape, strict=True)),
                dtype=source.dtype,
                fill_value=0,
            )
            store_chunked(level, target, no_progress, cancel, [0], 0, f"{name} level {k}")
            above = da.from_zarr(target)
        stored.attrs["complete"] = True
    return len(shapes)

"""Stores written by ``napari-pvs predict``: probability, segmentation, display levels."""

from __future__ import annotations

from pathlib import Path

import zarr

from napari_pvs.io.damage import guarded_display, guarded_from_zarr


def is_prediction_group(node) -> bool:
    """Whether a zarr node is a ``napari-pvs predict`` store (probability + segmentation)."""
    return isinstance(node, zarr.Group) and {"probability", "segmentation"} <= {
        name for name, _ in node.arrays()
    }


def open_prediction(path: str | Path) -> zarr.Group:
    """Open a ``napari-pvs predict`` store read-only, with a clear error when it is not one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no prediction store at {path}; run 'napari-pvs predict' first")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:
        raise ValueError(f"{path} is not a zarr group of predictions ({exc})") from exc
    if "probability" not in group:
        raise ValueError(
            f"{path} holds no 'probability' array; point to the output of 'napari-pvs predict'"
        )
    return group


PREDICTION_LEVELS = "levels"
"""Group of a prediction store holding coarser display levels: ``levels/<array>/<k>``, level
``k`` halving level ``k - 1`` (level 0 is the array itself)."""


def prediction_levels(
    group: zarr.Group, name: str, store: str | Path, display: bool = False
) -> list:
    """One prediction array as a display pyramid, finest first: ``[name]`` plus the coarser
    levels the store holds (a store without them, or a small one, gives one level).

    Coarser levels exist for display only: they are max-pooled, so a PVS one voxel wide stays
    visible at every zoom, and the full-resolution array stays the one every figure uses.
    ``store`` is the store's path, named when a chunk turns out damaged. ``display``: the
    levels as :class:`~napari_pvs.display.DisplayLevel` views (what napari should be given)
    instead of dask arrays.
    """
    read = guarded_display if display else guarded_from_zarr
    levels = [read(group[name], store)]
    pyramid = group.get(PREDICTION_LEVELS)
    stored = pyramid.get(name) if isinstance(pyramid, zarr.Group) else None
    if not isinstance(stored, zarr.Group) or not stored.attrs.get("complete"):
        return levels  # none, or being (re)written: the full array alone is always right
    k = 1
    while isinstance(stored.get(str(k)), zarr.Array):
        levels.append(read(stored[str(k)], store))
        k += 1
    return levels


def is_prediction_store(path: str | Path) -> bool:
    """Whether ``path`` is a ``napari-pvs predict`` output store (without reading any data)."""
    path = Path(path)
    if not path.is_dir():
        return False
    try:
        return is_prediction_group(zarr.open(str(path), mode="r"))
    except Exception:  # not a zarr store at all: the caller's own opener reports why
        return False

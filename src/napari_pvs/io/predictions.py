"""Stores written by ``napari-pvs predict``: probability, segmentation, display levels."""

from __future__ import annotations

from pathlib import Path

import zarr

from napari_pvs.io.damage import guarded_display, guarded_from_zarr
from napari_pvs.io.metadata import ATTRS_KEY

#: Key, in a store's napari-pvs attributes, of its segmentation's PVS count, recorded when the
#: store is completed (see :func:`pvs_count_record`).
PVS_COUNT = "pvs"


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


def pvs_count_record(voxels: int, clusters: int | None) -> dict:
    """The attribute a completed store keeps of its segmentation's PVS count (from
    :func:`napari_pvs.metrics.count_pvs`), so that showing it reads no voxel: at 1024^3 the
    count read the whole segmentation (1 GB) beside a scrolling viewer."""
    return {"voxels": int(voxels), "clusters": None if clusters is None else int(clusters)}


def recorded_pvs_count(group: zarr.Group) -> tuple[int, int | None] | None:
    """The segmented voxels and clusters a complete store recorded; None when it recorded
    none (an incomplete store, or one written before the count was recorded)."""
    attrs = dict(group.attrs).get(ATTRS_KEY, {})
    record = attrs.get(PVS_COUNT) if attrs.get("complete") else None
    if not isinstance(record, dict) or not isinstance(record.get("voxels"), int):
        return None
    clusters = record.get("clusters")
    return record["voxels"], clusters if isinstance(clusters, int) else None


def is_prediction_store(path: str | Path) -> bool:
    """Whether ``path`` is a ``napari-pvs predict`` output store (without reading any data)."""
    path = Path(path)
    if not path.is_dir():
        return False
    try:
        return is_prediction_group(zarr.open(str(path), mode="r"))
    except Exception:  # not a zarr store at all: the caller's own opener reports why
        return False

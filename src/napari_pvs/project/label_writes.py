"""Durable writes into a volume's label store: the one way accepts and answers change labels.

A write replaces ``labels`` and ``reviewed`` over a box and then fsyncs every chunk file and
folder it touched, so the bytes are on disk before the ledger commit that acknowledges them.
Chunk files are replaced by rename (zarr), so a torn write never damages neighbouring labels.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from napari_pvs import atomic


def box_slices(start: Sequence[int], stop: Sequence[int]) -> tuple[slice, slice, slice]:
    """The index of the box ``[start, stop)``."""
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))  # type: ignore[return-value]


def read_label_box(store: Path, start, stop) -> tuple[np.ndarray, np.ndarray]:
    """The store's ``labels`` (uint8) and ``reviewed`` (bool) over the box."""
    import zarr

    group = zarr.open_group(str(store), mode="r")
    box = box_slices(start, stop)
    return np.asarray(group["labels"][box]), np.asarray(group["reviewed"][box])


def write_label_box(store: Path, start, stop, labels: np.ndarray, reviewed: np.ndarray) -> None:
    """Write ``labels`` and ``reviewed`` over the box, then fsync every chunk and folder."""
    import zarr

    group = zarr.open_group(str(store), mode="r+")
    box = box_slices(start, stop)
    group["labels"][box] = labels
    group["reviewed"][box] = reviewed
    for name in ("labels", "reviewed"):
        array = group[name]
        chunks = array.chunks
        ranges = [
            range(int(a) // c, (int(b) - 1) // c + 1)
            for a, b, c in zip(start, stop, chunks, strict=True)
        ]
        folders = set()
        for index in itertools.product(*ranges):
            key = store / name / array.metadata.encode_chunk_key(index)
            if key.exists():
                atomic.fsync_path(key)
            folder = key.parent
            while folder != store:
                folders.add(folder)
                folder = folder.parent
        for folder in sorted(folders, key=lambda p: -len(p.parts)):
            atomic.fsync_folder(folder)

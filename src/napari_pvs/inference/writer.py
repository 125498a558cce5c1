"""Writing completed chunks into the prediction store, and marking them done once durable.

The writer runs on its own thread, one chunk after another, so compression and storage overlap
the network. Each gathered chunk is normalised by its blending weights and written to every
output array (probability, the thresholded segmentation and, with several samples, the
uncertainty measures of :mod:`napari_pvs.uncertainty`). Written chunks are flushed to the disk
and marked done in ``_chunks_done`` in groups, never before their bytes are durable.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

from napari_pvs import atomic
from napari_pvs.inference.blending import Frontier
from napari_pvs.inference.planning import Chunk
from napari_pvs.inference.store import DONE_ARRAY
from napari_pvs.uncertainty import UNCERTAINTY_NAMES, uncertainty_from_moments

#: Written chunks are flushed to the disk and marked done in groups of this many (and at the
#: end, or when a run stops): one sync per group instead of one fsync per chunk file.
SYNC_EVERY_CHUNKS = 8


class ChunkWriter:
    """Writes a run's completed chunks into ``group`` (stored at ``root``) and marks them done."""

    def __init__(
        self,
        group: zarr.Group,
        root: Path,
        arrays: Sequence[str],
        threshold: float,
        frontier: Frontier,
    ) -> None:
        self.group = group
        self.root = root
        self.arrays = tuple(arrays)
        self.threshold = threshold
        self.frontier = frontier
        self._unsynced: list[Chunk] = []

    def write(self, chunk: Chunk, acc: np.ndarray) -> None:
        """Normalise a gathered chunk and write every output array; mark chunks done in groups.

        Runs on the writer thread, one chunk after another, so a chunk is marked done only
        once all its arrays are stored, and compression and storage overlap the network.
        """
        group = self.group
        slices = self.frontier.plan.chunk_slices(chunk)
        values = acc / self.frontier.chunk_weight(chunk, slices)
        probability = values[0]
        group["probability"][slices] = probability.astype(np.float16)
        group["segmentation"][slices] = (probability >= self.threshold).astype(np.uint8)
        if len(values) > 1:
            measures = uncertainty_from_moments(values[0], values[1], values[2])
            for name in UNCERTAINTY_NAMES:
                group[name][slices] = measures[name].astype(np.float16)
        self._unsynced.append(chunk)
        if len(self._unsynced) >= SYNC_EVERY_CHUNKS:
            self.mark_done()

    def mark_done(self) -> None:
        """Flush the written chunks to the disk, then mark them done: a chunk is never marked
        done before its bytes are durable (one ``syncfs`` per group of chunks where the system
        has it, else an fsync per chunk file)."""
        if not self._unsynced:
            return
        chunks, self._unsynced = self._unsynced, []
        atomic.sync_files([path for chunk in chunks for path in self.chunk_files(chunk)], self.root)
        for chunk in chunks:
            self.group[DONE_ARRAY][tuple(slice(c, c + 1) for c in chunk)] = np.ones(
                (1, 1, 1), np.uint8
            )

    def chunk_files(self, chunk: Chunk) -> list[Path]:
        """The files of one chunk of every output array (zarr v3 default keys ``c/i/j/k``)."""
        key = Path("c", *(str(c) for c in chunk))
        return [self.root / name / key for name in self.arrays]

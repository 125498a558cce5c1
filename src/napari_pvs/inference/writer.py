"""Writing completed chunks into the prediction store, and marking them done once durable.

The writer runs on its own thread, one chunk after another, so compression and storage overlap
the network. Each gathered chunk is normalised by its blending weights and written to every
output array (probability, the thresholded segmentation and, with several samples, the
uncertainty measures of :mod:`napari_pvs.uncertainty`). Written chunks are flushed to the disk
and marked done in ``_chunks_done`` in groups, never before their bytes are durable. Chunks
are written as their files directly (:mod:`.chunkfiles`) where the store is laid out as ours
are, else through zarr.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr
from zarr.core.sync import sync

from napari_pvs import atomic
from napari_pvs.inference.blending import Frontier
from napari_pvs.inference.chunkfiles import ChunkFiles
from napari_pvs.inference.planning import Chunk
from napari_pvs.inference.store import DONE_ARRAY
from napari_pvs.uncertainty import UNCERTAINTY_NAMES, uncertainty_from_moments

#: Written chunks are flushed to the disk and marked done in groups of this many (and at the
#: end, or when a run stops): one sync per group instead of one fsync per chunk file.
SYNC_EVERY_CHUNKS = 8


def _store_all(writes) -> None:
    """Store ``(array, slices, values)`` writes in one call into zarr's event loop."""

    pending = [(array._async_array, slices, values) for array, slices, values in writes]

    async def store() -> None:
        await asyncio.gather(*(array.setitem(slices, values) for array, slices, values in pending))

    sync(store())


class ChunkWriter:
    """Writes a run's completed chunks into ``group`` (stored at ``root``) and marks them done.

    ``frontier`` gives each chunk's blending weights to :meth:`write` (None where chunks come
    final, through :meth:`add`). ``direct`` writes each array's chunk files itself where
    :meth:`.chunkfiles.ChunkFiles.of` can (``False``: everything through zarr, the same bytes;
    ``benchmarks/bench_writer.py`` compares the two).
    """

    def __init__(
        self,
        group: zarr.Group,
        root: Path,
        arrays: Sequence[str],
        threshold: float,
        frontier: Frontier | None,
        direct: bool = True,
    ) -> None:
        self.group = group
        self.root = root
        self.arrays = tuple(arrays)
        self.threshold = threshold
        self.frontier = frontier
        #: chunks normalised but not stored yet: (chunk, its slices, each array's values)
        self._unsynced: list[tuple[Chunk, tuple[slice, ...], dict[str, np.ndarray]]] = []
        #: each array's chunk files where written directly, else None (zarr writes it)
        self._files = {
            name: ChunkFiles.of(group[name]) if direct else None
            for name in (*self.arrays, DONE_ARRAY)
        }

    def write(self, chunk: Chunk, acc: np.ndarray) -> None:
        """Normalise a gathered chunk into every output array's values; store them with the
        next group (:meth:`mark_done`).

        Runs on the writer thread, one chunk after another, so compression and storage overlap
        the network.
        """
        slices = self.frontier.plan.chunk_slices(chunk)
        values = acc / self.frontier.chunk_weight(chunk, slices)
        probability = values[0]
        arrays = {
            "probability": probability.astype(np.float16),
            "segmentation": (probability >= self.threshold).astype(np.uint8),
        }
        if len(values) > 1:
            measures = uncertainty_from_moments(values[0], values[1], values[2])
            for name in UNCERTAINTY_NAMES:
                arrays[name] = measures[name].astype(np.float16)
        self.add(chunk, slices, arrays)

    def add(self, chunk: Chunk, slices: tuple[slice, ...], arrays: dict[str, np.ndarray]) -> None:
        """Queue one chunk's final values (``arrays``: output name -> values in ``slices``);
        every :data:`SYNC_EVERY_CHUNKS` chunks the group is stored and marked done."""
        self._unsynced.append((chunk, slices, arrays))
        if len(self._unsynced) >= SYNC_EVERY_CHUNKS:
            self.mark_done()

    def mark_done(self) -> None:
        """Store the group's chunks, flush them to the disk, then mark them done: a chunk is
        never marked done before its bytes are durable (one ``syncfs`` per group of chunks
        where the system has it, else an fsync per chunk file).

        Chunks go to their files directly (:class:`.chunkfiles.ChunkFiles`); an array that
        cannot be written so is stored through zarr, in one call into its event loop for the
        whole group (handing each chunk over one call at a time cost the network more than the
        compression did).
        """
        if not self._unsynced:
            return
        written, self._unsynced = self._unsynced, []
        self._store(
            (name, chunk, slices, data)
            for chunk, slices, arrays in written
            for name, data in arrays.items()
        )
        chunks = [chunk for chunk, _, _ in written]
        atomic.sync_files([path for chunk in chunks for path in self.chunk_files(chunk)], self.root)
        flag = np.ones((1, 1, 1), np.uint8)
        self._store(
            (DONE_ARRAY, chunk, tuple(slice(c, c + 1) for c in chunk), flag) for chunk in chunks
        )

    def _store(self, writes) -> None:
        """Store ``(array name, chunk, slices, values)`` writes of whole chunks."""
        through_zarr = []
        for name, chunk, slices, values in writes:
            files = self._files[name]
            if files is None:
                through_zarr.append((self.group[name], slices, values))
            else:
                files.write(chunk, values)
        if through_zarr:
            _store_all(through_zarr)

    def chunk_files(self, chunk: Chunk) -> list[Path]:
        """The files of one chunk of every output array (zarr v3 default keys ``c/i/j/k``)."""
        key = Path("c", *(str(c) for c in chunk))
        return [self.root / name / key for name in self.arrays]

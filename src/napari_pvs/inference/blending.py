"""Gaussian blending of overlapping windows with bounded memory: the frontier of partial sums.

Each window's probability moments are weighted by the window's importance map and added to the
chunks they fall in. Partial sums live only in small *cells* (the pieces between window and
chunk borders) of chunks not yet complete, so no window is ever computed twice and memory is
set by the window, the batch and a band ``window - stride`` voxels thick, never by a whole copy
of the volume. A completed chunk's cells are gathered into one array of numerators; its
denominator, the sum of the weights, is recomputed per chunk (:meth:`Frontier.chunk_weight`).
"""

from __future__ import annotations

import itertools

import numpy as np

from napari_pvs.inference.planning import Chunk, Window, WindowPlan
from napari_pvs.memory import mapped_copy


class Frontier:
    """The blended numerators of the chunks a run has started but not yet written.

    ``done`` is the store's done grid: windows add nothing to chunks already written (a resumed
    run recomputes windows that also fed them).
    """

    def __init__(self, plan: WindowPlan, importance: np.ndarray, done: np.ndarray) -> None:
        self.plan = plan
        self.importance = importance
        self.done = done
        self.cells: dict[tuple[int, int, int], np.ndarray] = {}

    def add(self, idx: Window, moments: np.ndarray) -> None:
        """Add one window's weighted moments to the cells of chunks not yet written."""
        plan = self.plan
        starts, _ = plan.window_box(idx)
        weighted = moments * self.importance  # numerators only; weights: chunk_weight
        segs = [ax.window_segments(i) for ax, i in zip(plan.axes, idx, strict=True)]
        for key in itertools.product(*segs):
            chunk = tuple(ax.segment_chunk(k) for ax, k in zip(plan.axes, key, strict=True))
            if self.done[chunk]:
                continue
            local = (
                slice(None),
                *(
                    slice(ax.bounds[k] - s, ax.bounds[k + 1] - s)
                    for ax, k, s in zip(plan.axes, key, starts, strict=True)
                ),
            )
            cell = self.cells.get(key)
            if cell is None:
                self.cells[key] = mapped_copy(weighted[local])
            else:
                cell += weighted[local]

    def take(self, chunk: Chunk, n_stats: int) -> np.ndarray:
        """Move a completed chunk's cells into one array of blended numerators (frees them)."""
        plan = self.plan
        slices = plan.chunk_slices(chunk)
        acc = np.empty((n_stats, *(s.stop - s.start for s in slices)), dtype=np.float32)
        segs = [ax.chunk_segments(c) for ax, c in zip(plan.axes, chunk, strict=True)]
        for key in itertools.product(*segs):
            cell = self.cells.pop(key)
            local = tuple(
                slice(ax.bounds[k] - sl.start, ax.bounds[k + 1] - sl.start)
                for ax, k, sl in zip(plan.axes, key, slices, strict=True)
            )
            acc[(slice(None), *local)] = cell
        return acc

    def chunk_weight(self, chunk: Chunk, slices) -> np.ndarray:
        """Sum of the blending weights of the windows covering a chunk.

        The weights do not depend on the data, so they are summed here rather than carried in
        the frontier cells: that halves the memory the frontier needs. Reads only the plan
        and the importance map, so the writer thread may call it while windows are added.
        """
        plan = self.plan
        weight = np.zeros([s.stop - s.start for s in slices], dtype=np.float32)
        for idx in plan.covering_windows(chunk):
            starts, stops = plan.window_box(idx)
            lo = [max(a, sl.start) for a, sl in zip(starts, slices, strict=True)]
            hi = [min(b, sl.stop) for b, sl in zip(stops, slices, strict=True)]
            dst = tuple(
                slice(a - sl.start, b - sl.start) for a, b, sl in zip(lo, hi, slices, strict=True)
            )
            src = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, starts, strict=True))
            weight[dst] += self.importance[src]
        return weight

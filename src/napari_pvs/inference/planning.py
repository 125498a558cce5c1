"""Window planning: MONAI's sliding-window grid, the output chunking and the tile order.

One global window grid (the same one MONAI's ``sliding_window_inference`` uses: window starts
every ``window * (1 - overlap)`` voxels, the last one flush with the far edge), so the result is
seamless and equals a whole-volume sliding window with Gaussian blending. Output chunks are a
multiple of the window stride; windows run grouped by the output chunk their start falls in,
chunk groups in z-y-x order, so a chunk is complete as soon as its own group has run. Volumes
smaller than a window are zero-padded symmetrically (as MONAI does).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

DEFAULT_OVERLAP = 0.25
#: Output chunks aim for about this many voxels per axis (rounded to a multiple of the stride).
TARGET_CHUNK = 64

#: A window's index on each axis of the grid.
Window = tuple[int, int, int]
#: A chunk's index on each axis of the output chunk grid.
Chunk = tuple[int, int, int]


def importance_map(
    window: Sequence[int], blending: str = "gaussian", sigma_scale: float = 0.125
) -> np.ndarray:
    """Blending weights of one window, float32, identical to MONAI's ``compute_importance_map``.

    Computed here (same float32 operations in the same order) so inference never imports
    MONAI, which alone adds about 265 MB of resident memory (it pulls transformers, sklearn,
    pandas); a test checks the two agree exactly.
    """
    if blending == "constant":
        return np.ones(tuple(window), dtype=np.float32)
    weights = None
    for size in window:
        sigma = size * sigma_scale
        x = torch.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=torch.float)
        x = torch.exp(x**2 / (-2 * sigma**2))
        weights = x if weights is None else weights.unsqueeze(-1) * x
    floor = max(torch.min(weights).item(), 1e-3)
    return torch.clamp_(weights, min=floor).numpy()


def as_triple(value: int | Sequence[int], what: str) -> tuple[int, int, int]:
    """One size per axis from an int or 3 ints (a window or a chunk), all positive."""
    out = (int(value),) * 3 if np.isscalar(value) else tuple(int(v) for v in value)
    if len(out) != 3 or any(v < 1 for v in out):
        raise ValueError(f"{what} must be a positive int or 3 positive ints, got {value!r}")
    return out  # type: ignore[return-value]


def window_starts(size: int, window: int, overlap: float) -> tuple[list[int], int]:
    """Window starts along one axis and the symmetric zero-padding before the volume.

    Same rule as MONAI's ``dense_patch_slices``: stride ``int(window * (1 - overlap))``, the last
    window moved back to end at the (padded) edge. Starts are in volume coordinates (negative
    when the volume is smaller than the window and padded).
    """
    extent = max(size, window)
    pad_before = (extent - size) // 2
    stride = window if window == extent else max(1, int(window * (1 - overlap)))
    starts = []
    index = 0
    while True:
        start = index * stride
        if start + window >= extent:
            starts.append(extent - window - pad_before)
            break
        starts.append(start - pad_before)
        index += 1
    return starts, pad_before


def default_chunks(window: Sequence[int], overlap: float) -> tuple[int, int, int]:
    """Output chunk per axis: a multiple of the window stride near :data:`TARGET_CHUNK`."""
    out = []
    for w in window:
        stride = max(1, int(w * (1 - overlap)))
        out.append(stride * max(1, round(TARGET_CHUNK / stride)))
    return tuple(out)  # type: ignore[return-value]


@dataclass
class _Axis:
    """Window starts, chunking and cell boundaries along one axis."""

    size: int
    window: int
    starts: list[int]
    chunk: int
    bounds: list[int] = field(init=False)

    def __post_init__(self) -> None:
        cuts = {0, self.size}
        cuts.update(min(max(s, 0), self.size) for s in self.starts)
        cuts.update(min(max(s + self.window, 0), self.size) for s in self.starts)
        cuts.update(range(0, self.size, self.chunk))
        self.bounds = sorted(cuts)

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.size / self.chunk)

    def group(self, window_index: int) -> int:
        return max(0, self.starts[window_index]) // self.chunk

    def window_segments(self, window_index: int) -> range:
        start = self.starts[window_index]
        lo = min(max(start, 0), self.size)
        hi = min(max(start + self.window, 0), self.size)
        return range(bisect.bisect_left(self.bounds, lo), bisect.bisect_left(self.bounds, hi))

    def chunk_segments(self, chunk_index: int) -> range:
        lo = chunk_index * self.chunk
        hi = min(lo + self.chunk, self.size)
        return range(bisect.bisect_left(self.bounds, lo), bisect.bisect_left(self.bounds, hi))

    def segment_chunk(self, segment: int) -> int:
        return self.bounds[segment] // self.chunk

    def covering_windows(self, chunk_index: int) -> range:
        """Window indices that overlap this chunk (contiguous, as starts increase)."""
        lo = chunk_index * self.chunk
        hi = min(lo + self.chunk, self.size)
        first = next(i for i, s in enumerate(self.starts) if s + self.window > lo)
        last = max(i for i, s in enumerate(self.starts) if s < hi)
        return range(first, last + 1)


class WindowPlan:
    """The global window grid in tile order, and which chunk completes after which window."""

    def __init__(
        self,
        shape: Sequence[int],
        window: Sequence[int],
        overlap: float,
        chunks: Sequence[int],
    ) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.window = tuple(int(w) for w in window)
        self.chunks = tuple(int(c) for c in chunks)
        self.axes = []
        self.pad_before = []
        for size, w, c in zip(self.shape, self.window, self.chunks, strict=True):
            starts, pad = window_starts(size, w, overlap)
            self.axes.append(_Axis(size, w, starts, c))
            self.pad_before.append(pad)
        ranges = [range(len(ax.starts)) for ax in self.axes]
        self.order: list[tuple[int, int, int]] = sorted(
            itertools.product(*ranges),
            key=lambda idx: (*(ax.group(i) for ax, i in zip(self.axes, idx, strict=True)), *idx),
        )
        self.rank = {idx: r for r, idx in enumerate(self.order)}
        self.chunk_grid = tuple(ax.n_chunks for ax in self.axes)
        # A chunk's covering windows form a product of index ranges; in tile order the last of
        # them is the one with the largest index on every axis.
        self.finish_rank: dict[tuple[int, int, int], int] = {}
        for chunk in itertools.product(*(range(n) for n in self.chunk_grid)):
            last = tuple(ax.covering_windows(c)[-1] for ax, c in zip(self.axes, chunk, strict=True))
            self.finish_rank[chunk] = self.rank[last]

    def covering_windows(self, chunk: tuple[int, int, int]) -> list[tuple[int, int, int]]:
        return list(
            itertools.product(
                *(ax.covering_windows(c) for ax, c in zip(self.axes, chunk, strict=True))
            )
        )

    def window_box(self, idx: tuple[int, int, int]) -> tuple[list[int], list[int]]:
        """Window start (volume coordinates, may be negative) and stop per axis."""
        starts = [ax.starts[i] for ax, i in zip(self.axes, idx, strict=True)]
        return starts, [s + w for s, w in zip(starts, self.window, strict=True)]

    def chunk_slices(self, chunk: tuple[int, int, int]) -> tuple[slice, slice, slice]:
        return tuple(
            slice(c * ax.chunk, min((c + 1) * ax.chunk, ax.size))
            for ax, c in zip(self.axes, chunk, strict=True)
        )  # type: ignore[return-value]


@dataclass
class RemainingWork:
    """What a run still has to do, given the chunks already done (none on a fresh run).

    ``batches`` are ``(batch index, windows)`` pairs from the full run's batching, keeping only
    the batches with a window that feeds an unfinished chunk: a resumed run computes those
    windows in the same batches (the same MC seeds), so its output is identical. ``pending``
    holds the unfinished chunks as ``(finish rank, chunk)`` in the order they complete.
    """

    batches: list[tuple[int, list[Window]]]
    pending: list[tuple[int, Chunk]]

    @property
    def windows(self) -> int:
        """How many windows the run computes."""
        return sum(len(b) for _, b in self.batches)


def remaining_work(plan: WindowPlan, done: np.ndarray, batch: int) -> RemainingWork:
    """The batches still to run and the chunks still to write (``done``: the done grid)."""
    needed = set()
    for chunk in plan.finish_rank:
        if not done[chunk]:
            needed.update(plan.covering_windows(chunk))
    batches = [plan.order[i : i + batch] for i in range(0, len(plan.order), batch)]
    todo = [(j, b) for j, b in enumerate(batches) if any(w in needed for w in b)]
    pending = sorted((rank, chunk) for chunk, rank in plan.finish_rank.items() if not done[chunk])
    return RemainingWork(todo, pending)

"""Chunked sliding-window prediction over lazy volumes, streaming into a resumable zarr group.

Why it is built this way:

* **One global window grid** (the same one MONAI's ``sliding_window_inference`` uses: window
  starts every ``window * (1 - overlap)`` voxels, the last one flush with the far edge), so the
  result is seamless and equals a whole-volume sliding window with Gaussian blending.
* **Tile order, bounded memory.** Output chunks are a multiple of the window stride. Windows are
  run grouped by the output chunk their start falls in, chunk groups in z-y-x order; a chunk is
  complete as soon as its own group has run, so it is blended, written and freed at once. Partial
  sums live only in small *cells* (the pieces between window and chunk borders) along the
  frontier, so no window is ever computed twice and memory is set by the window, the batch and
  a band ``window - stride`` voxels thick, never by a whole copy of the volume.
* **Resumable.** Each written chunk is marked in the ``_chunks_done`` array (after its chunk
  files are fsynced); a rerun with the same settings skips finished chunks and recomputes only
  windows that still feed unfinished ones, in the same batches, so the output is identical. A
  store written with other settings is refused with a message that says what differs.
* **Safe.** The output may not be the input (or inside it, or hold it); an existing folder that
  is not a prediction store is never written into or replaced. A lock file inside the store
  (:func:`napari_pvs.atomic.hold_lock`) keeps a second run from writing it meanwhile.
  ``overwrite`` builds the new store under a hidden sibling name (resumable too) and swaps it
  in only when complete, so a failed or interrupted overwrite leaves the old store whole.
* **Uncertainty.** With MC dropout, test-time flips or an ensemble, each window yields
  probability samples (see :mod:`napari_pvs.uncertainty`); their running means are blended like
  the probability and turned into entropy, mutual information and variance per chunk.

Inputs are normalised with :mod:`napari_pvs.intensity` (range estimated once per volume). Volumes
smaller than a window are zero-padded symmetrically (as MONAI does) and windows are padded to the
model's ``size_divisor``; outputs always have exactly the input's shape and voxel order.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import torch
import zarr

from napari_pvs import atomic
from napari_pvs.intensity import normalize, robust_range
from napari_pvs.io import ATTRS_KEY, PREDICTION_LEVELS, downsample, pyramid_shapes, store_chunked
from napari_pvs.memory import check_policy, mapped_copy, memory_policy
from napari_pvs.models import DEFAULT_SEGMENTATION_RULE, DEFAULT_WINDOW, MAX_MIN_CLUSTER_MM3
from napari_pvs.progress import CancelToken, ProgressCallback, check_cancelled, no_progress
from napari_pvs.uncertainty import (
    UNCERTAINTY_NAMES,
    flip_count,
    predictive_moments,
    predictive_samples,
    sample_count,
    uncertainty_from_moments,
)

#: Version of the prediction store layout; bump when the layout changes.
STORE_FORMAT = 1
DONE_ARRAY = "_chunks_done"
DEFAULT_OVERLAP = 0.25
#: Output chunks aim for about this many voxels per axis (rounded to a multiple of the stride).
TARGET_CHUNK = 64
#: Hand the C heap's free pages back every this many windows (see memory.memory_policy), so
#: what it keeps is what the last few windows left, not what the whole run did (at 512^3,
#: every 8 windows held 30 MB less than every 32, at the same speed).
TRIM_EVERY_WINDOWS = 8
#: Completed chunks that may wait for the writer thread before the network waits for it.
MAX_PENDING_WRITES = 4
#: Written chunks are flushed to the disk and marked done in groups of this many (and at the
#: end, or when a run stops): one sync per group instead of one fsync per chunk file.
SYNC_EVERY_CHUNKS = 8
#: Hidden sibling an ``overwrite`` run builds its store under until it is complete.
OVERWRITE_MARK = f"{atomic.TEMP_MARK}overwrite-"
#: Predictions larger than this edge (voxels) also get coarser display levels, halving until
#: the largest edge is at most half of it: a 1024^3 probability is drawn from its 512^3 or
#: 256^3 level at the zoom that needs no more, and napari, which reads a plane of the coarsest
#: level for the layer's thumbnail at every slice (and draws 3D from it), reads 256^2 there.
#: Smaller ones are shown (and stay editable) at full resolution alone.
DISPLAY_EDGE = 512


def store_lock_path(store: str | Path) -> Path:
    """The lock file a run holds inside a prediction store while it writes it.

    It lives in the ``_chunks_done`` array's folder, which zarr never lists, so readers of the
    store see nothing unusual while a run is going on.
    """
    return Path(store) / DONE_ARRAY / atomic.LOCK_NAME


def overwrite_staging_path(out: str | Path) -> Path:
    """Where ``overwrite`` builds the replacement of ``out`` (swapped in when complete)."""
    out = Path(out)
    return out.with_name(f"{OVERWRITE_MARK}{out.name}")


def _store_run(path: Path) -> dict | None:
    """The ``run`` signature of a prediction store at ``path``, or None if it is not one."""
    try:
        group = zarr.open_group(str(path), mode="r")
        ours = dict(group.attrs).get(ATTRS_KEY, {})
    except Exception:  # not a zarr group (or unreadable): not one of our stores
        return None
    run = ours.get("run") if isinstance(ours, dict) else None
    return run if isinstance(run, dict) else None


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


def default_batch(device: torch.device, precision: torch.dtype | None = None) -> int:
    """Windows per batch when none is asked for: 4 on CUDA; on CPU 1 in bfloat16, else 2.

    Measured on 2 CPU cores (256^3, 64^3 windows, ``memory="reuse"``): in bfloat16 batch 1 ran
    as fast as batch 2 with about 70 MB less peak memory; in float32 batch 1 took 1.8x as long
    as batch 2, and batch 4 was no faster than 2 with more than twice the memory.
    """
    if device.type == "cuda":
        return 4
    return 1 if precision == torch.bfloat16 else 2


def _triple(value: int | Sequence[int], what: str) -> tuple[int, int, int]:
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


def min_cluster_voxels(min_cluster_mm3: float, spacing: Sequence[float]) -> int:
    """Smallest cluster kept, in voxels: clusters under ``min_cluster_mm3`` mm^3 are removed."""
    if min_cluster_mm3 <= 0:
        return 0
    return max(1, math.ceil(min_cluster_mm3 / math.prod(float(s) for s in spacing) - 1e-9))


def remove_small_clusters(
    segmentation,
    min_voxels: int,
    chunks: Sequence[int],
    cancel: CancelToken | None = None,
) -> int:
    """Delete 26-connected clusters of fewer than ``min_voxels`` voxels from a stored mask.

    Works chunk by chunk (zarr or numpy, changed in place) and is exact without labelling the
    whole volume: a cluster of fewer than ``min_voxels`` voxels lies within ``min_voxels - 2``
    voxels of each of its voxels, so it is complete inside the chunk grown by a halo of
    ``min_voxels`` and does not touch that box's inner border; clusters that touch it are kept
    (they are larger, or go on outside). Clusters never merge, so removing some leaves the rest
    unchanged: the pass is idempotent and an interrupted one simply runs again. Returns the
    number of voxels removed.
    """
    from napari_pvs.metrics import label_clusters

    if min_voxels <= 1:
        return 0
    shape = tuple(int(s) for s in segmentation.shape)
    halo = int(min_voxels)
    removed = 0
    starts = [range(0, size, int(step)) for size, step in zip(shape, chunks, strict=True)]
    for start in itertools.product(*starts):
        check_cancelled(cancel)
        inner = tuple(
            slice(a, min(a + int(c), size)) for a, c, size in zip(start, chunks, shape, strict=True)
        )
        outer = tuple(
            slice(max(sl.start - halo, 0), min(sl.stop + halo, size))
            for sl, size in zip(inner, shape, strict=True)
        )
        local = tuple(
            slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer, strict=True)
        )
        box = np.asarray(segmentation[outer]) > 0
        if not box[local].any():
            continue
        labels, count = label_clusters(box)
        small = np.bincount(labels.ravel(), minlength=count + 1) < min_voxels
        small[0] = False
        for axis, (sl, size) in enumerate(zip(outer, shape, strict=True)):
            if sl.start > 0:  # an inner border: what touches it may go on outside
                small[np.unique(labels.take(0, axis=axis))] = False
            if sl.stop < size:
                small[np.unique(labels.take(-1, axis=axis))] = False
        drop = small[labels[local]]
        if drop.any():
            piece = np.asarray(segmentation[inner]).copy()
            piece[drop] = 0
            segmentation[inner] = piece
            removed += int(drop.sum())
    return removed


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


# --------------------------------------------------------------------------------------------
# inputs


@dataclass
class _Source:
    """What the inferer needs from a volume: the lazy array and its geometry."""

    data: Any
    spacing: tuple[float, float, float]
    affine: np.ndarray
    modality: str
    axes: tuple[str, str, str]
    source: str | None


def _as_source(volume) -> _Source:
    # numpy arrays have a .data buffer too, so only unwrap Volume-like objects
    data = volume if getattr(volume, "ndim", None) is not None else getattr(volume, "data", None)
    if getattr(data, "ndim", None) != 3:
        raise ValueError(
            f"expected a 3D volume, got shape {tuple(getattr(data, 'shape', ()))}; "
            "open files with napari_pvs.io.open_volume or pass a 3D array"
        )
    spacing = tuple(float(s) for s in getattr(volume, "spacing", (1.0, 1.0, 1.0)))
    affine = np.asarray(getattr(volume, "affine", np.diag([*spacing, 1.0])), dtype=np.float64)
    return _Source(
        data=data,
        spacing=spacing,  # type: ignore[arg-type]
        affine=affine,
        modality=str(getattr(volume, "modality", "unknown") or "unknown"),
        axes=tuple(getattr(volume, "axes", ("z", "y", "x"))),  # type: ignore[arg-type]
        source=getattr(volume, "source", None),
    )


def _read(data, slices: tuple[slice, ...]) -> np.ndarray:
    """Read a box of a numpy/zarr/dask array (dask computed synchronously: no thread storm)."""
    block = data[slices]
    if hasattr(block, "compute"):
        block = block.compute(scheduler="synchronous")
    return np.asarray(block)


def _weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


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


@dataclass
class PredictionSummary:
    """What a :meth:`Predictor.predict` call did."""

    out: str
    shape: tuple[int, int, int]
    windows_total: int
    windows_run: int
    chunks_total: int
    chunks_skipped: int
    seconds: float
    arrays: tuple[str, ...]
    small_cluster_voxels_removed: int = 0


class Predictor:
    """Sliding-window prediction of one or more models over lazy volumes, chunk by chunk.

    ``model`` is a model following the contract in ``docs/architecture.md`` or a list of them
    (an ensemble). ``mc_samples`` > 0 draws that many MC-dropout samples per window from the
    head (features computed once), ``tta`` averages test-time mirrorings (``True`` or 8: all 8
    axis mirrorings; 4: the identity and one mirror per axis; ``False`` or 1: none; default: the
    model's calibrated ``segmentation_rule``, else none). ``batch`` windows run
    together (default :func:`default_batch`: 4 on CUDA; on CPU 1 in bfloat16, else 2). With
    more than one sample in total, ``entropy``, ``mutual_information`` and ``variance`` are
    written too.
    ``threshold`` and ``min_cluster_mm3`` (clusters smaller than this are removed from the
    segmentation, never from the probability) default to the model's calibrated
    ``segmentation_rule`` from its checkpoint, else 0.5 and 0 (keep all).
    ``amp`` runs the network in the reduced precision the device has natively (see
    :func:`napari_pvs.models.autocast_dtype`); ``amp=False`` keeps float32 throughout.
    ``memory`` is the C-heap policy of :func:`napari_pvs.memory.memory_policy` (``"reuse"``:
    fast and flat; ``"return"``: the lowest peak, slower; ``"system"``: untouched).
    A prediction with an edge over ``display_edge`` voxels (default :data:`DISPLAY_EDGE`,
    read when the predictor is made) also gets max-pooled display
    levels (:func:`write_display_levels`), so the viewer draws it from a coarser level.
    """

    def __init__(
        self,
        model: torch.nn.Module | Sequence[torch.nn.Module],
        window: int | Sequence[int] = DEFAULT_WINDOW,
        overlap: float = DEFAULT_OVERLAP,
        batch: int | None = None,
        device: str | torch.device = "auto",
        blending: str = "gaussian",
        sigma_scale: float = 0.125,
        mc_samples: int = 0,
        tta: bool | int | None = None,
        amp: bool = True,
        channels_last: bool | None = None,
        chunks: int | Sequence[int] | None = None,
        threshold: float | None = None,
        min_cluster_mm3: float | None = None,
        modality: str | None = None,
        seed: int = 0,
        memory: str = "reuse",
        display_edge: int | None = None,
    ) -> None:
        from napari_pvs.models import autocast_dtype, resolve_device

        models = list(model) if isinstance(model, list | tuple) else [model]
        if not models:
            raise ValueError("no model given; pass a model or a list of models (an ensemble)")
        for m in models:
            for attr in ("features", "head"):
                if not callable(getattr(m, attr, None)):
                    raise ValueError(
                        f"model {type(m).__name__} has no {attr}() method; models must follow "
                        "the features/head contract in docs/architecture.md"
                    )
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if batch is not None and batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        if mc_samples < 0:
            raise ValueError(f"mc_samples must be 0 (off) or a positive count, got {mc_samples}")
        display_edge = DISPLAY_EDGE if display_edge is None else display_edge
        if display_edge < 16:
            raise ValueError(f"display_edge must be at least 16 voxels, got {display_edge}")
        if blending not in ("gaussian", "constant"):
            raise ValueError(f"blending must be 'gaussian' or 'constant', got {blending!r}")
        rule = {
            **DEFAULT_SEGMENTATION_RULE,
            **dict(getattr(models[0], "segmentation_rule", None) or {}),
        }
        threshold = float(rule["threshold"] if threshold is None else threshold)
        min_cluster_mm3 = float(
            rule["min_cluster_mm3"] if min_cluster_mm3 is None else min_cluster_mm3
        )
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
        if not 0 <= min_cluster_mm3 <= MAX_MIN_CLUSTER_MM3:
            raise ValueError(
                f"min_cluster_mm3 must be between 0 (keep every cluster) and "
                f"{MAX_MIN_CLUSTER_MM3:g} mm3, got {min_cluster_mm3}"
            )
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.window = _triple(window, "window")
        self.overlap = float(overlap)
        self.blending = blending
        self.sigma_scale = float(sigma_scale)
        self.mc_samples = int(mc_samples)
        self.tta = flip_count(rule["tta"] if tta is None else tta)
        # Reduced precision where the hardware has it natively (CUDA float16, CPU bfloat16).
        self.amp_dtype = autocast_dtype(self.device) if amp else None
        self.batch = int(batch) if batch is not None else default_batch(self.device, self.amp_dtype)
        # channels-last pays on GPUs (tensor cores); on CPU it measured no faster.
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        self.chunks = (
            default_chunks(self.window, self.overlap)
            if chunks is None
            else _triple(chunks, "chunks")
        )
        self.threshold = threshold
        self.min_cluster_mm3 = min_cluster_mm3
        self.modality = modality
        self.seed = int(seed)
        self.memory = check_policy(memory)
        self.display_edge = int(display_edge)
        self.models = []
        for m in models:
            m = m.to(self.device).eval()
            if self.channels_last:
                m = m.to(memory_format=torch.channels_last_3d)
            self.models.append(m)
        self.size_divisor = max(int(getattr(m, "size_divisor", 1) or 1) for m in self.models)
        self.n_samples = sample_count(len(self.models), self.mc_samples, self.tta)
        self._importance = self._importance_map()

    # -- helpers ------------------------------------------------------------------------------
    def _importance_map(self) -> np.ndarray:
        return importance_map(self.window, self.blending, self.sigma_scale)

    @property
    def output_arrays(self) -> tuple[str, ...]:
        extra = UNCERTAINTY_NAMES if self.n_samples > 1 else ()
        return ("probability", "segmentation", *extra)

    def _signature(self, shape, modality: str, intensity: tuple[float, float]) -> dict:
        return {
            "format": STORE_FORMAT,
            "shape": list(shape),
            "window": list(self.window),
            "overlap": self.overlap,
            "chunks": list(self.chunks),
            "batch": self.batch,
            "blending": self.blending,
            "sigma_scale": self.sigma_scale,
            "mc_samples": self.mc_samples,
            "tta": self.tta,
            "seed": self.seed,
            "threshold": self.threshold,
            "min_cluster_mm3": self.min_cluster_mm3,
            "precision": str(self.amp_dtype or torch.float32).removeprefix("torch."),
            "modality": modality,
            "intensity_range": [round(intensity[0], 6), round(intensity[1], 6)],
            "models": [
                {
                    "name": getattr(m, "name", type(m).__name__),
                    "config": getattr(m, "config", {}),
                    "weights": _weights_digest(m),
                }
                for m in self.models
            ],
        }

    def _open_store(
        self,
        out: Path,
        signature: dict,
        plan: WindowPlan,
        src: _Source,
        overwrite: bool,
        locks: contextlib.ExitStack,
    ) -> tuple[zarr.Group, np.ndarray, Path]:
        """Create the output group, or reopen a compatible one, holding its lock.

        Returns the group, the done grid and the path being written: ``out`` itself, or with
        ``overwrite`` over an existing store its hidden staging sibling (whose own lock, and
        the lock of ``out``, are held until the run ends).
        """
        wanted = json.loads(json.dumps(signature))
        atomic.check_writable_folder(out.parent)
        atomic.restore_interrupted(out)
        target = out
        if out.exists():
            if _store_run(out) is None:
                if not (out.is_dir() and not any(out.iterdir())):
                    raise ValueError(
                        f"{out} exists and is not a napari-pvs prediction store; refusing to "
                        "write into or replace it; choose another output path"
                    )
            elif overwrite:
                locks.enter_context(
                    atomic.hold_lock(store_lock_path(out), f"prediction store {out}")
                )
                target = overwrite_staging_path(out)
                if target.exists() and _store_run(target) != wanted:
                    atomic._remove(target)  # an earlier overwrite with other settings: ours
        if not target.exists() or (target.is_dir() and not any(target.iterdir())):
            self._create_store(target, wanted, plan, src)
        self._lock = locks.enter_context(
            atomic.hold_lock(store_lock_path(target), f"prediction store {out}")
        )
        group = zarr.open_group(str(target), mode="r+")
        found = dict(group.attrs).get(ATTRS_KEY, {}).get("run")
        if found != wanted:
            differ = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            details = "; ".join(f"{k}: {found.get(k)!r} -> {wanted.get(k)!r}" for k in differ)
            raise ValueError(
                f"{out} holds a prediction from a different run "
                f"({details}); rerun with the same settings to resume, pass overwrite=True "
                "(CLI: --overwrite) to replace it once the new one is complete, or choose "
                "another output path"
            )
        done = np.asarray(group[DONE_ARRAY][...]).astype(bool)
        return group, done, target

    def _create_store(self, target: Path, wanted: dict, plan: WindowPlan, src: _Source) -> None:
        """The empty store (metadata, arrays, done grid) built aside and renamed into place,
        so a store under ``target`` always has its full metadata and run signature."""
        temp = atomic.temp_path(target)
        group = zarr.open_group(str(temp), mode="w")
        geometry = {
            "spacing": list(src.spacing),
            "affine": src.affine.tolist(),
            "axes": list(src.axes),
            "modality": wanted["modality"],
            "source": src.source,
        }
        group.attrs[ATTRS_KEY] = {**geometry, "run": wanted, "complete": False}
        for name in self.output_arrays:
            dtype = "uint8" if name == "segmentation" else "float16"
            array = group.create_array(
                name, shape=plan.shape, chunks=plan.chunks, dtype=dtype, fill_value=0
            )
            array.attrs[ATTRS_KEY] = geometry
        group.create_array(
            DONE_ARRAY,
            shape=plan.chunk_grid,
            chunks=(1, 1, 1),
            dtype="uint8",
            fill_value=0,
            compressors=None,
        )
        atomic.fsync_path(temp)
        try:
            os.rename(temp, target)  # onto nothing, or an empty folder; never a full one
        except OSError:
            atomic._remove(temp)
            if not target.exists():
                raise
            return  # another run created it meanwhile: its lock and signature decide
        atomic.fsync_folder(target.parent)

    def _chunk_files(self, chunk: tuple[int, int, int]) -> list[Path]:
        """The files of one chunk of every output array (zarr v3 default keys ``c/i/j/k``)."""
        key = Path("c", *(str(c) for c in chunk))
        return [self._store_root / name / key for name in self.output_arrays]

    def _read_windows(
        self,
        data,
        plan: WindowPlan,
        windows: list[tuple[int, int, int]],
        intensity: tuple[float, float],
    ) -> np.ndarray:
        """Normalised, zero-padded input windows ``(B, 1, *window)`` for one batch."""
        boxes = [plan.window_box(idx) for idx in windows]
        clipped = [
            [(max(s, 0), min(e, size)) for s, e, size in zip(*box, plan.shape, strict=True)]
            for box in boxes
        ]
        lo = [min(c[a][0] for c in clipped) for a in range(3)]
        hi = [max(c[a][1] for c in clipped) for a in range(3)]
        union = math.prod(h - low for low, h in zip(lo, hi, strict=True))
        single = sum(math.prod(e - s for s, e in c) for c in clipped)
        shared = (
            _read(data, tuple(slice(a, b) for a, b in zip(lo, hi, strict=True)))
            if union <= 2 * single
            else None
        )
        out = np.zeros((len(windows), 1, *self.window), dtype=np.float32)
        for k, ((starts, _), box) in enumerate(zip(boxes, clipped, strict=True)):
            if shared is not None:
                sl = tuple(slice(a - o, b - o) for (a, b), o in zip(box, lo, strict=True))
                block = shared[sl]
            else:
                block = _read(data, tuple(slice(a, b) for a, b in box))
            dst = tuple(slice(a - s, b - s) for (a, b), s in zip(box, starts, strict=True))
            out[(k, 0, *dst)] = normalize(block, *intensity)
        return out

    @torch.inference_mode()
    def _run_batch(self, image: np.ndarray, modality: str, batch_index: int) -> np.ndarray:
        """Moments ``(B, 1 or 3, *window)`` of the probability samples for one batch."""
        x = torch.from_numpy(image)
        div = self.size_divisor
        pad = [(-s) % div for s in self.window]
        if any(pad):
            x = torch.nn.functional.pad(x, [v for p in reversed(pad) for v in (0, p)])
        x = x.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed * 1_000_003 + batch_index)
            with torch.autocast(
                self.device.type,
                dtype=self.amp_dtype or torch.float32,
                enabled=self.amp_dtype is not None,
            ):
                if self.n_samples == 1:  # one deterministic pass: the probability itself
                    moments = next(predictive_samples(self.models, x, modality))
                else:
                    moments = predictive_moments(
                        self.models, x, modality, self.mc_samples, self.tta
                    )
        crop = (slice(None), slice(None), *(slice(0, w) for w in self.window))
        return moments[crop].float().cpu().numpy()

    def _gather_chunk(
        self, chunk: tuple[int, int, int], plan: WindowPlan, cells: dict, n_stats: int
    ) -> np.ndarray:
        """Move a completed chunk's cells into one array of blended numerators (frees them)."""
        slices = plan.chunk_slices(chunk)
        acc = np.empty((n_stats, *(s.stop - s.start for s in slices)), dtype=np.float32)
        segs = [ax.chunk_segments(c) for ax, c in zip(plan.axes, chunk, strict=True)]
        for key in itertools.product(*segs):
            cell = cells.pop(key)
            local = tuple(
                slice(ax.bounds[k] - sl.start, ax.bounds[k + 1] - sl.start)
                for ax, k, sl in zip(plan.axes, key, slices, strict=True)
            )
            acc[(slice(None), *local)] = cell
        return acc

    def _write_chunk(
        self, chunk: tuple[int, int, int], plan: WindowPlan, acc: np.ndarray, group: zarr.Group
    ) -> None:
        """Normalise a gathered chunk and write every output array; mark chunks done in groups.

        Runs on the writer thread, one chunk after another, so a chunk is marked done only
        once all its arrays are stored, and compression and storage overlap the network.
        """
        slices = plan.chunk_slices(chunk)
        values = acc / self._chunk_weight(plan, chunk, slices)
        probability = values[0]
        group["probability"][slices] = probability.astype(np.float16)
        group["segmentation"][slices] = (probability >= self.threshold).astype(np.uint8)
        if len(values) > 1:
            measures = uncertainty_from_moments(values[0], values[1], values[2])
            for name in UNCERTAINTY_NAMES:
                group[name][slices] = measures[name].astype(np.float16)
        self._unsynced.append(chunk)
        if len(self._unsynced) >= SYNC_EVERY_CHUNKS:
            self._mark_done(group)

    def _mark_done(self, group: zarr.Group) -> None:
        """Flush the written chunks to the disk, then mark them done: a chunk is never marked
        done before its bytes are durable (one ``syncfs`` per group of chunks where the system
        has it, else an fsync per chunk file)."""
        if not self._unsynced:
            return
        chunks, self._unsynced = self._unsynced, []
        atomic.sync_files(
            [path for chunk in chunks for path in self._chunk_files(chunk)], self._store_root
        )
        for chunk in chunks:
            group[DONE_ARRAY][tuple(slice(c, c + 1) for c in chunk)] = np.ones((1, 1, 1), np.uint8)

    def _chunk_weight(self, plan: WindowPlan, chunk, slices) -> np.ndarray:
        """Sum of the blending weights of the windows covering a chunk.

        The weights do not depend on the data, so they are summed here rather than carried in
        the frontier cells: that halves the memory the frontier needs.
        """
        weight = np.zeros([s.stop - s.start for s in slices], dtype=np.float32)
        for idx in plan.covering_windows(chunk):
            starts, stops = plan.window_box(idx)
            lo = [max(a, sl.start) for a, sl in zip(starts, slices, strict=True)]
            hi = [min(b, sl.stop) for b, sl in zip(stops, slices, strict=True)]
            dst = tuple(
                slice(a - sl.start, b - sl.start) for a, b, sl in zip(lo, hi, slices, strict=True)
            )
            src = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, starts, strict=True))
            weight[dst] += self._importance[src]
        return weight

    # -- the public call ------------------------------------------------------------------------
    def predict(
        self,
        volume,
        out: str | Path,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        overwrite: bool = False,
    ) -> PredictionSummary:
        """Predict ``volume`` into the zarr group ``out`` (resuming a compatible partial run).

        ``volume`` is an :class:`napari_pvs.io.Volume` or a 3D array (numpy, dask, zarr).
        Raises :class:`napari_pvs.progress.Cancelled` within one batch of ``cancel`` being set;
        finished chunks are kept and a rerun resumes from them. ``out`` may not be the
        volume's own file; a store from other settings is replaced only with ``overwrite``,
        and then only once the new one is complete (an interrupted overwrite resumes when run
        again with ``overwrite``). Raises :class:`napari_pvs.atomic.Locked` while another run
        writes ``out``.
        """
        out = Path(out)
        source = getattr(volume, "source", None)
        if source is not None and atomic.overlaps(out, source):
            raise ValueError(
                f"output {out} is the input {source} (or inside it, or holds it): refusing to "
                "write onto an input; choose another output path"
            )
        with memory_policy(self.memory) as trim_heap, contextlib.ExitStack() as locks:
            try:
                return self._predict(
                    volume, out, progress or no_progress, cancel, overwrite, trim_heap, locks
                )
            except OSError as exc:
                mapped = atomic.os_error_message(exc, out)
                if mapped is None or isinstance(exc, atomic.OutputError):
                    raise
                kept = (
                    f"the existing {out.name} is unchanged" if overwrite and out.exists() else
                    "finished chunks are kept: rerun the same command to resume"
                )  # fmt: skip
                raise atomic.OutputError(exc.errno, f"{mapped} ({kept})") from exc

    def _predict(
        self,
        volume,
        out: Path,
        progress: ProgressCallback,
        cancel: CancelToken | None,
        overwrite: bool,
        trim_heap: Callable[[], None],
        locks: contextlib.ExitStack,
    ) -> PredictionSummary:
        started = time.perf_counter()
        src = _as_source(volume)
        modality = self.modality or src.modality
        plan = WindowPlan(src.data.shape, self.window, self.overlap, self.chunks)
        intensity = robust_range(src.data)
        signature = self._signature(plan.shape, modality, intensity)
        group, done, target = self._open_store(out, signature, plan, src, overwrite, locks)
        self._store_root = target
        n_stats = 3 if self.n_samples > 1 else 1
        chunks_total = len(plan.finish_rank)
        skipped = int(done.sum())

        needed = set()
        for chunk in plan.finish_rank:
            if not done[chunk]:
                needed.update(plan.covering_windows(chunk))
        batches = [plan.order[i : i + self.batch] for i in range(0, len(plan.order), self.batch)]
        todo = [(j, b) for j, b in enumerate(batches) if any(w in needed for w in b)]
        pending = sorted(
            (rank, chunk) for chunk, rank in plan.finish_rank.items() if not done[chunk]
        )
        cells: dict[tuple[int, int, int], np.ndarray] = {}
        total = sum(len(b) for _, b in todo)
        run = 0
        progress(0, total, "predicting")
        writes: deque[Future] = deque()
        self._unsynced: list[tuple[int, int, int]] = []
        try:
            with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(1) as writer:
                future = (
                    reader.submit(self._read_windows, src.data, plan, todo[0][1], intensity)
                    if todo
                    else None
                )
                for position, (batch_index, windows) in enumerate(todo):
                    check_cancelled(cancel)
                    image = future.result()
                    if position + 1 < len(todo):
                        future = reader.submit(
                            self._read_windows, src.data, plan, todo[position + 1][1], intensity
                        )
                    moments = self._run_batch(image, modality, batch_index)
                    for k, idx in enumerate(windows):
                        self._accumulate(plan, idx, moments[k], cells, done)
                    if (run + len(windows)) // TRIM_EVERY_WINDOWS > run // TRIM_EVERY_WINDOWS:
                        trim_heap()
                    run += len(windows)
                    last_rank = plan.rank[windows[-1]]
                    while pending and pending[0][0] <= last_rank:
                        _, chunk = pending.pop(0)
                        acc = self._gather_chunk(chunk, plan, cells, n_stats)
                        writes.append(writer.submit(self._write_chunk, chunk, plan, acc, group))
                    # Collect finished writes (raising their errors); bound those waiting.
                    while writes and (writes[0].done() or len(writes) > MAX_PENDING_WRITES):
                        writes.popleft().result()
                    progress(run, total, "predicting")
                for write in writes:
                    write.result()
        except BaseException:
            with contextlib.suppress(Exception):  # keep what was written before the stop
                self._mark_done(group)
            raise
        self._mark_done(group)
        if pending:
            raise RuntimeError(f"internal error: {len(pending)} chunks were never completed")
        # Last, and again on every rerun (idempotent): clusters too small to be a PVS go.
        removed = 0
        min_voxels = min_cluster_voxels(self.min_cluster_mm3, src.spacing)
        if min_voxels > 1:
            progress(total, total, f"removing clusters under {self.min_cluster_mm3:g} mm3")
            removed = remove_small_clusters(group["segmentation"], min_voxels, plan.chunks, cancel)
        if display_level_shapes(plan.shape, self.display_edge):
            progress(total, total, "writing display levels")
            write_display_levels(group, self.output_arrays, self.display_edge, cancel)
        attrs = dict(group.attrs[ATTRS_KEY])
        attrs["complete"] = True
        group.attrs[ATTRS_KEY] = attrs  # zarr writes metadata by rename: atomic
        if target != out:  # overwrite: the complete new store replaces the old one in one swap
            atomic.commit(target, out)
            self._lock.path = store_lock_path(out)  # our lock file moved with the store
        else:
            atomic.fsync_path(out / "zarr.json")
        return PredictionSummary(
            out=str(out),
            shape=plan.shape,
            windows_total=len(plan.order),
            windows_run=run,
            chunks_total=chunks_total,
            chunks_skipped=skipped,
            seconds=time.perf_counter() - started,
            arrays=self.output_arrays,
            small_cluster_voxels_removed=removed,
        )

    def _accumulate(
        self,
        plan: WindowPlan,
        idx: tuple[int, int, int],
        moments: np.ndarray,
        cells: dict,
        done: np.ndarray,
    ) -> None:
        """Add one window's weighted moments to the cells of chunks not yet written."""
        starts, _ = plan.window_box(idx)
        weighted = moments * self._importance  # numerators only; weights: _chunk_weight
        segs = [ax.window_segments(i) for ax, i in zip(plan.axes, idx, strict=True)]
        for key in itertools.product(*segs):
            chunk = tuple(ax.segment_chunk(k) for ax, k in zip(plan.axes, key, strict=True))
            if done[chunk]:
                continue
            local = (
                slice(None),
                *(
                    slice(ax.bounds[k] - s, ax.bounds[k + 1] - s)
                    for ax, k, s in zip(plan.axes, key, starts, strict=True)
                ),
            )
            cell = cells.get(key)
            if cell is None:
                cells[key] = mapped_copy(weighted[local])
            else:
                cell += weighted[local]


def predict(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    volume,
    out: str | Path,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    overwrite: bool = False,
    **options: Any,
) -> PredictionSummary:
    """One-call form of ``Predictor(model, **options).predict(volume, out, ...)``."""
    return Predictor(model, **options).predict(
        volume, out, progress=progress, cancel=cancel, overwrite=overwrite
    )

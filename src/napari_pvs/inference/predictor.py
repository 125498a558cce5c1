"""The predictor: settings checked once, then each prediction run as a few named stages.

A run plans the window grid (:mod:`.planning`), opens or resumes its store (:mod:`.store`),
streams the remaining windows through the network (:mod:`.engine`), blending them
(:mod:`.blending`) into chunks the writer stores (:mod:`.writer`), then removes clusters too
small to be a PVS (:mod:`.segmentation`), writes display levels (:mod:`.levels`) and marks the
store complete.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import zarr

from napari_pvs import atomic
from napari_pvs.inference.blending import Frontier
from napari_pvs.inference.engine import WindowEngine, default_batch, model_list
from napari_pvs.inference.inputs import as_source
from napari_pvs.inference.levels import (
    check_display_edge,
    display_level_shapes,
    write_display_levels,
)
from napari_pvs.inference.planning import (
    DEFAULT_OVERLAP,
    WindowPlan,
    as_triple,
    default_chunks,
    importance_map,
    remaining_work,
)
from napari_pvs.inference.segmentation import (
    min_cluster_voxels,
    remove_small_clusters,
    segmentation_rule,
)
from napari_pvs.inference.store import (
    DIGEST_SAMPLE_VOXELS,
    STORE_FORMAT,
    complete_store,
    open_store,
    sample_digest,
    weights_digest,
)
from napari_pvs.inference.writer import ChunkWriter
from napari_pvs.intensity import RANGE_SAMPLE_VOXELS, sample_range, strided_samples
from napari_pvs.memory import check_policy, memory_policy
from napari_pvs.metrics import count_pvs
from napari_pvs.models import DEFAULT_WINDOW
from napari_pvs.progress import CancelToken, ProgressCallback, no_progress
from napari_pvs.uncertainty import UNCERTAINTY_NAMES, flip_count


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
    together (default :func:`.engine.default_batch`: 4 on CUDA; on CPU 1 in bfloat16, else 2),
    and ``lanes`` batches at once, each on its share of torch's threads (default
    :func:`.engine.default_lanes`: in bfloat16 on CPU one per thread, at most four, else one;
    the MC-dropout draws do not depend on it, the rounding of sums split across a lane's
    threads may).
    With more than one sample in total, ``entropy``, ``mutual_information`` and ``variance``
    are written too.
    ``threshold`` and ``min_cluster_mm3`` (clusters smaller than this are removed from the
    segmentation, never from the probability) default to the model's calibrated
    ``segmentation_rule`` from its checkpoint, else 0.5 and 0 (keep all).
    ``amp`` runs the network in the reduced precision the device has natively (see
    :func:`napari_pvs.models.autocast_dtype`); ``amp=False`` keeps float32 throughout.
    ``channels_last`` (default: on CUDA, and on CPU for models with the fused fast path of
    :mod:`.fused`) sets the memory format the network runs in.
    ``memory`` is the C-heap policy of :func:`napari_pvs.memory.memory_policy` (``"reuse"``:
    fast and flat; ``"return"``: the lowest peak, slower; ``"system"``: untouched).
    A prediction with an edge over ``display_edge`` voxels (default
    :data:`.levels.DISPLAY_EDGE`, read when the predictor is made) also gets max-pooled display
    levels (:func:`.levels.write_display_levels`), so the viewer draws it from a coarser level.
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
        lanes: int | None = None,
    ) -> None:
        from napari_pvs.models import autocast_dtype, resolve_device

        models = model_list(model)
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if batch is not None and batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        if mc_samples < 0:
            raise ValueError(f"mc_samples must be 0 (off) or a positive count, got {mc_samples}")
        display_edge = check_display_edge(display_edge)
        if blending not in ("gaussian", "constant"):
            raise ValueError(f"blending must be 'gaussian' or 'constant', got {blending!r}")
        threshold, min_cluster_mm3, tta = segmentation_rule(
            models[0], threshold, min_cluster_mm3, tta
        )
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.window = as_triple(window, "window")
        self.overlap = float(overlap)
        self.blending = blending
        self.sigma_scale = float(sigma_scale)
        self.mc_samples = int(mc_samples)
        self.tta = flip_count(tta)
        # Reduced precision where the hardware has it natively (CUDA float16, CPU bfloat16).
        self.amp_dtype = autocast_dtype(self.device) if amp else None
        self.batch = int(batch) if batch is not None else default_batch(self.device, self.amp_dtype)
        self.chunks = (
            default_chunks(self.window, self.overlap)
            if chunks is None
            else as_triple(chunks, "chunks")
        )
        self.threshold = threshold
        self.min_cluster_mm3 = min_cluster_mm3
        self.modality = modality
        self.seed = int(seed)
        self.memory = check_policy(memory)
        self.display_edge = display_edge
        self.engine = WindowEngine(
            models,
            self.device,
            self.window,
            self.amp_dtype,
            channels_last,
            self.mc_samples,
            self.tta,
            self.seed,
            lanes,
        )
        self.models = self.engine.models
        self.channels_last = self.engine.channels_last
        self.size_divisor = self.engine.size_divisor
        self.n_samples = self.engine.n_samples
        self._importance = importance_map(self.window, self.blending, self.sigma_scale)

    @property
    def output_arrays(self) -> tuple[str, ...]:
        """The arrays a store of this predictor holds (uncertainty with several samples)."""
        extra = UNCERTAINTY_NAMES if self.n_samples > 1 else ()
        return ("probability", "segmentation", *extra)

    def _signature(
        self, shape, modality: str, intensity: tuple[float, float], source: str = ""
    ) -> dict:
        """The run signature of a store: the settings that decide its bytes, the weights and
        the input's identity (``source``: a digest of its voxels)."""
        return {
            "input": source,
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
                    "weights": weights_digest(m),
                }
                for m in self.models
            ],
        }

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
        Raises :class:`napari_pvs.progress.Cancelled` within one batch per network lane of
        ``cancel`` being set; finished chunks are kept and a rerun resumes from them. ``out``
        may not be the volume's own file; a store from other settings is replaced only with
        ``overwrite``, and then only once the new one is complete (an interrupted overwrite
        resumes when run again with ``overwrite``). Raises :class:`napari_pvs.atomic.Locked`
        while another run writes ``out``.
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
        """One run, stage by stage: plan the windows, open (or resume) the store, stream the
        remaining windows into it, finish the segmentation and levels, mark it complete."""
        started = time.perf_counter()
        src = as_source(volume)
        modality = self.modality or src.modality
        plan = WindowPlan(src.data.shape, self.window, self.overlap, self.chunks)
        # The intensity range's sample and the digest's, decoded in one pass over the input.
        range_sample, digest_sample = strided_samples(
            src.data, RANGE_SAMPLE_VOXELS, DIGEST_SAMPLE_VOXELS
        )
        intensity = sample_range(range_sample)
        signature = self._signature(plan.shape, modality, intensity, sample_digest(digest_sample))
        store = open_store(out, signature, plan, src, self.output_arrays, overwrite, locks)
        skipped = int(store.done.sum())
        work = remaining_work(plan, store.done, self.batch)
        frontier = Frontier(plan, self._importance, store.done)
        writer = ChunkWriter(store.group, store.path, self.output_arrays, self.threshold, frontier)
        run = self.engine.stream(
            src.data, intensity, modality, work, frontier, writer, progress, cancel, trim_heap
        )
        removed = self._finish_outputs(
            store.group, plan, src.spacing, work.windows, progress, cancel
        )
        progress(work.windows, work.windows, "counting PVS")
        complete_store(store, out, count_pvs(store.group["segmentation"]))
        return PredictionSummary(
            out=str(out),
            shape=plan.shape,
            windows_total=len(plan.order),
            windows_run=run,
            chunks_total=len(plan.finish_rank),
            chunks_skipped=skipped,
            seconds=time.perf_counter() - started,
            arrays=self.output_arrays,
            small_cluster_voxels_removed=removed,
        )

    def _finish_outputs(
        self,
        group: zarr.Group,
        plan: WindowPlan,
        spacing: Sequence[float],
        total: int,
        progress: ProgressCallback,
        cancel: CancelToken | None,
    ) -> int:
        """Once every chunk is written, and again on every rerun (both steps are idempotent):
        remove clusters too small to be a PVS, then write the display levels. Returns the
        number of segmentation voxels removed."""
        removed = 0
        min_voxels = min_cluster_voxels(self.min_cluster_mm3, spacing)
        if min_voxels > 1:
            progress(total, total, f"removing clusters under {self.min_cluster_mm3:g} mm3")
            removed = remove_small_clusters(group["segmentation"], min_voxels, plan.chunks, cancel)
        if display_level_shapes(plan.shape, self.display_edge):
            progress(total, total, "writing display levels")
            write_display_levels(group, self.output_arrays, self.display_edge, cancel)
        return removed


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

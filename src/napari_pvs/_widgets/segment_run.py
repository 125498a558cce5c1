"""One segmentation run as the Segment panel starts it, without Qt: request, call, result.

The panel captures a :class:`SegmentRequest` on the GUI thread and runs
:func:`run_segmentation` in a :class:`~napari_pvs._widgets._jobs.BackgroundJob`: the core's
:class:`napari_pvs.inference.Predictor` (or, for a volume of the open project,
:meth:`napari_pvs.project.Project.predict` with the project's model version) writes a resumable
prediction store chunk by chunk and records its PVS count; :func:`pvs_statistics` reads it (or
counts an older store with :func:`napari_pvs.metrics.count_pvs`) once the layers are on screen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_pvs import io
from napari_pvs.cohort import modality_warning
from napari_pvs.io import open_prediction
from napari_pvs.io.predictions import recorded_pvs_count
from napari_pvs.metrics import MAX_COUNT_VOXELS, count_pvs
from napari_pvs.models import DEFAULT_WINDOW, prediction_options
from napari_pvs.models.native import preload_torch_libraries
from napari_pvs.progress import CancelToken, ProgressCallback

if TYPE_CHECKING:
    from napari_pvs.inference import PredictionSummary

#: Uncertainty arrays a run may write -> the title and contrast limits of their layers.
UNCERTAINTY_DISPLAY = {
    "entropy": ("entropy", (0.0, 1.0)),
    "mutual_information": ("mutual information", (0.0, 0.5)),
    "variance": ("variance", (0.0, 0.25)),
}


@dataclass
class SegmentRequest:
    """Everything one segmentation run needs, captured on the GUI thread."""

    volume: io.Volume
    model: str
    out: Path
    device: str = "auto"
    mc_samples: int = 0
    tta: int | None = None  # test-time mirrorings; None: the model's calibrated rule
    window: int = DEFAULT_WINDOW
    batch: int | None = None  # None: the core's default for the device
    overwrite: bool = False
    #: a project volume: predict through the project with this model version
    project: Any = None
    volume_id: int | None = None
    version: int | None = None


@dataclass
class SegmentResult:
    """What a run produced: the store, the predictor's summary, PVS count/volume, notes.

    ``pvs_voxels``/``pvs_volume_mm3`` are None until counted: the panel counts after the
    layers are on screen (streaming a 1024^3 segmentation takes tens of seconds).
    """

    out: Path
    summary: PredictionSummary | None
    device: str  # "" when the version's stored prediction was shown (nothing ran)
    pvs_voxels: int | None
    pvs_volume_mm3: float | None
    pvs_count: int | None
    model: str = "default"  # what made it: "v3" (project version) or the checkpoint's name
    version: int | None = None  # the project's model version, for a project volume
    seconds: float = 0.0
    arrays: tuple[str, ...] = ("probability", "segmentation")
    notes: list[str] = field(default_factory=list)
    #: each array's display levels (finest first), opened by :func:`open_display_levels` in
    #: the worker: the store's metadata is never read on the GUI thread
    levels: dict[str, list] = field(default_factory=dict)


def open_display_levels(result: SegmentResult) -> SegmentResult:
    """``result`` with the display levels of every array the panel may show (probability,
    segmentation, the uncertainty maps) opened from its store."""
    from napari_pvs.io import open_prediction, prediction_levels

    group = open_prediction(result.out)
    shown = ("probability", "segmentation", *UNCERTAINTY_DISPLAY)
    result.levels = {
        array: prediction_levels(group, array, result.out, display=True)
        for array in result.arrays
        if array in shown
    }
    return result


def resolve_device_noting(device: str) -> tuple[Any, str]:
    """:func:`napari_pvs.models.resolve_device`, returning its CPU-fallback message too."""
    from napari_pvs.models import resolve_device

    notes: list[str] = []
    resolved = resolve_device(device, notify=notes.append)
    return resolved, " ".join(notes)


def pvs_statistics(store: str | Path) -> tuple[int, float, int | None]:
    """Segmented voxels, their volume in mm³ and the number of PVS (26-connected clusters;
    ``None`` above :data:`~napari_pvs.metrics.MAX_COUNT_VOXELS`).

    A store the predictor completed recorded them (no voxel is read); an older one is counted
    now (:func:`napari_pvs.metrics.count_pvs`).
    """
    group = open_prediction(store)
    affine = np.asarray(dict(group.attrs)["napari_pvs"]["affine"], dtype=np.float64)
    voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))
    voxels, count = recorded_pvs_count(group) or count_pvs(group["segmentation"])
    return voxels, voxels * voxel_mm3, count


def pvs_cluster_count(store: str | Path) -> int | None:
    """The number of PVS in a store, or None above :data:`~napari_pvs.metrics.MAX_COUNT_VOXELS`
    (without reading the segmentation then: the voxel sum is not needed)."""
    group = open_prediction(store)
    recorded = recorded_pvs_count(group)
    if recorded is not None:
        return recorded[1]
    if int(np.prod(group["segmentation"].shape)) > MAX_COUNT_VOXELS:
        return None
    return count_pvs(group["segmentation"])[1]


def _store_arrays(store: Path) -> tuple[str, ...]:
    group = open_prediction(store)
    names = ("probability", "segmentation", *UNCERTAINTY_DISPLAY)
    return tuple(name for name in names if name in group)


def run_segmentation(
    request: SegmentRequest, progress: ProgressCallback, cancel: CancelToken, count: bool = True
) -> SegmentResult:
    """Load the model, predict into the store (resuming a compatible partial one), count PVS
    (unless ``count`` is False: then the result's PVS figures are None)."""
    started = time.perf_counter()
    stored = request.project is not None and request.project.has_prediction(
        request.volume_id, request.version
    )
    # a version's complete prediction is shown as stored: no device, no torch import
    if not stored:
        preload_torch_libraries()  # before the device check imports torch (see its module)
    device, note = ("", "") if stored else resolve_device_noting(request.device)
    notes = [note] if note else []
    options = prediction_options(  # the rule napari-pvs predict uses
        window=request.window,
        batch=request.batch,
        device=device,
        mc_samples=request.mc_samples,
        tta=request.tta,
    )
    summary = None
    if request.project is not None:
        record = request.project.volume(request.volume_id)
        if request.volume.modality != record.modality:  # the panel's choice is the project's
            request.project.set_modality(record.id, request.volume.modality)
        progress(0, 0, f"loading model v{request.version}")
        out = Path(
            request.project.predict(
                request.volume_id,
                version=request.version,
                progress=progress,
                cancel=cancel,
                **options,
            )
        )
        model_name = f"v{request.version}"
    else:
        from napari_pvs.inference import Predictor  # (torch: only once a prediction runs)
        from napari_pvs.models.checkpoint import load_model

        progress(0, 0, "loading model")
        model, metadata = load_model(request.model, device=str(device))
        warning = modality_warning(metadata, request.volume.modality)
        if warning:
            notes.append(warning)
        predictor = Predictor(model, modality=request.volume.modality, **options)
        try:
            summary = predictor.predict(
                request.volume, request.out, progress, cancel, overwrite=request.overwrite
            )
        except ValueError as exc:
            if "different run" in str(exc):
                raise ValueError(f"{exc} — in this panel: tick 'Overwrite'") from exc
            raise
        out = request.out
        model_name = "default" if request.model == "default" else Path(request.model).name
    voxels = volume_mm3 = pvs_count = None
    if count:
        progress(0, 0, "counting PVS")
        voxels, volume_mm3, pvs_count = pvs_statistics(out)
    return SegmentResult(
        out,
        summary,
        str(device),
        voxels,
        volume_mm3,
        pvs_count,
        model=model_name,
        seconds=time.perf_counter() - started,
        version=request.version,
        arrays=_store_arrays(out),
        notes=notes,
    )

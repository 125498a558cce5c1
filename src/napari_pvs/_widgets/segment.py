"""The "Segment PVS" panel (and the workflow's Segment step): run a model over an image layer.

A thin Qt adapter. The work is the core's: :class:`napari_pvs.inference.Predictor` (or, for a
volume of the open project, :meth:`napari_pvs.project.Project.predict` with the project's
model version) writes a resumable prediction store chunk by chunk off the GUI thread (via
:class:`~napari_pvs._widgets._jobs.BackgroundJob`); the result comes back as lazy layers read
from that store, added one per event-loop turn (:class:`~napari_pvs._widgets._layers.
StagedLayers`) so the canvas keeps drawing; :func:`napari_pvs.metrics.label_clusters` counts
the PVS. A new run replaces the earlier run's layers (never a labels layer holding unsaved
corrections: it asks first) and, standalone, its ranking table. As a standalone panel it also
ranks patches (:func:`napari_pvs.ranking.rank_patches`); in the workflow the Review step does.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
from napari.layers import Image, Labels
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_pvs import io
from napari_pvs._widgets._common import (
    collapsed,
    compact_table,
    fill_table,
    notify,
    set_combo_items,
    status_label,
    strategy_combo,
)
from napari_pvs._widgets._jobs import BackgroundJob, JobProgress
from napari_pvs._widgets._layers import (
    EDITED_KEY,
    PREDICTION_KEY,
    StagedLayers,
    box_world,
    default_output,
    find_layer,
    has_unsaved_edits,
    input_image_layers,
    layer_volume,
    show_box,
    track_edits,
    warm_up_labels_visuals,
    zoom_to,
)
from napari_pvs._widgets.state import VOLUME_KEY, WorkflowState
from napari_pvs.cohort import modality_warning
from napari_pvs.display import as_dask
from napari_pvs.io import open_prediction, prediction_levels
from napari_pvs.metrics import label_clusters
from napari_pvs.models import DEFAULT_WINDOW
from napari_pvs.progress import CancelToken, ProgressCallback
from napari_pvs.ranking import (
    DEFAULT_PATCH,
    SCORE_MEANINGS,
    RankedPatch,
    rank_patches,
    save_ranking,
    shortfall_message,
)

if TYPE_CHECKING:
    import napari

    from napari_pvs.inference import PredictionSummary

__all__ = ["SegmentPanel", "default_output", "layer_volume"]

MODALITY_CHOICES = ("T1", "T2", "unknown")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
#: Counting clusters labels the whole mask in memory (5 bytes per voxel); above this many
#: voxels only the PVS volume (streamed) is reported and the per-patch counts of the ranking
#: table remain.
MAX_COUNT_VOXELS = 256**3
#: Test-time flip choices shown in the panel -> ``Predictor(tta=...)``.
TTA_CHOICES: dict[str, int | None] = {
    "model's rule": None,
    "none": 1,
    "4 mirrorings": 4,
    "8 mirrorings": 8,
}
UNCERTAINTY_DISPLAY = {
    "entropy": ("entropy", (0.0, 1.0)),
    "mutual_information": ("mutual information", (0.0, 0.5)),
    "variance": ("variance", (0.0, 0.25)),
}
#: Metadata key naming the model (version) a result layer came from.
MODEL_KEY = "model_version"


# ------------------------------------------------------------------ core calls (no Qt below)
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


def resolve_device_noting(device: str) -> tuple[Any, str]:
    """:func:`napari_pvs.models.resolve_device`, returning its CPU-fallback message too."""
    from napari_pvs.models import resolve_device

    notes: list[str] = []
    resolved = resolve_device(device, notify=notes.append)
    return resolved, " ".join(notes)


def pvs_statistics(store: str | Path) -> tuple[int, float, int | None]:
    """Segmented voxels, their volume in mm³ and the number of PVS (26-connected clusters).

    The voxel sum is streamed; the cluster count needs the mask in memory, so it is ``None``
    above :data:`MAX_COUNT_VOXELS`.
    """
    group = open_prediction(store)
    segmentation = group["segmentation"]
    affine = np.asarray(dict(group.attrs)["napari_pvs"]["affine"], dtype=np.float64)
    voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))
    voxels = int(da.from_zarr(segmentation).sum(dtype=np.int64).compute(scheduler="synchronous"))
    count = None
    if int(np.prod(segmentation.shape)) <= MAX_COUNT_VOXELS:
        _, count = label_clusters(np.asarray(segmentation[...]) > 0)
    return voxels, voxels * voxel_mm3, count


def pvs_cluster_count(store: str | Path) -> int | None:
    """The number of PVS in a store, or None above :data:`MAX_COUNT_VOXELS` (without reading
    the segmentation then: the voxel sum :func:`pvs_statistics` streams is not needed)."""
    segmentation = open_prediction(store)["segmentation"]
    if int(np.prod(segmentation.shape)) > MAX_COUNT_VOXELS:
        return None
    return pvs_statistics(store)[2]


def as_float32(data: Any) -> Any:
    """Float16 predictions as float32 for display (vispy has no float16 textures), per level
    (a dask array, a :class:`~napari_pvs.display.DisplayLevel`, or a list of either)."""
    if isinstance(data, list):
        return [level.astype(np.float32) for level in data]
    return data.astype(np.float32)


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
    device, note = ("", "") if stored else resolve_device_noting(request.device)
    notes = [note] if note else []
    options = {
        "window": request.window,
        "batch": request.batch,
        "device": device,
        "mc_samples": request.mc_samples,
        "tta": request.tta,
    }
    summary = None
    if request.project is not None:
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


# ------------------------------------------------------------------ the panel
class SegmentPanel(QWidget):
    """Segment PVS with the default model, a checkpoint or the project's model version.

    ``state`` is the workflow's shared state (a fresh one, without a project, when the panel
    is opened on its own); ``standalone`` adds the ranking section the Review step replaces.
    """

    def __init__(
        self,
        napari_viewer: napari.viewer.Viewer,
        state: WorkflowState | None = None,
        standalone: bool = True,
    ) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = state or WorkflowState(napari_viewer, parent=self)
        self.standalone = standalone
        self.job = BackgroundJob(self)
        self.job.succeeded.connect(self._on_succeeded)
        self.job.failed.connect(self._on_failed)
        self.job.cancelled.connect(self._on_cancelled)
        #: counts PVS of a shown result (after its layers are on screen)
        self.count_job = BackgroundJob(self)
        self.count_job.succeeded.connect(self._on_counted)
        self.count_job.failed.connect(self._on_count_failed)
        self.staged = StagedLayers(self)
        warm_up_labels_visuals()
        self._scratch: Path | None = None
        #: the last segmentation run, and the ranking (the core's rows; the table shows them)
        self.result: SegmentResult | None = None
        self.ranking: list[RankedPatch] = []
        self.ranking_files: tuple[Path, Path] | None = None
        self._geometry: dict[str, Any] = {}  # layer name, scale, translate, metadata of the run
        self._ranking_geometry: dict[str, Any] = {}
        self._job_kind = "segment"
        self._volume_id: int | None = None
        #: result layers of the last run by array name ("segmentation", "probability", ...)
        self.result_layers: dict[str, Image | Labels] = {}
        self._names: dict[str, str] = {}

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self._build_segment_box())
        if standalone:
            layout.addWidget(self._build_rank_box())
        self.status_label = status_label()
        layout.addWidget(self.status_label)
        layout.addStretch(1)

        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self.state.project_changed.connect(self._on_layer_changed)
        self.state.volumes_changed.connect(self._on_layer_changed)
        self.state.versions_changed.connect(self._refresh_versions)
        self.state.versions_changed.connect(self._follow_current_version)
        self.state.settings_changed.connect(self._apply_settings)
        self._refresh_layers()
        self._apply_settings()

    # ---------------------------------------------------------------- building
    def _build_segment_box(self) -> QGroupBox:
        box = QGroupBox("Segment PVS")
        form = QFormLayout(box)
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        self.layer_combo = QComboBox()
        self.layer_combo.currentTextChanged.connect(self._on_layer_changed)
        form.addRow("Image", self.layer_combo)

        self.model_edit = QLineEdit("default")
        self.model_edit.setToolTip("'default' (the bundled model) or a .safetensors checkpoint")
        self.model_button = QPushButton("…")
        self.model_button.setToolTip("Choose a checkpoint")
        self.model_button.clicked.connect(self._browse_model)
        self.model_row = QWidget()
        row = QHBoxLayout(self.model_row)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.model_edit, 1)
        row.addWidget(self.model_button)
        self.version_combo = QComboBox()
        self.version_combo.setToolTip(
            "The project's model version that predicts this volume (current by default)"
        )
        models = QWidget()
        row = QHBoxLayout(models)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.model_row, 1)
        row.addWidget(self.version_combo, 1)
        form.addRow("Model", models)

        self.modality_combo = QComboBox()
        self.modality_combo.addItems(MODALITY_CHOICES)
        self.modality_combo.setToolTip("Contrast the model is told (from the layer; editable)")
        self.modality_combo.currentTextChanged.connect(self._set_modality)
        form.addRow("Modality", self.modality_combo)

        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICE_CHOICES)
        self.device_combo.setToolTip("auto: CUDA if available, else CPU (with a message)")
        self.device_combo.currentTextChanged.connect(
            lambda text: self.state.update_settings(device=text)
        )
        form.addRow("Device", self.device_combo)
        self.uncertainty_check = QCheckBox("Uncertainty layers")
        self.uncertainty_check.setChecked(True)
        self.uncertainty_check.setToolTip(
            "Add entropy / mutual information / variance layers (hidden until shown) when the "
            "run has them (MC samples or test-time flips)"
        )
        form.addRow(self.uncertainty_check)

        advanced = QWidget()
        adv = QFormLayout(advanced)
        adv.setContentsMargins(0, 0, 0, 0)
        self.mc_spin = QSpinBox()
        self.mc_spin.setRange(0, 64)
        self.mc_spin.setToolTip("Monte Carlo dropout samples for uncertainty (0 = off)")
        adv.addRow("MC samples", self.mc_spin)
        self.tta_combo = QComboBox()
        for label, count in TTA_CHOICES.items():
            self.tta_combo.addItem(label, count)
        self.tta_combo.setToolTip(
            "Average the prediction over mirrored copies of each window: sharper thin PVS, one "
            "network pass per mirroring; the model's rule was calibrated on held-out phantoms"
        )
        adv.addRow("Test-time flips", self.tta_combo)
        self.window_spin = QSpinBox()
        self.window_spin.setRange(16, 512)
        self.window_spin.setSingleStep(16)
        self.window_spin.setValue(DEFAULT_WINDOW)
        adv.addRow("Window", self.window_spin)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(0, 256)
        self.batch_spin.setSpecialValueText("auto")  # 0: the core's default for the device
        self.batch_spin.setValue(0)
        adv.addRow("Batch", self.batch_spin)
        self.output_edit = QLineEdit()
        self.output_button = QPushButton("…")
        self.output_button.setToolTip("Folder for the prediction store")
        self.output_button.clicked.connect(self._browse_output)
        self.output_row = QWidget()
        row = QHBoxLayout(self.output_row)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.output_edit, 1)
        row.addWidget(self.output_button)
        adv.addRow("Output", self.output_row)
        self.overwrite_check = QCheckBox("Overwrite")
        self.overwrite_check.setToolTip(
            "Replace a prediction store made with other settings (otherwise it is refused)"
        )
        adv.addRow(self.overwrite_check)
        self.advanced = collapsed("Advanced", advanced)
        form.addRow(self.advanced)

        self.segment_button = QPushButton("Segment")
        self.segment_button.clicked.connect(self.segment)
        form.addRow(self.segment_button)
        self.progress = JobProgress("windows")
        self.progress.follow(self.job)
        self.cancel_button = self.progress.cancel_button
        form.addRow(self.progress)
        self.summary_label = QLabel("")
        self.summary_label.setWordWrap(True)
        form.addRow(self.summary_label)
        return box

    def _build_rank_box(self) -> QGroupBox:
        box = QGroupBox("Rank patches for review")
        form = QFormLayout(box)
        self.strategy_combo = strategy_combo("bald needs MC samples or flips at segmentation time")
        form.addRow("Strategy", self.strategy_combo)
        self.n_spin = QSpinBox()
        self.n_spin.setRange(1, 500)
        self.n_spin.setValue(20)
        self.patch_spin = QSpinBox()
        self.patch_spin.setRange(4, 256)
        self.patch_spin.setValue(DEFAULT_PATCH)
        row = QHBoxLayout()
        row.addWidget(QLabel("N"))
        row.addWidget(self.n_spin)
        row.addWidget(QLabel("patch"))
        row.addWidget(self.patch_spin)
        form.addRow(row)
        self.rank_button = QPushButton("Rank patches")
        self.rank_button.clicked.connect(self.rank)
        form.addRow(self.rank_button)
        self.table = compact_table(
            ["#", "score", "centre (voxel)", "PVS"],
            [
                "rank",
                "the strategy's score (hover a row for its meaning)",
                "patch centre in voxels (axis order of the volume); hover for mm",
                "predicted PVS in the patch",
            ],
        )
        self.table.itemSelectionChanged.connect(self._on_row_selected)
        form.addRow(self.table)
        return box

    # ---------------------------------------------------------------- layers and fields
    def _report(self, message: str, error: bool = False, warning: bool = False) -> None:
        notify(self.status_label, message, "error" if error else "warning" if warning else "info")

    def _input_layers(self) -> list[Image]:
        return input_image_layers(self.viewer)

    def _refresh_layers(self, event=None) -> None:
        current = self.layer_combo.currentText()
        set_combo_items(self.layer_combo, [layer.name for layer in self._input_layers()])
        if self.layer_combo.currentText() != current:
            self._on_layer_changed()

    def current_layer(self) -> Image | None:
        name = self.layer_combo.currentText()
        return next((layer for layer in self._input_layers() if layer.name == name), None)

    def current_volume(self):
        """The project volume the chosen layer shows (None: standalone or not in the project)."""
        return self.state.volume_for_layer(self.current_layer())

    def _on_layer_changed(self, *args) -> None:
        layer = self.current_layer()
        in_project = self.current_volume() is not None
        self.model_row.setVisible(not in_project)
        self.version_combo.setVisible(in_project)
        self.output_row.setEnabled(not in_project)
        self.overwrite_check.setEnabled(not in_project)
        self._refresh_versions()
        self.output_edit.clear()
        if layer is None:
            self.output_edit.setPlaceholderText("")
            return
        self.output_edit.setPlaceholderText(
            "in the project" if in_project else str(default_output(layer, self._scratch_dir()))
        )
        modality = str(layer.metadata.get("modality", "unknown"))
        self.modality_combo.blockSignals(True)
        self.modality_combo.setCurrentText(modality if modality in MODALITY_CHOICES else "unknown")
        self.modality_combo.blockSignals(False)

    def _refresh_versions(self) -> None:
        project = self.state.project
        self.version_combo.clear()
        if project is None:
            return
        current = project.current_version().version
        for version in project.versions():
            if version.status != "ready":
                continue
            label = f"v{version.version}" + (" (current)" if version.version == current else "")
            self.version_combo.addItem(label, version.version)
        self.version_combo.setCurrentIndex(max(0, self.version_combo.findData(current)))

    def _follow_current_version(self) -> None:
        """After a round or a roll back: show the current version's prediction of the volume
        whose result is on screen, when it has one (a finished store: nothing is recomputed)."""
        project, result = self.state.project, self.result
        if project is None or result is None or result.version is None or self.is_running():
            return
        layer = find_layer(self.viewer, self._geometry.get("name", ""))
        volume = self.state.volume_for_layer(layer)
        current = project.current_version().version
        if (
            volume is None
            or current == result.version
            or not project.has_prediction(volume.id, current)
        ):
            return
        self.layer_combo.setCurrentText(layer.name)
        self.version_combo.setCurrentIndex(max(0, self.version_combo.findData(current)))
        self.segment()

    def _apply_settings(self) -> None:
        settings = self.state.settings()
        self.device_combo.blockSignals(True)
        self.device_combo.setCurrentText(str(settings["device"]))
        self.device_combo.blockSignals(False)
        if self.state.project is not None:  # the project's prediction settings
            self.mc_spin.setValue(int(settings.get("predict_mc", 0)))
            index = self.tta_combo.findData(int(settings.get("predict_tta", 1)))
            if index >= 0:
                self.tta_combo.setCurrentIndex(index)
        if self.standalone:
            self.strategy_combo.setCurrentText(str(settings["strategy"]))
            self.patch_spin.setValue(int(settings["patch"]))

    def _set_modality(self, modality: str) -> None:
        layer = self.current_layer()
        if layer is not None:
            layer.metadata["modality"] = io.normalize_modality(modality)

    def _scratch_dir(self) -> Path:
        """One temporary folder per panel for in-memory layers (a rerun finds its store)."""
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="napari-pvs-"))
        return self._scratch

    def output_path(self) -> Path | None:
        """The prediction store for the chosen layer: the project's, the Output field, else
        the default beside the layer's file."""
        layer = self.current_layer()
        volume = self.current_volume()
        if volume is not None:
            version = self.version_combo.currentData()
            return Path(self.state.project.prediction_path(volume.id, version))
        text = self.output_edit.text().strip()
        if text:
            return Path(text)
        return default_output(layer, self._scratch_dir()) if layer is not None else None

    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose a checkpoint", "", "napari-pvs checkpoints (*.safetensors)"
        )
        if path:
            self.model_edit.setText(path)

    def _browse_output(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder for the prediction")
        layer = self.current_layer()
        if folder and layer is not None:
            name = default_output(layer, self._scratch_dir()).name
            self.output_edit.setText(str(Path(folder) / name))

    def _set_busy(self, busy: bool) -> None:
        self.segment_button.setEnabled(not busy)
        if self.standalone:
            self.rank_button.setEnabled(not busy)

    def is_running(self) -> bool:
        """A run, its layers still being added, or its PVS still being counted."""
        return self.job.is_running() or self.staged.is_running() or self.count_job.is_running()

    # ---------------------------------------------------------------- segmentation
    def _result_names(self, base: str, suffix: str = "") -> dict[str, str]:
        titles = {"segmentation": "segmentation", "probability": "probability"}
        titles.update({key: title for key, (title, _) in UNCERTAINTY_DISPLAY.items()})
        return {key: f"{base} PVS {title}{suffix}" for key, title in titles.items()}

    def _protect_corrections(self, names: dict[str, str], label: str) -> dict[str, str] | None:
        """Ask before a new result replaces a segmentation layer holding painted corrections.

        Returns the names to write the results under (a new set for "New layers"), or None
        when the user cancelled.
        """
        edited = find_layer(self.viewer, names["segmentation"])
        if not has_unsaved_edits(edited):
            return names
        choice = self.state.ask(
            self,
            "Unsaved corrections",
            f"'{edited.name}' holds corrections you painted that are not saved. Write the new "
            "result to new layers (keeping your corrections), replace them, or cancel?",
            ["New layers", "Replace", "Cancel"],
        )
        if choice == "Cancel":
            return None
        if choice == "Replace":
            return names
        # the edited layer may read lazily from the store the new run rewrites: keep a copy
        if not isinstance(edited.data, np.ndarray):
            edited.data = np.asarray(edited.data)
        edited.metadata.pop(PREDICTION_KEY, None)
        base = names["segmentation"][: -len(" PVS segmentation")]
        suffix, index = f" ({label})", 2
        while find_layer(self.viewer, self._result_names(base, suffix)["segmentation"]):
            suffix, index = f" ({label} {index})", index + 1
        return self._result_names(base, suffix)

    def segment(self) -> bool:
        """Start segmenting the chosen layer in the background; False if it could not start."""
        if self.is_running():
            self._report("a segmentation or ranking is already running", error=True)
            return False
        layer = self.current_layer()
        if layer is None:
            self._report("no image layer to segment; open a volume or a sample first", error=True)
            return False
        volume_record = self.current_volume()
        project = self.state.project if volume_record is not None else None
        version = self.version_combo.currentData() if project is not None else None
        try:
            volume = layer_volume(layer, self.modality_combo.currentText())
            request = SegmentRequest(
                volume=volume,
                model=self.model_edit.text().strip() or "default",
                out=self.output_path(),  # type: ignore[arg-type]
                device=self.device_combo.currentText(),
                mc_samples=self.mc_spin.value(),
                tta=self.tta_combo.currentData(),
                window=self.window_spin.value(),
                batch=self.batch_spin.value() or None,
                overwrite=self.overwrite_check.isChecked() and project is None,
                project=project,
                volume_id=volume_record.id if volume_record is not None else None,
                version=version,
            )
        except ValueError as exc:
            self._report(str(exc), error=True)
            return False
        if project is not None:  # what this run uses, every project prediction uses
            changes = {"predict_mc": request.mc_samples}
            if request.tta is not None:
                changes["predict_tta"] = request.tta
            self.state.update_settings(**changes)
        label = f"v{version}" if version is not None else "new"
        names = self._protect_corrections(self._result_names(layer.name), label)
        if names is None:
            self._report("segmentation not started: your corrections are untouched")
            return False
        if request.volume_id is not None:
            holder = self.state.claim(request.volume_id, "the Segment step")
            if holder is not None:
                self._report(f"{holder} is predicting this volume; wait for it to finish",
                             error=True)  # fmt: skip
                return False
        self._names = names
        if request.overwrite:
            # the store is about to be rewritten: layers reading it would show a half-run
            self._remove_result_layers(names)
        self._geometry = {
            "name": layer.name,
            "scale": tuple(layer.scale),
            "translate": tuple(layer.translate),
            "units": tuple(layer.units),
            "axis_labels": tuple(layer.axis_labels),
            "metadata": {
                k: v for k, v in layer.metadata.items() if k in ("affine", "spacing", "axes")
            },
            "source": request.volume.source,
            "modality": request.volume.modality,
        }
        self._volume_id = request.volume_id
        self.result = None
        self._set_busy(True)
        self.summary_label.setText("")
        model = f"model {label}" if project is not None else request.model
        self.status_label.setText(f"segmenting {layer.name} with {model}…")
        self._job_kind = "segment"

        def work(progress: ProgressCallback, cancel: CancelToken) -> SegmentResult:
            return run_segmentation(request, progress, cancel, count=False)

        self.job.start(work, f"Segmenting {layer.name}")
        return True

    def cancel(self) -> None:
        """Stop the running segmentation within one batch; finished chunks are kept."""
        self.job.cancel()
        self.cancel_button.setEnabled(False)
        self.status_label.setText("cancelling…")

    def _on_succeeded(self, value: Any) -> None:
        if self._job_kind == "segment":
            self.state.release(self._volume_id)
            self._show_segmentation(value)
        else:
            self._set_busy(False)
            self._show_ranking(*value)

    def _on_failed(self, message: str) -> None:
        if self._job_kind == "segment":
            self.state.release(self._volume_id)
        self._set_busy(False)
        self._report(message, error=True)

    def _on_cancelled(self) -> None:
        if self._job_kind == "segment":
            self.state.release(self._volume_id)
        self._set_busy(False)
        self._report("segmentation cancelled; finished chunks are kept, Segment resumes")

    def _remove_result_layers(self, names: dict[str, str]) -> None:
        for name in names.values():
            layer = find_layer(self.viewer, name)
            if layer is not None and not has_unsaved_edits(layer):
                self.viewer.layers.remove(layer)

    def _put_layer(self, name: str, data, kind: str, **kwargs) -> Image | Labels:
        """Add the layer, or give an existing one of that name the new data (keeps display).

        The layer comes back hidden: a hidden layer is not sliced, so building it and reading
        its first slice (a ``show`` step later) happen in different event-loop turns.
        """
        existing = find_layer(self.viewer, name)
        kwargs["visible"] = False
        multiscale = isinstance(data, list)
        kwargs["multiscale"] = multiscale
        if isinstance(existing, Labels if kind == "labels" else Image) and (
            existing.multiscale == multiscale
        ):
            existing.visible = False
            existing.data = data
            existing.metadata = kwargs["metadata"]
            if "contrast_limits" in kwargs:
                existing.contrast_limits = kwargs["contrast_limits"]
            return existing  # (a layer cannot turn multiscale: then it is built anew)
        if existing is not None:
            self.viewer.layers.remove(existing)
        add = self.viewer.add_labels if kind == "labels" else self.viewer.add_image
        return add(data, name=name, **kwargs)

    def _show_segmentation(self, result: SegmentResult) -> None:
        """Replace the earlier run's layers with this one's, one layer per event-loop turn."""
        self.result = result
        geometry = self._geometry
        group = open_prediction(result.out)
        metadata = {
            **geometry["metadata"],
            "napari_pvs": True,
            "source": geometry["source"],
            "modality": geometry["modality"],
            PREDICTION_KEY: str(result.out),
            MODEL_KEY: result.model,
        }
        if self._volume_id is not None:
            metadata[VOLUME_KEY] = self._volume_id
        common = {k: geometry[k] for k in ("scale", "translate", "units", "axis_labels")}
        names = self._names
        wanted = [a for a in result.arrays if a in ("segmentation", "probability")]
        if self.uncertainty_check.isChecked():
            wanted += [a for a in result.arrays if a in UNCERTAINTY_DISPLAY]
        # the earlier run's layers this run does not replace are stale: they go
        stale = [
            layer
            for key, layer in self.result_layers.items()
            if key not in wanted and layer in self.viewer.layers and not has_unsaved_edits(layer)
        ]
        for layer in stale:
            self.viewer.layers.remove(layer)
        self.result_layers = {}
        if self.standalone:
            self._clear_ranking()

        def add(array: str) -> None:
            # a large prediction is drawn from its display levels (see Predictor.display_edge)
            levels = prediction_levels(group, array, result.out, display=True)
            # one level: dask, which a labels layer can be painted over (on the first stroke
            # it becomes numpy); several: display views napari reads directly (read-only)
            data = levels if len(levels) > 1 else levels[0].to_dask()
            if array == "segmentation":
                layer = self._put_layer(
                    names[array], data, "labels", metadata=dict(metadata), **common
                )
                layer.metadata.pop(EDITED_KEY, None)
                layer.brush_size = int(self.state.settings()["brush_size"])
                layer.selected_label = 1
                track_edits(layer)
            elif array == "probability":
                layer = self._put_layer(
                    names[array],
                    as_float32(data),
                    "image",
                    metadata=dict(metadata),
                    contrast_limits=(0.0, 1.0),
                    colormap="inferno",
                    blending="additive",
                    opacity=0.7,
                    **common,
                )
            else:
                _, limits = UNCERTAINTY_DISPLAY[array]
                layer = self._put_layer(
                    names[array],
                    as_float32(data),
                    "image",
                    metadata=dict(metadata),
                    contrast_limits=limits,
                    colormap="viridis",
                    **common,
                )
            self.result_layers[array] = layer

        def show(array: str) -> None:
            layer = self.result_layers.get(array)
            if layer is not None and layer in self.viewer.layers:
                layer.visible = True

        steps = []
        for array in ("probability", "segmentation"):
            if array in wanted:
                steps += [lambda a=array: add(a), lambda a=array: show(a)]
        # uncertainty layers stay hidden (not sliced) until the user shows one
        steps += [lambda a=array: add(a) for array in wanted if array in UNCERTAINTY_DISPLAY]
        steps.append(lambda: self._finish_segmentation(result))
        self.staged.run(steps)

    def _finish_segmentation(self, result: SegmentResult) -> None:
        """The layers are on screen: say so, then count PVS (the panel is busy until then)."""
        segmentation = self.result_layers.get("segmentation")
        if segmentation is not None:
            self.viewer.layers.selection.active = segmentation  # a visible layer, ready to paint
        self._show_summary(result)
        message = f"segmented {self._geometry['name']} with model {result.model} -> {result.out}"
        if segmentation is not None and segmentation.multiscale:
            message += (
                f"; shown at {len(segmentation.data)} scales, it is too large to paint in "
                "place: correct it patch by patch in the Review step"
            )
        self._report(message, warning=bool(result.notes))
        out = result.out
        self.count_job.start(lambda progress, cancel: pvs_statistics(out), "Counting PVS")

    def _on_counted(self, counts: tuple[int, float, int | None]) -> None:
        self._set_busy(False)
        result = self.result
        if result is None:
            return
        result.pvs_voxels, result.pvs_volume_mm3, result.pvs_count = counts
        self._show_summary(result)
        if self._volume_id is not None and result.version is not None:
            self.state.pvs_counts[(self._volume_id, result.version)] = result.pvs_count
            self.state.predictions_changed.emit(self._volume_id)

    def _on_count_failed(self, message: str) -> None:
        self._set_busy(False)
        self._report(message, error=True)

    def _show_summary(self, result: SegmentResult) -> None:
        summary = result.summary
        if result.pvs_voxels is None:
            pvs = "counting PVS…"
        else:
            count = result.pvs_count if result.pvs_count is not None else "not counted (too large)"
            pvs = f"{count} PVS, {result.pvs_volume_mm3:.1f} mm³ ({result.pvs_voxels} voxels)"
        if result.device:
            text = f"{pvs}; model {result.model}, {result.seconds:.1f} s on {result.device}"
        else:
            text = f"{pvs}; model {result.model}, its stored prediction (nothing recomputed)"
        if summary is not None:
            text += f"; {summary.windows_run}/{summary.windows_total} windows"
            if summary.chunks_skipped:
                text += f" (resumed: {summary.chunks_skipped}/{summary.chunks_total} chunks kept)"
        self.summary_label.setText("\n".join([text, *result.notes]))

    # ---------------------------------------------------------------- ranking (standalone)
    def _clear_ranking(self) -> None:
        self.ranking, self.ranking_files = [], None
        fill_table(self.table, [])
        outline = find_layer(self.viewer, "ranked patch")
        if outline is not None:
            self.viewer.layers.remove(outline)

    def rank(self) -> bool:
        """Rank patches of the chosen layer's prediction in the background."""
        if self.is_running():
            self._report("a segmentation or ranking is already running", error=True)
            return False
        layer, store = self.current_layer(), self.output_path()
        if layer is None or store is None or not store.exists():
            self._report("no prediction for this image yet; press Segment first", error=True)
            return False
        strategy = self.strategy_combo.currentText()
        n, patch = self.n_spin.value(), self.patch_spin.value()
        self.state.update_settings(strategy=strategy, patch=patch, n=n)
        self._ranking_geometry = {
            "scale": tuple(layer.scale),
            "translate": tuple(layer.translate),
            "units": tuple(layer.units),
            "n": n,
            "patch": patch,
        }
        self._set_busy(True)
        self.cancel_button.setEnabled(False)  # ranking is short and takes no cancel token
        self.status_label.setText(f"ranking {n} patches by {strategy}…")
        self._job_kind = "rank"

        image = as_dask(layer.data[0] if layer.multiscale else layer.data)  # skips air

        def work(progress: ProgressCallback, cancel: CancelToken):
            table = rank_patches(store, n=n, patch=patch, strategy=strategy, image=image)
            # re-ranking replaces the panel's own ranking files
            return table, save_ranking(table, store, overwrite=True), tuple(image.shape)

        self.job.start(work, f"Ranking patches ({strategy})")
        return True

    def _show_ranking(
        self, table: list[RankedPatch], files: tuple[Path, Path], shape: tuple[int, ...]
    ) -> None:
        self.ranking, self.ranking_files = list(table), files
        rows = [
            [
                patch.rank,
                f"{patch.score:.3g}",
                ", ".join(f"{c:g}" for c in patch.centre),
                patch.predicted_pvs,
            ]
            for patch in table
        ]
        tips = [
            f"{SCORE_MEANINGS[p.strategy]}\ncentre {', '.join(f'{c:.1f}' for c in p.centre_mm)} mm"
            for p in table
        ]
        fill_table(self.table, rows, tips)
        message = f"{len(table)} patches ranked; saved {files[0].name} and {files[1].name}"
        why = shortfall_message(
            len(table), self._ranking_geometry["n"], shape, self._ranking_geometry["patch"]
        )
        self._report(f"{message}. {why}" if why else message, warning=bool(why))

    def _on_row_selected(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if rows:
            self.go_to_patch(rows[0].row())

    def go_to_patch(self, row: int) -> np.ndarray:
        """Zoom the view to ranked patch ``row`` and outline it; returns its centre (world)."""
        patch = self.ranking[row]
        scale = self._ranking_geometry["scale"]
        translate = self._ranking_geometry["translate"]
        _, world = box_world(patch.bbox_start, patch.bbox_stop, scale, translate)
        extent = (np.asarray(patch.bbox_stop) - patch.bbox_start) * np.asarray(scale[-3:])
        active = self.viewer.layers.selection.active
        outline = show_box(self.viewer, "ranked patch", patch.bbox_start, patch.bbox_stop,
                           scale, translate)  # fmt: skip
        zoom_to(self.viewer, world, extent)
        segmentation = self.result_layers.get("segmentation")
        if active is None or active is outline or not active.visible:
            active = segmentation if segmentation in self.viewer.layers else None
        if active is not None:
            self.viewer.layers.selection.active = active  # keep annotating where the user was
        self.status_label.setText(
            f"patch {patch.rank}: score {patch.score:.4f}, {patch.predicted_pvs} predicted PVS"
        )
        return world

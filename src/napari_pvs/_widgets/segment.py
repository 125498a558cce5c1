"""The "Segment PVS" panel: run a model over an image layer and review the patches it is least
sure about.

A thin Qt adapter. The work is the core's: :class:`napari_pvs.inference.Predictor` writes a
resumable prediction store chunk by chunk (off the GUI thread, via
:class:`~napari_pvs._widgets._jobs.BackgroundJob`), the result comes back as lazy layers read
from that store, :func:`napari_pvs.metrics.label_clusters` counts the PVS, and
:func:`napari_pvs.ranking.rank_patches` / :func:`~napari_pvs.ranking.save_ranking` build the
annotation queue, kept as the core's list of :class:`~napari_pvs.ranking.RankedPatch` (the Qt
table only shows it).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
from napari.layers import Image, Labels, Shapes
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_pvs import io
from napari_pvs._widgets._jobs import BackgroundJob, run_cancel_row
from napari_pvs.cohort import modality_warning, output_name
from napari_pvs.inference import DEFAULT_WINDOW, PredictionSummary, Predictor
from napari_pvs.io import open_prediction
from napari_pvs.metrics import label_clusters
from napari_pvs.progress import CancelToken, ProgressCallback
from napari_pvs.ranking import DEFAULT_PATCH, STRATEGIES, RankedPatch, rank_patches, save_ranking

if TYPE_CHECKING:
    import napari

MODALITY_CHOICES = ("T1", "T2", "unknown")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
#: Counting clusters labels the whole mask in memory (5 bytes per voxel); above this many
#: voxels only the PVS volume (streamed) is reported and the per-patch counts of the ranking
#: table remain.
MAX_COUNT_VOXELS = 256**3
#: Metadata key marking layers made from a prediction store (value: the store path).
PREDICTION_KEY = "prediction"
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


@dataclass
class SegmentResult:
    """What a run produced: the store, the predictor's summary, PVS count/volume, notes."""

    out: Path
    summary: PredictionSummary
    device: str
    pvs_voxels: int
    pvs_volume_mm3: float
    pvs_count: int | None
    notes: list[str] = field(default_factory=list)


def layer_volume(layer: Image, modality: str) -> io.Volume:
    """The image layer as an :class:`io.Volume` (finest level, geometry from its metadata)."""
    data = layer.data[0] if layer.multiscale else layer.data
    if layer.rgb or getattr(data, "ndim", 0) != 3:
        raise ValueError(
            f"layer {layer.name!r} has shape {tuple(data.shape)}; PVS segmentation needs a "
            "single-channel 3D volume (open one with the napari-pvs reader)"
        )
    meta = layer.metadata
    scale = [float(s) for s in layer.scale[-3:]]
    affine = meta.get("affine")
    if affine is None:
        affine = np.diag([*scale, 1.0])
        affine[:3, 3] = layer.translate[-3:]
    return io.Volume(
        data=data,
        spacing=tuple(float(s) for s in meta.get("spacing", scale)),  # type: ignore[arg-type]
        affine=np.asarray(affine, dtype=np.float64),
        modality=io.normalize_modality(modality),
        source=meta.get("source") or layer.source.path,
        axes=tuple(meta.get("axes", ("z", "y", "x"))),  # type: ignore[arg-type]
    )


def default_output(layer: Image, scratch: Path) -> Path:
    """``<name>_pvs.zarr`` next to the layer's file, or in ``scratch`` for in-memory layers."""
    source = layer.metadata.get("source") or layer.source.path
    if source:
        source = Path(str(source).rstrip("/"))
        return source.parent / (output_name(source)[: -len(".zarr")] + "_pvs.zarr")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", layer.name).strip("_") or "image"
    return scratch / f"{safe}_pvs.zarr"


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


def run_segmentation(
    request: SegmentRequest, progress: ProgressCallback, cancel: CancelToken
) -> SegmentResult:
    """Load the model, predict into the store (resuming a compatible partial one), count PVS."""
    from napari_pvs.models.checkpoint import load_model

    device, note = resolve_device_noting(request.device)
    notes = [note] if note else []
    progress(0, 0, "loading model")
    model, metadata = load_model(request.model, device=str(device))
    warning = modality_warning(metadata, request.volume.modality)
    if warning:
        notes.append(warning)
    predictor = Predictor(
        model,
        window=request.window,
        batch=request.batch,
        device=device,
        mc_samples=request.mc_samples,
        tta=request.tta,
        modality=request.volume.modality,
    )
    try:
        summary = predictor.predict(
            request.volume, request.out, progress, cancel, overwrite=request.overwrite
        )
    except ValueError as exc:
        if "different run" in str(exc):
            raise ValueError(f"{exc} — in this panel: tick 'Overwrite'") from exc
        raise
    progress(0, 0, "counting PVS")
    voxels, volume_mm3, count = pvs_statistics(request.out)
    return SegmentResult(request.out, summary, str(device), voxels, volume_mm3, count, notes)


def patch_outline(patch: RankedPatch) -> list[np.ndarray]:
    """The patch box as one rectangle per slice of its first axis (pixel edges, data coords)."""
    (z0, y0, x0), (z1, y1, x1) = patch.bbox_start, patch.bbox_stop
    lo_y, hi_y, lo_x, hi_x = y0 - 0.5, y1 - 0.5, x0 - 0.5, x1 - 0.5
    return [
        np.array([[z, lo_y, lo_x], [z, lo_y, hi_x], [z, hi_y, hi_x], [z, hi_y, lo_x]], float)
        for z in range(z0, z1)
    ]


# ------------------------------------------------------------------ the panel
class SegmentPanel(QWidget):
    """Dock widget: segment PVS with the default (or a chosen) model, then rank patches."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.job = BackgroundJob(self)
        self.job.succeeded.connect(self._on_succeeded)
        self.job.failed.connect(self._on_failed)
        self.job.cancelled.connect(self._on_cancelled)
        self._scratch: Path | None = None
        #: the last segmentation run, and the ranking (the core's rows; the table shows them)
        self.result: SegmentResult | None = None
        self.ranking: list[RankedPatch] = []
        self.ranking_files: tuple[Path, Path] | None = None
        self._geometry: dict[str, Any] = {}  # layer name, scale, translate, metadata of the run
        self._ranking_geometry: dict[str, Any] = {}
        self._job_kind = "segment"
        self.result_layers: dict[str, Image | Labels] = {}

        layout = QVBoxLayout(self)
        layout.addWidget(self._build_segment_box())
        layout.addWidget(self._build_rank_box())
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)

        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()

    # ---------------------------------------------------------------- building
    def _build_segment_box(self) -> QGroupBox:
        box = QGroupBox("Segment PVS")
        form = QFormLayout(box)
        self.layer_combo = QComboBox()
        self.layer_combo.currentTextChanged.connect(self._on_layer_changed)
        form.addRow("Image", self.layer_combo)

        self.model_edit = QLineEdit("default")
        self.model_edit.setToolTip("'default' (the bundled model) or a .safetensors checkpoint")
        self.model_button = QPushButton("Browse…")
        self.model_button.clicked.connect(self._browse_model)
        row = QHBoxLayout()
        row.addWidget(self.model_edit, 1)
        row.addWidget(self.model_button)
        form.addRow("Model", row)

        self.modality_combo = QComboBox()
        self.modality_combo.addItems(MODALITY_CHOICES)
        self.modality_combo.setToolTip("Contrast the model is told (from the layer; editable)")
        self.modality_combo.currentTextChanged.connect(self._set_modality)
        form.addRow("Modality", self.modality_combo)

        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICE_CHOICES)
        self.device_combo.setToolTip("auto: CUDA if available, else CPU (with a message)")
        form.addRow("Device", self.device_combo)

        self.mc_spin = QSpinBox()
        self.mc_spin.setRange(0, 64)
        self.mc_spin.setToolTip("Monte Carlo dropout samples for uncertainty (0 = off)")
        form.addRow("MC samples", self.mc_spin)
        self.tta_combo = QComboBox()
        for label, count in TTA_CHOICES.items():
            self.tta_combo.addItem(label, count)
        self.tta_combo.setToolTip(
            "Average the prediction over mirrored copies of each window: sharper thin PVS, one "
            "network pass per mirroring; the model's rule was calibrated on held-out phantoms"
        )
        form.addRow("Test-time flips", self.tta_combo)

        self.window_spin = QSpinBox()
        self.window_spin.setRange(16, 512)
        self.window_spin.setSingleStep(16)
        self.window_spin.setValue(DEFAULT_WINDOW)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(0, 256)
        self.batch_spin.setSpecialValueText("auto")  # 0: the core's default for the device
        self.batch_spin.setValue(0)
        row = QHBoxLayout()
        row.addWidget(QLabel("window"))
        row.addWidget(self.window_spin)
        row.addWidget(QLabel("batch"))
        row.addWidget(self.batch_spin)
        form.addRow("Sliding window", row)

        self.output_edit = QLineEdit()
        self.output_button = QPushButton("Browse…")
        self.output_button.setToolTip("Folder for the prediction store")
        self.output_button.clicked.connect(self._browse_output)
        row = QHBoxLayout()
        row.addWidget(self.output_edit, 1)
        row.addWidget(self.output_button)
        form.addRow("Output", row)
        self.overwrite_check = QCheckBox("Overwrite a prediction made with other settings")
        form.addRow(self.overwrite_check)

        row, self.segment_button, self.cancel_button = run_cancel_row(
            "Segment", self.segment, self.cancel
        )
        form.addRow(row)
        self.summary_label = QLabel("")
        self.summary_label.setWordWrap(True)
        self.summary_label.setMinimumHeight(2 * self.summary_label.fontMetrics().height() + 4)
        form.addRow(self.summary_label)
        return box

    def _build_rank_box(self) -> QGroupBox:
        box = QGroupBox("Rank patches for review")
        form = QFormLayout(box)
        self.strategy_combo = QComboBox()
        self.strategy_combo.addItems(STRATEGIES)
        self.strategy_combo.setToolTip("bald needs MC samples or flips at segmentation time")
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
        self.table = QTableWidget(0, 5)
        self.table.setHorizontalHeaderLabels(["rank", "score", "centre (voxel)", "mm", "PVS"])
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.table.setMinimumHeight(180)
        self.table.itemSelectionChanged.connect(self._on_row_selected)
        form.addRow(self.table)
        return box

    # ---------------------------------------------------------------- layers and fields
    def _report(self, message: str, error: bool = False, warning: bool = False) -> None:
        self.status_label.setText(message)
        (show_error if error else show_warning if warning else show_info)(message)

    def _input_layers(self) -> list[Image]:
        return [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, Image) and PREDICTION_KEY not in layer.metadata
        ]

    def _refresh_layers(self, event=None) -> None:
        current = self.layer_combo.currentText()
        names = [layer.name for layer in self._input_layers()]
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        if current in names:
            self.layer_combo.setCurrentText(current)
        self.layer_combo.blockSignals(False)
        if self.layer_combo.currentText() != current:
            self._on_layer_changed()

    def current_layer(self) -> Image | None:
        name = self.layer_combo.currentText()
        return next((layer for layer in self._input_layers() if layer.name == name), None)

    def _on_layer_changed(self, *args) -> None:
        layer = self.current_layer()
        self.output_edit.clear()
        if layer is None:
            self.output_edit.setPlaceholderText("")
            return
        self.output_edit.setPlaceholderText(str(default_output(layer, self._scratch_dir())))
        modality = str(layer.metadata.get("modality", "unknown"))
        self.modality_combo.blockSignals(True)
        self.modality_combo.setCurrentText(modality if modality in MODALITY_CHOICES else "unknown")
        self.modality_combo.blockSignals(False)

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
        """The prediction store for the chosen layer: the Output field, else the default."""
        layer = self.current_layer()
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
        for widget in (self.segment_button, self.rank_button):
            widget.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)

    def is_running(self) -> bool:
        return self.job.is_running()

    # ---------------------------------------------------------------- segmentation
    def segment(self) -> bool:
        """Start segmenting the chosen layer in the background; False if it could not start."""
        if self.job.is_running():
            self._report("a segmentation or ranking is already running", error=True)
            return False
        layer = self.current_layer()
        if layer is None:
            self._report("no image layer to segment; open a volume or a sample first", error=True)
            return False
        try:
            request = SegmentRequest(
                volume=layer_volume(layer, self.modality_combo.currentText()),
                model=self.model_edit.text().strip() or "default",
                out=self.output_path(),  # type: ignore[arg-type]
                device=self.device_combo.currentText(),
                mc_samples=self.mc_spin.value(),
                tta=self.tta_combo.currentData(),
                window=self.window_spin.value(),
                batch=self.batch_spin.value() or None,
                overwrite=self.overwrite_check.isChecked(),
            )
        except ValueError as exc:
            self._report(str(exc), error=True)
            return False
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
        self.result = None
        self._set_busy(True)
        self.summary_label.setText("")
        self.status_label.setText(f"segmenting {layer.name} with {request.model}…")
        self._job_kind = "segment"

        def work(progress: ProgressCallback, cancel: CancelToken) -> SegmentResult:
            return run_segmentation(request, progress, cancel)

        self.job.start(work, f"Segmenting {layer.name}")
        return True

    def cancel(self) -> None:
        """Stop the running segmentation within one batch; finished chunks are kept."""
        self.job.cancel()
        self.cancel_button.setEnabled(False)
        self.status_label.setText("cancelling…")

    def _on_succeeded(self, value: Any) -> None:
        self._set_busy(False)
        if self._job_kind == "segment":
            self._show_segmentation(value)
        else:
            self._show_ranking(*value)

    def _on_failed(self, message: str) -> None:
        self._set_busy(False)
        self._report(message, error=True)

    def _on_cancelled(self) -> None:
        self._set_busy(False)
        self._report("segmentation cancelled; finished chunks are kept, Segment resumes")

    def _put_layer(self, name: str, data, kind: str, **kwargs) -> Image | Labels:
        """Add the layer, or give an existing one of that name the new data (keeps display)."""
        existing = next((layer for layer in self.viewer.layers if layer.name == name), None)
        if isinstance(existing, Labels if kind == "labels" else Image):
            existing.data = data
            existing.metadata = kwargs["metadata"]
            return existing
        if existing is not None:
            self.viewer.layers.remove(existing)
        add = self.viewer.add_labels if kind == "labels" else self.viewer.add_image
        return add(data, name=name, **kwargs)

    def _show_segmentation(self, result: SegmentResult) -> None:
        self.result = result
        geometry = self._geometry
        group = open_prediction(result.out)
        metadata = {
            **geometry["metadata"],
            "napari_pvs": True,
            "source": geometry["source"],
            "modality": geometry["modality"],
            PREDICTION_KEY: str(result.out),
        }
        common = {k: geometry[k] for k in ("scale", "translate", "units", "axis_labels")}
        base = geometry["name"]
        self.result_layers = {}
        for array in result.summary.arrays:
            data = da.from_zarr(group[array])
            if array == "segmentation":
                layer = self._put_layer(
                    f"{base} PVS segmentation", data, "labels", metadata=metadata, **common
                )
            elif array == "probability":
                layer = self._put_layer(
                    f"{base} PVS probability",
                    data.astype(np.float32),
                    "image",
                    metadata=metadata,
                    contrast_limits=(0.0, 1.0),
                    colormap="inferno",
                    blending="additive",
                    opacity=0.7,
                    **common,
                )
            else:
                title, limits = UNCERTAINTY_DISPLAY.get(array, (array, (0.0, 1.0)))
                layer = self._put_layer(
                    f"{base} PVS {title}",
                    data.astype(np.float32),
                    "image",
                    metadata=metadata,
                    contrast_limits=limits,
                    colormap="viridis",
                    visible=False,
                    **common,
                )
            self.result_layers[array] = layer
        summary = result.summary
        count = "not counted (volume too large)" if result.pvs_count is None else result.pvs_count
        text = (
            f"{count} PVS, {result.pvs_volume_mm3:.1f} mm³ ({result.pvs_voxels} voxels); "
            f"{summary.windows_run}/{summary.windows_total} windows in {summary.seconds:.1f} s "
            f"on {result.device}"
        )
        if summary.chunks_skipped:
            text += f" (resumed: {summary.chunks_skipped}/{summary.chunks_total} chunks kept)"
        self.summary_label.setText("\n".join([text, *result.notes]))
        self._report(f"segmented {base} -> {result.out}", warning=bool(result.notes))

    # ---------------------------------------------------------------- ranking
    def rank(self) -> bool:
        """Rank patches of the chosen layer's prediction in the background."""
        if self.job.is_running():
            self._report("a segmentation or ranking is already running", error=True)
            return False
        layer, store = self.current_layer(), self.output_path()
        if layer is None or store is None or not store.exists():
            self._report("no prediction for this image yet; press Segment first", error=True)
            return False
        strategy, n, patch = self.strategy_combo.currentText(), self.n_spin.value(), (
            self.patch_spin.value()
        )
        self._ranking_geometry = {
            "scale": tuple(layer.scale),
            "translate": tuple(layer.translate),
            "units": tuple(layer.units),
        }
        self._set_busy(True)
        self.cancel_button.setEnabled(False)  # ranking is short and takes no cancel token
        self.status_label.setText(f"ranking {n} patches by {strategy}…")
        self._job_kind = "rank"

        image = layer.data[0] if layer.multiscale else layer.data  # skips patches of air

        def work(progress: ProgressCallback, cancel: CancelToken):
            table = rank_patches(store, n=n, patch=patch, strategy=strategy, image=image)
            return table, save_ranking(table, store, overwrite=True)  # re-ranking replaces its own

        self.job.start(work, f"Ranking patches ({strategy})")
        return True

    def _show_ranking(self, table: list[RankedPatch], files: tuple[Path, Path]) -> None:
        self.ranking, self.ranking_files = list(table), files
        self.table.blockSignals(True)
        self.table.setRowCount(len(table))
        for row, patch in enumerate(table):
            cells = [
                str(patch.rank),
                f"{patch.score:.3g}",
                ", ".join(f"{c:g}" for c in patch.centre),
                ", ".join(f"{c:.1f}" for c in patch.centre_mm),
                str(patch.predicted_pvs),
            ]
            for column, text in enumerate(cells):
                self.table.setItem(row, column, QTableWidgetItem(text))
        self.table.blockSignals(False)
        self._report(f"{len(table)} patches ranked; saved {files[0].name} and {files[1].name}")

    def _on_row_selected(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if rows:
            self.go_to_patch(rows[0].row())

    def go_to_patch(self, row: int) -> np.ndarray:
        """Move the view to ranked patch ``row``'s centre and outline it; returns the centre
        in world coordinates."""
        patch = self.ranking[row]
        scale = np.asarray(self._ranking_geometry["scale"][-3:], dtype=float)
        translate = np.asarray(self._ranking_geometry["translate"][-3:], dtype=float)
        world = np.asarray(patch.centre) * scale + translate
        self.viewer.dims.set_point(range(self.viewer.dims.ndim - 3, self.viewer.dims.ndim), world)
        self.viewer.scene.camera.center = tuple(world)
        outline = patch_outline(patch)
        name = "ranked patch"
        layer = next((lyr for lyr in self.viewer.layers if lyr.name == name), None)
        active = self.viewer.layers.selection.active
        if isinstance(layer, Shapes):
            layer.data = []
            layer.scale, layer.translate = scale, translate
        else:
            if layer is not None:
                self.viewer.layers.remove(layer)
            layer = self.viewer.add_shapes(
                name=name,
                ndim=3,
                scale=scale,
                translate=translate,
                units=self._ranking_geometry["units"][-3:],
                edge_width=1,
            )
        layer.add_rectangles(outline, edge_color="yellow", face_color="transparent", edge_width=1)
        if active is not None and active is not layer:
            self.viewer.layers.selection.active = active  # keep annotating where the user was
        self.status_label.setText(
            f"patch {patch.rank}: score {patch.score:.4f}, {patch.predicted_pvs} predicted PVS"
        )
        return world

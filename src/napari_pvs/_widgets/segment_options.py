"""The Segment panel's choices: which image, which model, how to predict and where to write.

:class:`SegmentOptions` is the form :class:`~napari_pvs._widgets.segment.SegmentPanel` builds
on: the image layer, the model (``default``, a checkpoint, or for a volume of the open project
its model version), modality, device, uncertainty layers and the advanced prediction settings
(MC samples, test-time flips, window, batch, output store, overwrite). It keeps the fields in
step with the viewer's layers and the project's settings and turns them into a
:class:`~napari_pvs._widgets.segment_run.SegmentRequest`; running it is the panel's part.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from napari.layers import Image
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QWidget,
)
from superqt import QCollapsible

from napari_pvs import io
from napari_pvs._widgets._common import collapsed, set_combo_items
from napari_pvs._widgets._layers import default_output, input_image_layers, layer_volume
from napari_pvs._widgets.segment_run import SegmentRequest
from napari_pvs._widgets.state import WorkflowState
from napari_pvs.models import PREDICTION_DEFAULTS

if TYPE_CHECKING:
    import napari

MODALITY_CHOICES = ("T1", "T2", "unknown")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
#: Test-time flip choices shown in the panel -> ``Predictor(tta=...)``.
TTA_CHOICES: dict[str, int | None] = {
    "model's rule": None,
    "none": 1,
    "4 mirrorings": 4,
    "8 mirrorings": 8,
}


class SegmentOptions(QWidget):
    """The fields of a segmentation run; :class:`SegmentPanel` adds running it.

    ``state`` is the workflow's shared state (a fresh one, without a project, when the panel
    is opened on its own).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, state: WorkflowState | None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = state or WorkflowState(napari_viewer, parent=self)
        self._scratch: Path | None = None

    # ---------------------------------------------------------------- building
    def _add_option_rows(self, form: QFormLayout) -> None:
        """Image, Model, Modality, Device, Uncertainty layers and the collapsed Advanced rows."""
        self._add_source_rows(form)
        self._add_run_rows(form)
        form.addRow(self._build_advanced())

    def _add_source_rows(self, form: QFormLayout) -> None:
        """What is segmented with what: the image layer, and a checkpoint or project version."""
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

    def _add_run_rows(self, form: QFormLayout) -> None:
        """What the model is told (modality), where it runs, whether uncertainty is shown."""
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

    def _build_advanced(self) -> QCollapsible:
        """The prediction settings most runs leave alone, closed until asked for."""
        advanced = QWidget()
        adv = QFormLayout(advanced)
        adv.setContentsMargins(0, 0, 0, 0)
        self.mc_spin = QSpinBox()
        self.mc_spin.setRange(0, 64)
        self.mc_spin.setValue(PREDICTION_DEFAULTS["mc_samples"])
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
        self.window_spin.setValue(PREDICTION_DEFAULTS["window"])
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
        return self.advanced

    # ---------------------------------------------------------------- fields
    def _follow_fields(self) -> None:
        """Keep the fields in step with the viewer's layers, the project and its settings."""
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self.state.project_changed.connect(self._on_layer_changed)
        self.state.volumes_changed.connect(self._on_layer_changed)
        self.state.versions_changed.connect(self._refresh_versions)
        self.state.settings_changed.connect(self._apply_settings)
        self._refresh_layers()
        self._apply_settings()

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
        record = self.current_volume()  # a project volume: its stored contrast
        modality = record.modality if record else str(layer.metadata.get("modality", "unknown"))
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

    def _apply_settings(self) -> None:
        settings = self.state.settings()
        self.device_combo.blockSignals(True)
        self.device_combo.setCurrentText(str(settings["device"]))
        self.device_combo.blockSignals(False)
        if self.state.project is not None:  # the project's prediction settings
            self.mc_spin.setValue(int(settings["predict_mc"]))
            tta = settings["predict_tta"]
            counts = [self.tta_combo.itemData(i) for i in range(self.tta_combo.count())]
            if tta in counts:
                self.tta_combo.setCurrentIndex(counts.index(tta))

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

    def segment_request(self, layer: Image) -> SegmentRequest:
        """What the fields ask for on ``layer``: for a project volume, its prediction by the
        chosen version; ValueError when the layer cannot be segmented (not a 3D volume)."""
        volume_record = self.current_volume()
        project = self.state.project if volume_record is not None else None
        version = self.version_combo.currentData() if project is not None else None
        volume = layer_volume(layer, self.modality_combo.currentText())
        return SegmentRequest(
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

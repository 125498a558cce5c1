"""The volume panel: open a volume, see its geometry, set its modality, convert NIfTI to
OME-Zarr in the background, and save a labels layer. Qt only; all work is done by the core
(:mod:`napari_pvs.io`) and the reader/writer adapters, off the GUI thread: Convert in ``job``,
Open (the store's metadata, a contrast sample) and Save (a whole labels volume) in ``io_job``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Image, Labels, Layer
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
from napari_pvs._reader import volume_layer_data
from napari_pvs._widgets._common import Ask, ask_with_dialog, notify
from napari_pvs._widgets._jobs import BackgroundJob, run_cancel_row
from napari_pvs._writer import existing_label_target, save_labels
from napari_pvs.display import as_dask

if TYPE_CHECKING:
    import napari

MODALITY_CHOICES = ("T1", "T2", "unknown")


class VolumePanel(QWidget):
    """Dock widget for opening, inspecting, converting volumes and saving labels."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, ask: Ask | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        #: how the panel asks before replacing a label image (a policy in tests)
        self.ask: Ask = ask or ask_with_dialog
        self.job = BackgroundJob(self)
        self.job.succeeded.connect(self._on_convert_finished)
        self.job.failed.connect(self._on_convert_failed)
        self.job.cancelled.connect(self._on_convert_cancelled)
        # Open and Save read and write stores: here, one at a time, never on the GUI thread
        self.io_job = BackgroundJob(self)
        self.io_job.succeeded.connect(self._on_io_done)
        self.io_job.failed.connect(self._on_io_failed)
        self._after_io = None
        #: the layers the last Open added; the path the last Save wrote
        self.opened: list[Layer] = []
        self.saved: str | None = None

        layout = QVBoxLayout(self)
        layout.addWidget(self._build_open_box())
        layout.addWidget(self._build_info_box())
        layout.addWidget(self._build_convert_box())
        layout.addWidget(self._build_save_box())
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)
        layout.addStretch(1)

        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layer_choices)
        self.viewer.layers.selection.events.active.connect(self._on_active_layer)
        self._refresh_layer_choices()

    # ---------------------------------------------------------------- building
    def _build_open_box(self) -> QGroupBox:
        box = QGroupBox("Open volume")
        form = QFormLayout(box)
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("a .zarr folder or a .nii / .nii.gz file")
        self.file_button = QPushButton("File…")
        self.file_button.setToolTip("Choose a NIfTI file")
        self.file_button.clicked.connect(self._browse_file)
        self.folder_button = QPushButton("Folder…")
        self.folder_button.setToolTip("Choose a zarr / OME-Zarr folder")
        self.folder_button.clicked.connect(self._browse_folder)
        row = QHBoxLayout()
        row.addWidget(self.path_edit, 1)
        row.addWidget(self.file_button)
        row.addWidget(self.folder_button)
        form.addRow("Path", row)
        self.open_button = QPushButton("Open")
        self.open_button.clicked.connect(self.open_path)
        form.addRow(self.open_button)
        return box

    def _build_info_box(self) -> QGroupBox:
        box = QGroupBox("Volume")
        form = QFormLayout(box)
        self.volume_combo = QComboBox()
        self.volume_combo.currentTextChanged.connect(self._show_volume_info)
        form.addRow("Layer", self.volume_combo)
        self.info_label = QLabel("no volume")
        self.info_label.setWordWrap(True)
        form.addRow(self.info_label)
        self.modality_combo = QComboBox()
        self.modality_combo.addItems(MODALITY_CHOICES)
        self.modality_combo.setToolTip("The contrast the models are told the volume has")
        self.modality_combo.currentTextChanged.connect(self._set_modality)
        form.addRow("Modality", self.modality_combo)
        return box

    def _build_convert_box(self) -> QGroupBox:
        box = QGroupBox("Convert NIfTI to OME-Zarr")
        form = QFormLayout(box)
        self.output_edit = QLineEdit()
        self.output_edit.setPlaceholderText("output .zarr (default: next to the NIfTI)")
        form.addRow("Output", self.output_edit)
        self.levels_spin = QSpinBox()
        self.levels_spin.setRange(1, 8)
        self.levels_spin.setValue(3)
        form.addRow("Levels", self.levels_spin)
        self.chunks_spin = QSpinBox()
        self.chunks_spin.setRange(8, 512)
        self.chunks_spin.setValue(io.DEFAULT_CHUNK)
        form.addRow("Chunk size", self.chunks_spin)
        self.open_converted_check = QCheckBox("Open the result")
        self.open_converted_check.setChecked(True)
        form.addRow(self.open_converted_check)
        row, self.convert_button, self.cancel_button = run_cancel_row(
            "Convert", self.start_convert, self.cancel_convert
        )
        form.addRow(row)
        return box

    def _build_save_box(self) -> QGroupBox:
        box = QGroupBox("Save labels")
        form = QFormLayout(box)
        self.labels_combo = QComboBox()
        form.addRow("Labels layer", self.labels_combo)
        self.label_name_edit = QLineEdit("pvs")
        self.label_name_edit.setToolTip("Name under labels/ in the OME-Zarr")
        form.addRow("Name", self.label_name_edit)
        self.save_zarr_button = QPushButton("Save into the volume's OME-Zarr")
        self.save_zarr_button.clicked.connect(self.save_labels_to_volume)
        form.addRow(self.save_zarr_button)
        self.save_file_button = QPushButton("Save as file…")
        self.save_file_button.setToolTip("NIfTI (.nii/.nii.gz) with the volume's affine, or .zarr")
        self.save_file_button.clicked.connect(self.save_labels_as_file)
        form.addRow(self.save_file_button)
        return box

    # ---------------------------------------------------------------- helpers
    def _report(self, message: str, error: bool = False) -> None:
        notify(self.status_label, message, "error" if error else "info")

    def _image_layers(self) -> list[Image]:
        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    def _labels_layers(self) -> list[Labels]:
        return [layer for layer in self.viewer.layers if isinstance(layer, Labels)]

    def _refresh_layer_choices(self, event=None) -> None:
        for combo, layers in (
            (self.volume_combo, self._image_layers()),
            (self.labels_combo, self._labels_layers()),
        ):
            current = combo.currentText()
            names = [layer.name for layer in layers]
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            elif combo is self.labels_combo:
                # the layer a user saves is one they see and edit, never a hidden region map
                visible = [layer.name for layer in layers if layer.visible]
                edited = [n for n in visible if "segmentation" in n or "patch" in n]
                choice = (edited or visible or names or [""])[-1]
                combo.setCurrentText(choice)
            combo.blockSignals(False)
        self._show_volume_info()

    def _on_active_layer(self, event=None) -> None:
        layer = self.viewer.layers.selection.active
        if isinstance(layer, Image):
            self.volume_combo.setCurrentText(layer.name)
        elif isinstance(layer, Labels) and layer.visible:
            self.labels_combo.setCurrentText(layer.name)

    def _layer_named(self, name: str):
        return next((layer for layer in self.viewer.layers if layer.name == name), None)

    def current_volume_layer(self) -> Image | None:
        return self._layer_named(self.volume_combo.currentText())

    def current_labels_layer(self) -> Labels | None:
        return self._layer_named(self.labels_combo.currentText())

    def _show_volume_info(self, *args) -> None:
        layer = self.current_volume_layer()
        if layer is None:
            self.info_label.setText("no volume")
            return
        meta = layer.metadata
        shape = tuple(int(s) for s in (layer.data[0] if layer.multiscale else layer.data).shape)
        spacing = meta.get("spacing", tuple(float(s) for s in layer.scale))
        levels = meta.get("levels", [shape])
        lines = [
            f"shape {' x '.join(map(str, shape))} ({', '.join(meta.get('axes', ('z', 'y', 'x')))})",
            f"spacing {' x '.join(f'{s:.3g}' for s in spacing)} mm",
            f"levels {len(levels)}: " + ", ".join("x".join(map(str, lv)) for lv in levels),
            f"dtype {(layer.data[0] if layer.multiscale else layer.data).dtype}",
            f"source {meta.get('source') or '(in memory)'}",
        ]
        self.info_label.setText("\n".join(lines))
        modality = meta.get("modality", "unknown")
        self.modality_combo.blockSignals(True)
        self.modality_combo.setCurrentText(modality if modality in MODALITY_CHOICES else "unknown")
        self.modality_combo.blockSignals(False)

    def _set_modality(self, modality: str) -> None:
        layer = self.current_volume_layer()
        if layer is not None:
            layer.metadata["modality"] = io.normalize_modality(modality)
            self.status_label.setText(f"{layer.name}: modality set to {modality}")

    # ---------------------------------------------------------------- open
    def _browse_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Open NIfTI", self.path_edit.text(), "NIfTI (*.nii *.nii.gz)"
        )
        if path:
            self.path_edit.setText(path)

    def _browse_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open zarr folder", self.path_edit.text())
        if path:
            self.path_edit.setText(path)

    def is_busy(self) -> bool:
        """An Open or a Save runs in the panel's worker."""
        return self.io_job.is_running()

    def _start_io(self, work, description: str, after) -> bool:
        """Run ``work`` in ``io_job``, the Open and Save buttons disabled; ``after(result)``
        on the GUI thread when it succeeded."""
        if self.io_job.is_running():
            self._report("wait for the panel's open or save to finish", error=True)
            return False
        self._after_io = after
        self._enable_io(False)
        self.status_label.setText(f"{description}…")
        return self.io_job.start(lambda progress, cancel: work(), description)

    def _enable_io(self, enabled: bool) -> None:
        for button in (self.open_button, self.save_zarr_button, self.save_file_button):
            button.setEnabled(enabled)

    def _on_io_done(self, value) -> None:
        after, self._after_io = self._after_io, None
        self._enable_io(True)
        if after is not None:
            after(value)

    def _on_io_failed(self, message: str) -> None:
        self._after_io = None
        self._enable_io(True)
        self._report(message, error=True)

    def open_path(self) -> bool:
        """Open the path in the field as layers: read in ``io_job``, added on the GUI thread
        (``opened`` holds them). False when nothing started."""
        path = self.path_edit.text().strip()
        if not path:
            self._report("enter or choose a path first", error=True)
            return False
        return self._start_io(
            lambda: volume_layer_data(io.open_volume(path)),
            f"opening {path}",
            lambda layer_data: self._opened(path, layer_data),
        )

    def _opened(self, path: str, layer_data: list) -> None:
        self.opened = [self.viewer.add_layer(Layer.create(*data)) for data in layer_data]
        self.volume_combo.setCurrentText(self.opened[0].name)
        self._report(f"opened {path}")

    # ---------------------------------------------------------------- convert
    def _convert_paths(self) -> tuple[Path, Path]:
        src = Path(self.path_edit.text().strip())
        if not src.name.lower().endswith(io.NIFTI_SUFFIXES):
            raise ValueError("put a .nii or .nii.gz file in the Path field to convert it")
        if not src.is_file():
            raise FileNotFoundError(f"no such file: {src}")
        out = self.output_edit.text().strip()
        if out:
            return src, Path(out)
        stem = src.name[: -len(".nii.gz")] if src.name.lower().endswith(".gz") else src.stem
        return src, src.with_name(stem + ".ome.zarr")

    def start_convert(self) -> None:
        """Convert the NIfTI in the Path field in a background thread, with progress."""
        if self.job.is_running():
            self._report("a conversion is already running", error=True)
            return
        try:
            src, dst = self._convert_paths()
            if dst.exists():
                raise FileExistsError(f"{dst} already exists; choose another output")
        except (ValueError, FileNotFoundError) as exc:
            self._report(str(exc), error=True)
            return
        self.convert_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status_label.setText(f"converting {src.name} -> {dst.name}…")
        levels, chunks = self.levels_spin.value(), self.chunks_spin.value()

        def work(progress, cancel) -> str:
            io.convert_to_ome_zarr(
                src, dst, levels=levels, chunks=chunks, progress=progress, cancel=cancel
            )
            return str(dst)

        self.job.start(work, f"Converting {src.name}")

    def cancel_convert(self) -> None:
        if self.job.is_running():
            self.job.cancel()
            self.cancel_button.setEnabled(False)
            self.status_label.setText("cancelling…")

    def is_converting(self) -> bool:
        return self.job.is_running()

    def _end_convert(self) -> None:
        self.convert_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def _on_convert_finished(self, dst: str) -> None:
        self._end_convert()
        self._report(f"converted to {dst}")
        if self.open_converted_check.isChecked():
            self.path_edit.setText(dst)
            self.open_path()

    def _on_convert_failed(self, message: str) -> None:
        self._end_convert()
        self._report(f"conversion failed: {message}", error=True)

    def _on_convert_cancelled(self) -> None:
        self._end_convert()
        self._report("conversion cancelled; the partial output was removed")

    # ---------------------------------------------------------------- save labels
    def _labels_meta(self, labels: Labels, name: str) -> dict:
        volume = self.current_volume_layer()
        metadata = dict(labels.metadata)
        if "affine" not in metadata and volume is not None and "affine" in volume.metadata:
            metadata["affine"] = volume.metadata["affine"]
        return {
            "name": name,
            "metadata": metadata,
            "scale": tuple(labels.scale),
            "translate": tuple(labels.translate),
        }

    def save_labels_to_volume(self) -> bool:
        """Write the chosen labels layer as labels/<name> into the volume's OME-Zarr (in
        ``io_job``; ``saved`` names what was written). False when nothing started."""
        labels, volume = self.current_labels_layer(), self.current_volume_layer()
        source = volume.metadata.get("source") if volume is not None else None
        if labels is None:
            self._report("no labels layer to save", error=True)
            return False
        if not source or not Path(source).is_dir():
            self._report(
                "the volume has no OME-Zarr on disk; convert or save it as OME-Zarr first, "
                "or use 'Save as file…'",
                error=True,
            )
            return False
        return self._save(labels, source)

    def save_labels_as_file(self) -> bool:
        """Ask for a .nii/.nii.gz/.zarr path and write the chosen labels layer there (in
        ``io_job``). False when nothing started."""
        labels = self.current_labels_layer()
        if labels is None:
            self._report("no labels layer to save", error=True)
            return False
        path, _ = QFileDialog.getSaveFileName(
            self,
            "Save labels",
            "",
            "NIfTI (*.nii.gz *.nii);;OME-Zarr (*.zarr)",
            options=QFileDialog.Option.DontConfirmOverwrite,  # the panel asks, naming what
        )
        return self._save(labels, path) if path else False

    def _save(self, labels: Labels, path: str) -> bool:
        """Ask before replacing a label image, then write ``labels`` (full resolution) in
        ``io_job``; a layer in memory is copied first, so painting on meanwhile is not saved
        half-way."""
        name = self.label_name_edit.text().strip() or labels.name
        replaced = existing_label_target(path, name)
        if replaced is not None:
            choice = self.ask(
                self,
                "Replace labels?",
                f"Saving '{labels.name}' replaces {replaced}. Replace it?",
                ["Replace", "Cancel"],
            )
            if choice != "Replace":
                self._report(f"not saved: {replaced} is unchanged")
                return False
        full = labels.data[0] if labels.multiscale else labels.data  # full resolution
        data = as_dask(full.copy() if isinstance(full, np.ndarray) else full)
        meta = self._labels_meta(labels, name)

        def saved(written: str) -> None:
            self.saved = written
            self._report(f"saved {labels.name} to {written}")

        # bad labels, a refused or failed write: the job's error names it; nothing is lost
        return self._start_io(lambda: save_labels(path, data, meta), f"saving {labels.name}",
                              saved)  # fmt: skip

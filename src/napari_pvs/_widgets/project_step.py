"""The workflow's Project step: create or open a project folder, add volumes, see their state,
keep the settings.

Thin over :class:`napari_pvs.project.Project`: ``create``/``open``, ``add_volume``,
``status`` (predicted versions, reviewed patches per volume) and ``update_settings`` (strategy,
patch size, device, brush size persist per project). PVS counts come from the current
version's prediction, counted off the GUI thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from napari.layers import Image, Layer
from qtpy.QtWidgets import (
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

from napari_pvs._widgets._common import (
    compact_table,
    fill_table,
    notify,
    set_combo_items,
    status_label,
    strategy_combo,
)
from napari_pvs._widgets._jobs import BackgroundJob
from napari_pvs._widgets._layers import input_image_layers, layer_source
from napari_pvs._widgets.state import VOLUME_KEY, WorkflowState
from napari_pvs.io.modality import MODALITIES

if TYPE_CHECKING:
    from napari_pvs.project import VolumeRecord

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def _create(folder: Path, model: str):
    """A new project in ``folder`` with ``model`` as version 0 (imports torch: off the GUI)."""
    from napari_pvs.project import Project

    return Project.create(folder, model=model)


def _open(folder: Path):
    """The project in ``folder``; a folder that is not one says how to start one there."""
    from napari_pvs.project import Project

    try:
        return Project.open(folder)
    except ValueError as exc:
        if "not a" not in str(exc):
            raise
        raise ValueError(
            f"{exc} (to start a new project there, choose an empty folder and press Create)"
        ) from exc


def _add_with_modality(project, path: str | Path, modality: str | None):
    """``project.add_volume`` with ``modality``, else the image's confident guess (see
    :mod:`napari_pvs.modality`); returns the record and the guess (None when one was given)."""
    from napari_pvs.modality import guess_volume_modality

    if modality not in (None, "unknown"):
        return project.add_volume(path, modality=modality), None
    guess = guess_volume_modality(path)
    if guess.confident:
        return project.add_volume(path, modality=guess.modality), guess
    return project.add_volume(path), guess


class ProjectStep(QWidget):
    """Create/open a project; its volumes with their state; its settings."""

    def __init__(self, state: WorkflowState) -> None:
        super().__init__()
        self.state = state
        self.viewer = state.viewer
        self.count_job = BackgroundJob(self)
        self.count_job.succeeded.connect(self._on_counted)
        self.count_job.failed.connect(lambda message: notify(self.status_label, message, "error"))
        # Create and Add run here, off the GUI thread (Create imports torch; Add reads a sample)
        self.project_job = BackgroundJob(self)
        self.project_job.progress.connect(self._on_project_job_progress)
        self.project_job.succeeded.connect(self._on_project_job_done)
        self.project_job.failed.connect(self._on_project_job_failed)
        self._after_project_job = None
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self._build_project_box())
        layout.addWidget(self._build_volumes_box())
        layout.addWidget(self._build_settings_box())
        self.status_label = status_label()
        layout.addWidget(self.status_label)
        layout.addStretch(1)

        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layer_choices)
        state.project_changed.connect(self._show_project)
        state.volumes_changed.connect(self.refresh_volumes)
        state.predictions_changed.connect(lambda _vid: self.refresh_volumes())
        state.queue_changed.connect(lambda _vid: self.refresh_volumes())
        state.versions_changed.connect(self._show_project)
        state.settings_changed.connect(self._apply_settings)
        self._refresh_layer_choices()
        self._show_project()
        self._apply_settings()

    # ---------------------------------------------------------------- building
    def _build_project_box(self) -> QGroupBox:
        box = QGroupBox("Project")
        form = QFormLayout(box)
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("a new or empty folder, or a project folder")
        browse = QPushButton("…")
        browse.setToolTip("Choose the project folder")
        browse.clicked.connect(self._browse_folder)
        row = QHBoxLayout()
        row.addWidget(self.folder_edit, 1)
        row.addWidget(browse)
        form.addRow("Folder", row)
        self.model_edit = QLineEdit("default")
        self.model_edit.setToolTip(
            "Version 0 of a new project: 'default' (the bundled model) or a .safetensors file"
        )
        form.addRow("First model", self.model_edit)
        row = QHBoxLayout()
        self.create_button = QPushButton("Create")
        self.create_button.setToolTip("Make a new project in the folder (new or empty)")
        self.create_button.clicked.connect(self.start_create)
        self.open_button = QPushButton("Open")
        self.open_button.setToolTip("Open the project in the folder")
        self.open_button.clicked.connect(self.start_open)
        self.close_button = QPushButton("Close")
        self.close_button.clicked.connect(self.close_project)
        for button in (self.create_button, self.open_button, self.close_button):
            row.addWidget(button)
        form.addRow(row)
        self.project_label = QLabel("no project open")
        self.project_label.setWordWrap(True)
        form.addRow(self.project_label)
        return box

    def _build_volumes_box(self) -> QGroupBox:
        box = QGroupBox("Volumes")
        form = QFormLayout(box)
        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip("Open image layers read from a file (NIfTI, zarr, OME-Zarr)")
        self.add_layer_button = QPushButton("Add")
        self.add_layer_button.clicked.connect(self.add_current_layer)
        row = QHBoxLayout()
        row.addWidget(self.layer_combo, 1)
        row.addWidget(self.add_layer_button)
        form.addRow("Layer", row)
        self.add_files_button = QPushButton("Add files…")
        self.add_files_button.clicked.connect(self._browse_files)
        self.show_button = QPushButton("Show in viewer")
        self.show_button.setToolTip("Open the selected volume as layers (or select its layer)")
        self.show_button.clicked.connect(self.show_selected)
        self.remove_button = QPushButton("Remove")
        self.remove_button.setToolTip(
            "Take the selected volume out of the project (its reviewed labels go to archive/)"
        )
        self.remove_button.clicked.connect(self.remove_selected)
        row = QHBoxLayout()
        row.addWidget(self.add_files_button)
        row.addWidget(self.show_button)
        row.addWidget(self.remove_button)
        form.addRow(row)
        self.table = compact_table(
            ["volume", "predicted", "reviewed", "PVS", "contrast"],
            [
                "the volume's name in the project",
                "model versions with a complete prediction of it (* = current)",
                "patches accepted (reviewed) in it",
                "PVS (26-connected clusters) in the current version's segmentation",
                "T1 or T2: what the model is told (set it below when it is unknown or wrong)",
            ],
            fit=(2, 3, 4),
        )
        self.table.doubleClicked.connect(lambda _index: self.show_selected())
        self.table.itemSelectionChanged.connect(self._show_selected_modality)
        form.addRow(self.table)
        self.modality_combo = QComboBox()
        self.modality_combo.addItems(MODALITIES)
        self.modality_combo.setToolTip(
            "The selected volume's contrast, stored in the project: Segment, rounds and the "
            "benchmark tell the model this (predictions already made keep theirs)"
        )
        self.modality_combo.setEnabled(False)
        self.modality_combo.textActivated.connect(self.start_set_modality)
        form.addRow("Contrast", self.modality_combo)
        return box

    def _show_selected_modality(self) -> None:
        volume = self.selected_volume()
        self.modality_combo.setEnabled(volume is not None)
        if volume is not None:
            self.modality_combo.setCurrentText(volume.modality)

    def start_set_modality(self, modality: str) -> bool:
        """Store the selected volume's contrast (a ledger write: in the step's worker)."""
        volume = self.selected_volume()
        if volume is None:
            self._report("select a volume in the table first", "error")
            return False
        project = self.state.project

        def work(progress, cancel):
            return project.set_modality(volume.id, modality)

        return self._start_project_job(work, f"setting {volume.name}'s contrast",
                                       self._modality_set)  # fmt: skip

    def _modality_set(self, record: VolumeRecord) -> None:
        self.state.volumes_changed.emit()
        self._report(f"{record.name} is {record.modality}: its next predictions use it")

    def _build_settings_box(self) -> QGroupBox:
        box = QGroupBox("Settings (kept in the project)")
        form = QFormLayout(box)
        self.strategy_combo = strategy_combo("How the Review queue picks patches")
        form.addRow("Strategy", self.strategy_combo)
        self.n_spin = QSpinBox()
        self.n_spin.setRange(1, 500)
        self.patch_spin = QSpinBox()
        self.patch_spin.setRange(8, 256)
        self.patch_spin.setToolTip("Edge of a review patch, in voxels")
        self.n_spin.setToolTip("Patches per review queue")
        self.n_spin.setSuffix(" patches")
        self.patch_spin.setSuffix(" vx")
        form.addRow("Queue", self.n_spin)
        form.addRow("Patch edge", self.patch_spin)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICE_CHOICES)
        form.addRow("Device", self.device_combo)
        self.brush_spin = QSpinBox()
        self.brush_spin.setRange(1, 40)
        self.brush_spin.setSuffix(" vx")
        self.brush_spin.setToolTip("Brush of the Review step's patch layer (PVS are 1-3 voxels)")
        form.addRow("Brush", self.brush_spin)
        self.strategy_combo.currentTextChanged.connect(self._save_settings)
        self.device_combo.currentTextChanged.connect(self._save_settings)
        for spin in (self.n_spin, self.patch_spin, self.brush_spin):
            spin.valueChanged.connect(self._save_settings)
        self.settings_box = box
        return box

    # ---------------------------------------------------------------- helpers
    def _report(self, message: str, level: str = "info") -> None:
        notify(self.status_label, message, level)

    def _image_layers(self) -> list[Image]:
        return input_image_layers(self.viewer)

    def _refresh_layer_choices(self, event=None) -> None:
        set_combo_items(self.layer_combo, [layer.name for layer in self._image_layers()])

    def _browse_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Project folder", self.folder_edit.text())
        if folder:
            self.folder_edit.setText(folder)

    def _folder(self) -> Path | None:
        text = self.folder_edit.text().strip()
        if not text:
            self._report("enter or choose a project folder first", "error")
            return None
        return Path(text).expanduser()

    # ---------------------------------------------------------------- worker
    def _busy_buttons(self) -> tuple[QPushButton, ...]:
        return (self.create_button, self.open_button, self.close_button,
                self.add_layer_button, self.add_files_button)  # fmt: skip

    def is_busy(self) -> bool:
        """Whether a Create, Open, Add or contrast change runs in the step's worker."""
        return self.project_job.is_running()

    def _start_project_job(self, work, description: str, after) -> bool:
        """Run ``work`` in the step's worker, buttons disabled; ``after(result)`` on success."""
        if self.project_job.is_running():
            self._report("wait for the project step's current task to finish", "error")
            return False
        self._after_project_job = after
        for button in self._busy_buttons():
            button.setEnabled(False)
        self.status_label.setText(f"{description}…")
        return self.project_job.start(work, description)

    def _end_project_job(self) -> None:
        self.create_button.setEnabled(True)
        self.open_button.setEnabled(True)
        self._show_project()  # the project's own buttons follow whether one is open

    def _on_project_job_progress(self, done: int, total: int, message: str) -> None:
        # the status line only: a notification per report would flood napari's
        self.status_label.setText(f"{message}: {done}/{total}" if total > 0 else f"{message}…")

    def _on_project_job_done(self, result) -> None:
        after, self._after_project_job = self._after_project_job, None
        self._end_project_job()
        if after is not None:
            after(result)

    def _on_project_job_failed(self, message: str) -> None:
        self._after_project_job = None
        self._end_project_job()
        self._report(message, "error")

    def start_create(self) -> bool:
        """Create the project in the step's worker (torch and the first model load there)."""
        folder = self._folder()
        if folder is None:
            return False
        model = self.model_edit.text().strip() or "default"
        return self._start_project_job(
            lambda progress, cancel: _create(folder, model),
            f"creating project {folder}",
            self._created,
        )

    def _created(self, project) -> None:
        self.state.set_project(project)
        self._report(f"created project {project.path}")

    def start_add_paths(
        self, paths: list[str | Path], modality: str | None = None, then=None
    ) -> bool:
        """Add volume files in the step's worker, each with its modality guessed when unsaid;
        ``then(records)`` on the GUI thread with what was added."""
        project = self.state.project
        if project is None:
            self._report("create or open a project first", "error")
            return False
        paths = list(paths)

        def work(progress, cancel):
            added, unsure, refused = [], [], []
            for done, path in enumerate(paths):
                progress(done, len(paths), f"adding {Path(path).name}")
                try:
                    record, guess = _add_with_modality(project, path, modality)
                except (ValueError, FileNotFoundError, OSError) as exc:
                    refused.append(str(exc))
                    continue
                added.append(record)
                if guess is not None and not guess.confident:
                    unsure.append(f"{record.name}: {guess.reason}")
            progress(len(paths), len(paths), "added")
            return added, unsure, refused

        return self._start_project_job(work, "adding volumes",
                                       lambda result: self._added(result, then))  # fmt: skip

    def _added(self, result, then=None) -> None:
        added, unsure, refused = result
        if added:
            self.state.volumes_changed.emit()
        if then is not None:
            then(added)
        names = ", ".join(f"{r.name} ({r.modality})" for r in added)
        parts = [f"added {names}"] if added else []
        if unsure:
            parts.append("contrast unsure, set it in the table before segmenting: "
                         + "; ".join(unsure))  # fmt: skip
        parts += refused
        self._report("; ".join(parts), "error" if refused else "warning" if unsure else "info")

    # ---------------------------------------------------------------- project
    def create_project(self) -> bool:
        """Create the project on the calling thread: for ``napari-pvs gui`` and scripts, before
        the window is in use (the Create button runs :meth:`start_create`)."""
        folder = self._folder()
        if folder is None:
            return False
        try:
            project = _create(folder, self.model_edit.text().strip() or "default")
        except (ValueError, FileExistsError, FileNotFoundError, OSError) as exc:
            self._report(str(exc), "error")
            return False
        self._created(project)
        return True

    def start_open(self) -> bool:
        """Open the project in the step's worker (the ledger is read and checked there)."""
        folder = self._folder()
        if folder is None:
            return False
        return self._start_project_job(
            lambda progress, cancel: _open(folder), f"opening project {folder}", self._opened
        )

    def open_project(self) -> bool:
        """Open the project on the calling thread: for ``napari-pvs gui`` and scripts (the Open
        button runs :meth:`start_open`)."""
        folder = self._folder()
        if folder is None:
            return False
        try:
            project = _open(folder)
        except (ValueError, FileNotFoundError, OSError) as exc:
            self._report(str(exc), "error")
            return False
        self._opened(project)
        return True

    def _opened(self, project) -> None:
        self.state.set_project(project)
        self._report(f"opened project {project.path}")

    def close_project(self) -> None:
        if self.state.project is not None:
            path = self.state.project.path
            self.state.set_project(None)
            self._report(f"closed project {path}")

    def _show_project(self) -> None:
        project = self.state.project
        open_ = project is not None
        for widget in (self.add_layer_button, self.add_files_button, self.show_button,
                       self.close_button, self.settings_box):  # fmt: skip
            widget.setEnabled(open_)
        if not open_:
            self.project_label.setText("no project open")
            fill_table(self.table, [])
            return
        self.folder_edit.setText(str(project.path))
        current = project.current_version()
        self.project_label.setText(
            f"{project.path}\nmodel v{current.version} (current) of {len(project.versions())} "
            f"version(s)"
        )
        self.refresh_volumes()

    # ---------------------------------------------------------------- volumes
    def add_current_layer(self) -> bool:
        """Add the chosen image layer's file to the project (in the step's worker)."""
        layer = next((lyr for lyr in self._image_layers()
                      if lyr.name == self.layer_combo.currentText()), None)  # fmt: skip
        if layer is None:
            self._report("no image layer chosen; open a volume first", "error")
            return False
        source = layer_source(layer)
        if not source:
            self._report(
                f"layer {layer.name!r} has no file (it lives only in memory); save it as "
                "OME-Zarr first (File > Save Selected Layers… as .zarr) and add that file",
                "error",
            )
            return False

        def tag_layer(records: list[VolumeRecord]) -> None:
            if records:
                layer.metadata[VOLUME_KEY] = records[0].id

        return self.start_add_paths([source], layer.metadata.get("modality"), then=tag_layer)

    def _browse_files(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(
            self, "Add volumes", "", "Volumes (*.nii *.nii.gz *.zarr);;All files (*)"
        )
        if paths:
            self.start_add_paths(paths)

    def selected_volume(self) -> VolumeRecord | None:
        project = self.state.project
        rows = self.table.selectionModel().selectedRows()
        if project is None or not rows:
            return None
        volumes = project.volumes()
        return volumes[rows[0].row()] if rows[0].row() < len(volumes) else None

    def remove_selected(self) -> Path | None:
        """Take the selected volume out of the project; its labels are archived, not lost."""
        volume = self.selected_volume()
        if volume is None:
            self._report("select a volume in the table first", "error")
            return None
        try:
            archive = self.state.require_project().remove_volume(volume.id)
        except (ValueError, OSError) as exc:
            self._report(str(exc), "error")
            return None
        self._report(f"removed {volume.name} (volume {volume.id}); its labels are in {archive}")
        self.state.volumes_changed.emit()
        return archive

    def show_selected(self) -> Layer | None:
        """Select the volume's image layer, opening it first when it is not open."""
        volume = self.selected_volume()
        if volume is None:
            self._report("select a volume in the table first", "error")
            return None
        try:
            layer = self.state.show_volume(volume)
        except FileNotFoundError as exc:
            self._report(str(exc), "error")
            return None
        self.viewer.layers.selection.active = layer
        return layer

    def refresh_volumes(self) -> None:
        project = self.state.project
        if project is None:
            fill_table(self.table, [])
            return
        status = project.status()
        current = status["current_version"]
        rows, tips, to_count = [], [], []
        for entry in status["volumes"]:
            versions = entry["predicted_versions"]
            predicted = ", ".join(f"v{v}" + ("*" if v == current else "") for v in versions)
            key = (entry["id"], current)
            if key in self.state.pvs_counts:
                count = self.state.pvs_counts[key]
                pvs = "too large" if count is None else count
            elif project.has_prediction(entry["id"], current):
                pvs, _ = "…", to_count.append(key)
            else:
                pvs = "-"
            rows.append([entry["name"], predicted or "-", entry["annotations"], pvs,
                         entry["modality"]])  # fmt: skip
            tips.append(
                f"{entry['path']}\n{'x'.join(map(str, entry['shape']))} {entry['modality']}; "
                f"{entry['annotations']} reviewed ({entry['validation']} validation), "
                f"{entry['queue_new']} queued, {entry['skipped']} skipped"
            )
        selected = self.table.selectionModel().selectedRows()
        fill_table(self.table, rows, tips)
        if selected and selected[0].row() < len(rows):
            self.table.selectRow(selected[0].row())
        self._show_selected_modality()
        if to_count and not self.count_job.is_running():
            paths = {key: project.prediction_path(*key) for key in to_count}

            def work(progress, cancel):
                from napari_pvs._widgets.segment_run import pvs_cluster_count

                return {key: pvs_cluster_count(path) for key, path in paths.items()}

            self.count_job.start(work, "Counting PVS")

    def _on_counted(self, counts: dict) -> None:
        self.state.pvs_counts.update(counts)
        self.refresh_volumes()

    # ---------------------------------------------------------------- settings
    def _apply_settings(self) -> None:
        settings = self.state.settings()
        widgets = (self.strategy_combo, self.device_combo, self.n_spin, self.patch_spin,
                   self.brush_spin)  # fmt: skip
        for widget in widgets:
            widget.blockSignals(True)
        self.strategy_combo.setCurrentText(str(settings["strategy"]))
        self.device_combo.setCurrentText(str(settings["device"]))
        self.n_spin.setValue(int(settings["n"]))
        self.patch_spin.setValue(int(settings["patch"]))
        self.brush_spin.setValue(int(settings["brush_size"]))
        for widget in widgets:
            widget.blockSignals(False)

    def _save_settings(self, *args) -> None:
        if self.state.project is None:
            return
        try:
            self.state.update_settings(
                strategy=self.strategy_combo.currentText(),
                device=self.device_combo.currentText(),
                n=self.n_spin.value(),
                patch=self.patch_spin.value(),
                brush_size=self.brush_spin.value(),
            )
        except ValueError as exc:
            self._report(str(exc), "error")

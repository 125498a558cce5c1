"""The workflow's Project step: create or open a project folder, add volumes, see their state,
keep the settings.

Thin over :class:`napari_pvs.project.Project`: ``create``/``open``, ``add_volume`` and
``set_modality`` run here, in the step's ``project_job``. The volumes' table is
:class:`.project_table.VolumesBox`, the settings :class:`.project_settings.SettingsBox`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_pvs._widgets._common import notify, status_label
from napari_pvs._widgets._jobs import BackgroundJob
from napari_pvs._widgets._layers import layer_source, prepare_layer_dependencies
from napari_pvs._widgets.project_settings import SettingsBox
from napari_pvs._widgets.project_table import VolumesBox
from napari_pvs._widgets.state import VOLUME_KEY, WorkflowState
from napari_pvs.models.native import preload_torch_libraries

if TYPE_CHECKING:
    from napari_pvs.project import VolumeRecord


def _create(folder: Path, model: str):
    """A new project in ``folder`` with ``model`` as version 0 (a checkpoint other than the
    bundled one is checked in full, which imports torch: off the GUI thread)."""
    from napari_pvs.project import Project

    if model != "default":  # (the bundled one is checked by its digest, without torch)
        preload_torch_libraries()  # its full check imports torch: its libraries, GIL-free
    project = Project.create(folder, model=model)
    prepare_layer_dependencies()  # its volumes are shown next
    return project


def _open(folder: Path):
    """The project in ``folder``; a folder that is not one says how to start one there."""
    from napari_pvs.project import Project

    try:
        project = Project.open(folder)
        prepare_layer_dependencies()  # its volumes are shown next
        return project
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
    """Create/open a project; add volumes to it (its table and settings: boxes of their own)."""

    def __init__(self, state: WorkflowState) -> None:
        super().__init__()
        self.state = state
        self.viewer = state.viewer
        # Create and Add run here, off the GUI thread (Create checks the model; Add reads a sample)
        self.project_job = BackgroundJob(self)
        self.project_job.progress.connect(self._on_project_job_progress)
        self.project_job.succeeded.connect(self._on_project_job_done)
        self.project_job.failed.connect(self._on_project_job_failed)
        self._after_project_job = None
        self.volumes_box = VolumesBox(state, self._report)
        self.settings_box = SettingsBox(state, self._report)
        self.volumes_box.add_layer_button.clicked.connect(self.add_current_layer)
        self.volumes_box.add_files_button.clicked.connect(self._browse_files)
        self.volumes_box.modality_combo.textActivated.connect(self.start_set_modality)
        self.volumes_box.remove_button.clicked.connect(self.start_remove_selected)
        self.volumes_box.reader.shown.connect(self._show_versions)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self._build_project_box())
        layout.addWidget(self.volumes_box)
        layout.addWidget(self.settings_box)
        self.status_label = status_label()
        layout.addWidget(self.status_label)
        layout.addStretch(1)

        state.project_changed.connect(self._show_project)
        state.versions_changed.connect(self._show_project)
        state.settings_changed.connect(self.settings_box.apply)
        self._show_project()
        self.settings_box.apply()

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

    def start_set_modality(self, modality: str) -> bool:
        """Store the selected volume's contrast (a ledger write: in the step's worker)."""
        volume = self.volumes_box.selected_or_say()
        if volume is None:
            return False
        project = self.state.project

        def work(progress, cancel):
            return project.set_modality(volume.id, modality)

        return self._start_project_job(work, f"setting {volume.name}'s contrast",
                                       self._modality_set)  # fmt: skip

    def start_remove_selected(self) -> bool:
        """Take the selected volume out of the project in the step's worker (a ledger write;
        its reviewed labels are moved to archive/, not lost)."""
        volume = self.volumes_box.selected_or_say()
        if volume is None:
            return False
        project = self.state.project

        def work(progress, cancel):
            return project.remove_volume(volume.id)

        def removed(archive: Path) -> None:
            self._report(f"removed {volume.name} (volume {volume.id}); its labels are in {archive}")
            self.state.volumes_changed.emit()

        return self._start_project_job(work, f"removing {volume.name}", removed)

    def _modality_set(self, record: VolumeRecord) -> None:
        self.state.volumes_changed.emit()
        self._report(f"{record.name} is {record.modality}: its next predictions use it")

    # ---------------------------------------------------------------- helpers
    def _report(self, message: str, level: str = "info") -> None:
        notify(self.status_label, message, level)

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
                self.volumes_box.add_layer_button, self.volumes_box.add_files_button,
                self.volumes_box.remove_button)  # fmt: skip

    def is_busy(self) -> bool:
        """Whether a Create, Open, Add, Remove or contrast change runs in the step's worker,
        the volumes table is being read again after one, or Show in viewer reads a volume."""
        box = self.volumes_box
        return self.project_job.is_running() or box.is_refreshing() or box.is_showing()

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
        """Create the project in the step's worker (the model's checkpoint is checked there)."""
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
        self.volumes_box.set_project_open(open_)
        self.close_button.setEnabled(open_)
        self.settings_box.setEnabled(open_)
        if not open_:
            self.project_label.setText("no project open")
            return
        self.folder_edit.setText(str(project.path))
        if not self.project_label.text().startswith(str(project.path)):
            self.project_label.setText(str(project.path))  # the versions follow
        self.volumes_box.refresh()  # its read names the current version: _show_versions

    def _show_versions(self, read: dict | None) -> None:
        """The project line, from the volumes table's read (no ledger read here)."""
        project = self.state.project
        if read is None or project is None or read["project"] is not project:
            return
        status = read["status"]
        self.project_label.setText(
            f"{project.path}\nmodel v{status['current_version']} (current) of "
            f"{len(status['versions'])} version(s)"
        )

    # ---------------------------------------------------------------- volumes
    def add_current_layer(self) -> bool:
        """Add the chosen image layer's file to the project (in the step's worker)."""
        layer = self.volumes_box.chosen_layer()
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

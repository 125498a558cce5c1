"""The Project step's volumes box: the project's volumes in a table with their state, the
selected volume's contrast, Show and Remove, and the image layers that can be added.

Thin over :meth:`napari_pvs.project.Project.status` (predicted versions, reviewed patches per
volume), read in the box's ``reader`` (a worker thread: the ledger and the prediction stores'
attributes are never read on the GUI thread); PVS counts come from the current version's
prediction, counted off the GUI thread in ``count_job``. Adding and removing volumes and
storing a contrast are the step's jobs (:class:`.project_step.ProjectStep` wires the Add and
Remove buttons and the contrast combo).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from napari.layers import Image, Layer
from qtpy.QtWidgets import QComboBox, QFormLayout, QGroupBox, QHBoxLayout, QPushButton

from napari_pvs._widgets._common import compact_table, fill_table, set_combo_items
from napari_pvs._widgets._jobs import BackgroundJob, Refresher
from napari_pvs._widgets._layers import StagedLayers, input_image_layers, prefetch_first_plane
from napari_pvs._widgets.state import VOLUME_KEY, WorkflowState
from napari_pvs.io.modality import MODALITIES

if TYPE_CHECKING:
    from napari_pvs.project import VolumeRecord


class VolumesBox(QGroupBox):
    """The open project's volumes: table, contrast combo, Show / Remove, layers to add."""

    def __init__(self, state: WorkflowState, report: Callable[..., None]) -> None:
        super().__init__("Volumes")
        self.state = state
        self.viewer = state.viewer
        self._report = report
        self.count_job = BackgroundJob(self)
        self.count_job.succeeded.connect(self._on_counted)
        self.count_job.failed.connect(lambda message: report(message, "error"))
        # Show in viewer: the volume is read in a worker, its layers added when read
        self.shown: Layer | None = None
        self._showing: VolumeRecord | None = None
        self.show_job = BackgroundJob(self)
        #: a shown volume's first plane read, then the layer shown
        self.staged = StagedLayers(self)
        self.show_job.succeeded.connect(self._add_shown)
        self.show_job.failed.connect(lambda message: report(message, "error"))
        # the table's rows: read in a worker (the ledger and the stores' attributes)
        self.records: list[VolumeRecord] = []
        self.reader = Refresher(self._read_state, self)
        self.reader.shown.connect(self._show_state)
        self.reader.failed.connect(lambda message: report(message, "error"))
        form = QFormLayout(self)
        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip("Open image layers read from a file (NIfTI, zarr, OME-Zarr)")
        self.add_layer_button = QPushButton("Add")
        row = QHBoxLayout()
        row.addWidget(self.layer_combo, 1)
        row.addWidget(self.add_layer_button)
        form.addRow("Layer", row)
        self.add_files_button = QPushButton("Add files…")
        self.show_button = QPushButton("Show in viewer")
        self.show_button.setToolTip("Open the selected volume as layers (or select its layer)")
        self.show_button.clicked.connect(self.show_selected)
        self.remove_button = QPushButton("Remove")
        self.remove_button.setToolTip(
            "Take the selected volume out of the project (its reviewed labels go to archive/)"
        )
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
        self.table.itemSelectionChanged.connect(self.show_selected_modality)
        form.addRow(self.table)
        self.modality_combo = QComboBox()
        self.modality_combo.addItems(MODALITIES)
        self.modality_combo.setToolTip(
            "The selected volume's contrast, stored in the project: Segment, rounds and the "
            "benchmark tell the model this (predictions already made keep theirs)"
        )
        self.modality_combo.setEnabled(False)
        form.addRow("Contrast", self.modality_combo)

        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self.refresh_layer_choices)
        state.volumes_changed.connect(self.refresh)
        state.predictions_changed.connect(lambda _vid: self.refresh())
        state.queue_changed.connect(lambda _vid: self.refresh())
        self.refresh_layer_choices()

    # ---------------------------------------------------------------- layers to add
    def refresh_layer_choices(self, event=None) -> None:
        set_combo_items(self.layer_combo, [layer.name for layer in input_image_layers(self.viewer)])

    def chosen_layer(self) -> Image | None:
        """The image layer named in the Layer combo (None when there is none)."""
        name = self.layer_combo.currentText()
        return next((lyr for lyr in input_image_layers(self.viewer) if lyr.name == name), None)

    def set_project_open(self, open_: bool) -> None:
        """Enable what needs a project; an empty table without one."""
        buttons = (self.add_layer_button, self.add_files_button, self.show_button,
                   self.remove_button)  # fmt: skip
        for widget in buttons:
            widget.setEnabled(open_)
        if not open_:
            fill_table(self.table, [])

    # ---------------------------------------------------------------- selection
    def selected_volume(self) -> VolumeRecord | None:
        """The selected row's volume, as the table's last read saw it (no ledger read)."""
        rows = self.table.selectionModel().selectedRows()
        if self.state.project is None or not rows:
            return None
        return self.records[rows[0].row()] if rows[0].row() < len(self.records) else None

    def selected_or_say(self) -> VolumeRecord | None:
        """:meth:`selected_volume`, or None after telling the user to select one."""
        volume = self.selected_volume()
        if volume is None:
            self._report("select a volume in the table first", "error")
        return volume

    def show_selected_modality(self) -> None:
        volume = self.selected_volume()
        self.modality_combo.setEnabled(volume is not None)
        if volume is not None:
            self.modality_combo.setCurrentText(volume.modality)

    def show_selected(self) -> Layer | None:
        """Select the volume's image layer; one not open yet is read in ``show_job`` (the
        store's metadata and a contrast sample, off the GUI thread) and added when read, then
        ``shown`` holds it. Returns the layer when it was open already, else None."""
        volume = self.selected_or_say()
        if volume is None:
            return None
        layer = self.state.layer_for_volume(volume)
        if layer is not None:
            layer.metadata[VOLUME_KEY] = volume.id
            self.viewer.layers.selection.active = self.shown = layer
            return layer
        if self.show_job.is_running():
            self._report("a volume is being opened; wait for it", "error")
            return None
        self._showing = volume
        self.show_job.start(
            lambda progress, cancel: self.state.read_volume_layers(volume), f"opening {volume.name}"
        )
        return None

    def is_showing(self) -> bool:
        """A volume is being read, or its first plane before it is shown."""
        return self.show_job.is_running() or self.staged.is_running()

    def _add_shown(self, data: list) -> None:
        """Add the volume read in ``show_job``, hidden; show it once its first plane is read
        (off the GUI thread: :func:`prefetch_first_plane`)."""
        volume, self._showing = self._showing, None
        if self.state.project is None:  # closed (or the workflow torn down) meanwhile
            return
        layer = self.state.layer_for_volume(volume)  # opened meanwhile (another step)
        if layer is None:
            layer = self.state.add_volume_layers(volume, data, show=False)

            def show() -> None:
                if layer in self.viewer.layers:
                    layer.visible = True

            self.staged.run([lambda: prefetch_first_plane(self.viewer, layer), show])
        self.viewer.layers.selection.active = self.shown = layer

    # ---------------------------------------------------------------- the table
    def is_refreshing(self) -> bool:
        """The table is being read again (it shows the state before until then)."""
        return self.reader.is_running()

    def refresh(self) -> None:
        """Read the project's state in ``reader`` (off the GUI thread); :meth:`_show_state`
        fills the table. An empty table without a project."""
        if self.state.project is None:
            self.records = []
            fill_table(self.table, [])
            self.show_selected_modality()
            return
        self.reader.request()

    def _read_state(self) -> dict | None:
        """In the worker: ``project.status()``, the volumes' records and which of them have a
        complete prediction by the current version (a store attribute each)."""
        project = self.state.project
        if project is None:
            return None
        status = project.status()
        current = status["current_version"]
        by_id = {record.id: record for record in project.volumes()}
        return {
            "project": project,
            "status": status,
            "records": [by_id[entry["id"]] for entry in status["volumes"] if entry["id"] in by_id],
            "predictions": {
                entry["id"]: project.prediction_path(entry["id"], current)
                for entry in status["volumes"]
                if project.has_prediction(entry["id"], current)
            },
        }

    def _show_state(self, read: dict | None) -> None:
        """Fill the table from a read; count PVS of complete predictions not counted yet."""
        if read is None or read["project"] is not self.state.project:
            self.refresh()  # read for a project since closed or replaced
            return
        status = read["status"]
        current = status["current_version"]
        self.records = read["records"]
        rows, tips, to_count = [], [], {}
        for entry in status["volumes"]:
            versions = entry["predicted_versions"]
            predicted = ", ".join(f"v{v}" + ("*" if v == current else "") for v in versions)
            key = (entry["id"], current)
            if key in self.state.pvs_counts:
                count = self.state.pvs_counts[key]
                pvs = "too large" if count is None else count
            elif entry["id"] in read["predictions"]:
                pvs, to_count[key] = "…", read["predictions"][entry["id"]]
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
        self.show_selected_modality()
        if to_count and not self.count_job.is_running():

            def work(progress, cancel):
                from napari_pvs._widgets.segment_run import pvs_cluster_count

                return {key: pvs_cluster_count(path) for key, path in to_count.items()}

            self.count_job.start(work, "Counting PVS")

    def _on_counted(self, counts: dict) -> None:
        self.state.pvs_counts.update(counts)
        self.refresh()

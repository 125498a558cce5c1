"""The workflow's Report step: what was reviewed, PVS burden per volume and region, the learning
curve, exports.

Thin over the project: the reviewed line counts patches and candidate answers
(``project.status()``); ``project.burden`` (off the GUI thread) fills the table, which is
exported as CSV through :mod:`napari_pvs.atomic`; the learning curve is the validation Dice of
each round's new version against the round or the number of reviewed patches it was trained
on (``project.rounds``, ``project.versions``, read in ``curve_reader``: off the GUI thread);
the export is ``project.export`` (every volume's reviewed labels and current segmentation as
NIfTI or OME-Zarr, the burden and the annotation provenance as CSV), asking before it
replaces an earlier export.
"""

from __future__ import annotations

import csv
import io as _io
from pathlib import Path

from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_pvs import atomic
from napari_pvs._widgets._common import compact_table, fill_table, notify, status_label
from napari_pvs._widgets._jobs import BackgroundJob, JobProgress, Refresher
from napari_pvs._widgets._plots import LivePlot
from napari_pvs._widgets.state import WorkflowState

BURDEN_COLUMNS = ("volume", "region", "count", "volume_mm3", "model_version")
EXPORT_FORMATS = {"NIfTI": "nifti", "OME-Zarr": "ome-zarr"}
CURVE_AXES = {"round": "round", "reviewed patches": "reviewed patches"}


def reviewed_text(status: dict) -> str:
    """Reviewed patches beside candidate answers, from ``project.status()``."""
    patches = sum(v["annotations"] for v in status["volumes"])
    validation = sum(v["validation"] for v in status["volumes"])
    answers = status["answers"]
    return (
        f"reviewed: {patches} patches ({validation} validation) · {answers['total']} "
        f"candidate answers: {answers['yes']} yes, {answers['no']} no, {answers['skipped']} "
        f"skipped ({answers['held_out']} held out)"
    )


def learning_curve(project) -> dict[str, list[float]]:
    """Validation Dice after each finished round (and of its starting version before it),
    against the round and the reviewed patches it trained on."""
    points: dict[str, list[float]] = {"round": [], "reviewed patches": [], "dice": []}
    for record in project.rounds():
        if record.status != "done" or record.new_version is None:
            continue
        dice, _ = project.validation_score(record.new_version)
        if dice is None:
            continue
        start, _ = project.validation_score(record.base_version)
        if not points["dice"] and start is not None:
            points["round"].append(record.id - 1)  # the starting version, before this round
            points["reviewed patches"].append(0)
            points["dice"].append(start)
        points["round"].append(record.id)
        points["reviewed patches"].append(len(record.snapshot_annotation_ids))
        points["dice"].append(dice)
    return points


class ReportStep(QWidget):
    """Burden table + CSV, the learning curve, labels export."""

    def __init__(self, state: WorkflowState) -> None:
        super().__init__()
        self.state = state
        self.viewer = state.viewer
        self.rows: list[dict] = []
        self.exported: dict | None = None
        self.job = BackgroundJob(self)
        self.job.succeeded.connect(self._on_done)
        self.job.failed.connect(lambda message: self._report(message, "error"))
        self.job.cancelled.connect(lambda: self._report("cancelled"))
        self._job_kind = ""
        self.curve_points: dict[str, list[float]] = {"round": [], "reviewed patches": [],
                                                     "dice": []}  # fmt: skip
        self.curve_reader = Refresher(self._read_curve, self)
        self.curve_reader.shown.connect(self._show_curve)
        self.curve_reader.failed.connect(lambda message: self._report(message, "error"))
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        self.reviewed_label = QLabel("")
        self.reviewed_label.setWordWrap(True)
        self.reviewed_label.setToolTip(
            "Accepted patches (a fixed share kept for validation) and yes/no answers on predicted "
            "clusters (a fixed share held out to measure each version's precision)"
        )
        layout.addWidget(self.reviewed_label)
        layout.addWidget(self._build_burden_box())
        layout.addWidget(self._build_curve_box())
        layout.addWidget(self._build_export_box())
        self.status_label = status_label()
        layout.addWidget(self.status_label)
        layout.addStretch(1)
        state.project_changed.connect(self._on_project_changed)
        state.versions_changed.connect(self._on_versions_changed)
        state.queue_changed.connect(lambda _vid: self.refresh_reviewed())
        state.answers_changed.connect(lambda _vid: self.refresh_reviewed())
        self.refresh()

    def _build_burden_box(self) -> QGroupBox:
        box = QGroupBox("PVS burden")
        form = QFormLayout(box)
        row = QHBoxLayout()
        self.burden_button = QPushButton("Count PVS")
        self.burden_button.setToolTip(
            "PVS count and volume per region with the current version (predicts what is missing)"
        )
        self.burden_button.clicked.connect(self.compute_burden)
        self.csv_button = QPushButton("Export CSV…")
        self.csv_button.clicked.connect(self._browse_csv)
        row.addWidget(self.burden_button)
        row.addWidget(self.csv_button)
        form.addRow(row)
        self.progress = JobProgress()
        self.progress.follow(self.job)
        form.addRow(self.progress)
        self.table = compact_table(
            ["volume", "region", "PVS", "mm³", "model"],
            [
                "the project volume",
                "region of the volume's region map ('whole' = the whole volume)",
                "PVS (26-connected clusters); a PVS counts where most of its voxels are",
                "PVS volume in mm³",
                "the model version whose segmentation was counted",
            ],
            fit=(2, 3, 4),
        )
        form.addRow(self.table)
        return box

    def _build_curve_box(self) -> QGroupBox:
        box = QGroupBox("Learning curve")
        form = QFormLayout(box)
        self.curve_axis = QComboBox()
        self.curve_axis.addItems(list(CURVE_AXES))
        self.curve_axis.currentTextChanged.connect(lambda _t: self.refresh_curve())
        form.addRow("Against", self.curve_axis)
        self.curve = LivePlot(self.viewer, [("dice", "validation Dice")], "round", height=2.0,
                              ylims={"dice": (0.0, 1.0)})  # fmt: skip
        form.addRow(self.curve)
        return box

    def _build_export_box(self) -> QGroupBox:
        box = QGroupBox("Export labels")
        form = QFormLayout(box)
        self.format_combo = QComboBox()
        self.format_combo.addItems(list(EXPORT_FORMATS))
        self.format_combo.setToolTip(
            "NIfTI: <volume>_labels.nii.gz (0/1, 255 = not reviewed), <volume>_pvs.nii.gz "
            "(the model) and <volume>_corrected.nii.gz (the model with your reviewed patches); "
            "OME-Zarr: <volume>.ome.zarr with labels/annotations, labels/pvs, labels/corrected"
        )
        form.addRow("Format", self.format_combo)
        self.export_button = QPushButton("Export project…")
        self.export_button.setToolTip(
            "Every volume's reviewed labels and current segmentation, burden.csv and "
            "annotations.csv, into a new folder (default: the project's exports/v<N>)"
        )
        self.export_button.clicked.connect(self._browse_export)
        form.addRow(self.export_button)
        return box

    # ---------------------------------------------------------------- state
    def _report(self, message: str, level: str = "info") -> None:
        notify(self.status_label, message, level)

    def _on_project_changed(self) -> None:
        self.rows = []
        fill_table(self.table, [])
        self.refresh()

    def _on_versions_changed(self) -> None:
        """A round or Make current changed the current version: the curve follows, and a
        burden table already shown is counted again with it (in the worker)."""
        self.refresh()
        self._recount_if_stale()

    def _recount_if_stale(self) -> None:
        """Count again when the table shows another version's counts than the current one
        (also when a count that started before the change ends: it counted the old one)."""
        project = self.state.project
        if project is None or not self.rows or self.job.is_running():
            return
        if any(r["model_version"] != project.current_version().version for r in self.rows):
            self._report("the current model changed: counting PVS again with it…")
            self.compute_burden()

    def refresh(self) -> None:
        """Buttons follow whether a project is open; the learning curve is read again (the
        rounds and the versions' scores, in ``curve_reader``: off the GUI thread)."""
        open_ = self.state.project is not None
        for widget in (self.burden_button, self.csv_button, self.export_button):
            widget.setEnabled(open_)
        if open_:
            self.curve_reader.request()
        else:
            self._show_curve(None)

    def is_refreshing(self) -> bool:
        """The learning curve is being read again."""
        return self.curve_reader.is_running()

    def _read_curve(self) -> dict | None:
        """The learning curve and the reviewed line (ledger reads: in the curve's worker)."""
        project = self.state.project
        if project is None:
            return None
        return {"project": project, "points": learning_curve(project),
                "reviewed": reviewed_text(project.status())}  # fmt: skip

    def _show_curve(self, read: dict | None) -> None:
        if read is not None and read["project"] is not self.state.project:
            self.refresh()  # read for a project since closed or replaced
            return
        self.curve_points = read["points"] if read is not None else {
            "round": [], "reviewed patches": [], "dice": []}  # fmt: skip
        self.refresh_curve()
        self.reviewed_label.setText(read["reviewed"] if read is not None else "")

    def refresh_reviewed(self) -> None:
        """Count the reviewed patches and the candidate answers again (with the curve, in its
        worker: ``project.status()`` waits for a save holding the ledger)."""
        if self.state.project is not None:
            self.curve_reader.request()

    def refresh_curve(self) -> dict[str, list[float]]:
        """Draw the last read's learning curve against the chosen axis; returns its points."""
        points = self.curve_points
        axis = self.curve_axis.currentText()
        self.curve.axes[-1].set_xlabel(CURVE_AXES[axis])
        self.curve.axes[-1].set_xlim(0, 1)  # the other axis's range must not carry over
        self.curve.set_series("dice", points[axis], points["dice"])
        self.curve.flush()  # the x label changed: one full draw (rare: a round, a choice)
        return points

    # ---------------------------------------------------------------- burden
    def compute_burden(self) -> bool:
        project = self.state.project
        if project is None:
            self._report("open a project first (Project step)", "error")
            return False
        if self.job.is_running():
            if self._job_kind == "burden":
                return True  # the count running is the one asked for
            self._report("a count or export is already running", "error")
            return False
        self._job_kind = "burden"

        def work(progress, cancel):
            return project.burden(progress=progress, cancel=cancel)

        return self.job.start(work, "Counting PVS per region")

    def _show_burden(self, rows: list[dict]) -> None:
        self.rows = rows
        fill_table(
            self.table,
            [[r["volume"], r["region"].replace("_", " "), r["count"], f"{r['volume_mm3']:.1f}",
              f"v{r['model_version']}"] for r in rows],
            [f"{r['volume']}: {r['region']}, counted in model v{r['model_version']}'s "
             "segmentation" for r in rows],
        )  # fmt: skip
        volumes = {r["volume"] for r in rows}
        self._report(f"counted PVS in {len(volumes)} volume(s) with model v"
                     f"{rows[0]['model_version'] if rows else '?'}")  # fmt: skip

    def burden_csv(self) -> str:
        buffer = _io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(BURDEN_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        return buffer.getvalue()

    def export_csv(self, path: str | Path) -> Path | None:
        """Write the burden table (count first if needed) as CSV, asking before replacing."""
        if not self.rows:
            self._report("press Count PVS first: the table is empty", "error")
            return None
        path = Path(path)
        if path.exists() and self.state.ask(
            self, "Replace file?", f"{path} exists. Replace it?", ["Replace", "Cancel"]
        ) != "Replace":
            self._report(f"not saved: {path} is unchanged")
            return None
        try:
            atomic.write_text(path, self.burden_csv())
        except OSError as exc:
            self._report(f"could not write {path}: {exc}", "error")
            return None
        self._report(f"saved the burden table to {path}")
        return path

    def _browse_csv(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Export PVS burden", "pvs_burden.csv", "CSV (*.csv)",
            options=QFileDialog.Option.DontConfirmOverwrite,
        )  # fmt: skip
        if path:
            self.export_csv(path)

    # ---------------------------------------------------------------- export
    def export(self, folder: str | Path | None = None) -> bool:
        """``project.export`` into ``folder`` (default ``exports/v<N>``) in the background;
        asks before replacing an earlier export there."""
        project = self.state.project
        if project is None:
            self._report("open a project first (Project step)", "error")
            return False
        if self.job.is_running():
            self._report("a count or export is already running", "error")
            return False
        version = project.current_version().version
        out = Path(folder) if folder else project.path / "exports" / f"v{version}"
        overwrite = False
        if out.exists():
            if self.state.ask(
                self, "Replace export?", f"{out} exists. Replace it with a new export?",
                ["Replace", "Cancel"],
            ) != "Replace":  # fmt: skip
                self._report(f"not exported: {out} is unchanged")
                return False
            overwrite = True
        fmt = EXPORT_FORMATS[self.format_combo.currentText()]
        self._job_kind = "export"

        def work(progress, cancel):
            return project.export(out, format=fmt, overwrite=overwrite, progress=progress,
                                  cancel=cancel)  # fmt: skip

        return self.job.start(work, f"Exporting the project ({self.format_combo.currentText()})")

    def _browse_export(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export into a new folder in…")
        if folder:
            version = self.state.require_project().current_version().version
            self.export(Path(folder) / f"{self.state.project.path.name}-v{version}")

    def _on_done(self, value) -> None:
        if self._job_kind == "burden":
            self._show_burden(value)
        else:
            self.exported = value
            self._report(f"exported {len(value['files'])} files to {value['folder']}")
        self._recount_if_stale()  # the version changed while this job ran

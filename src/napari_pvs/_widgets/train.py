"""The workflow's Train step: run a round, watch it, and manage the model versions.

Thin over :mod:`napari_pvs.rounds`: ``start_round`` spawns the worker process; a QTimer on the
GUI thread drains ``handle.poll()`` a few times a second (the only place round events touch
Qt), feeding the progress bar and one loss line and one validation-Dice line that are updated
in place. Cancel asks the worker to stop. The versions table is ``project.versions()`` and
``project.compare`` read in the step's ``reader`` (a worker thread: the ledger is never read on
the GUI thread); Compare shows the last read's rows; Make current calls ``project.rollback``
in ``rollback_job``. When a round ends,
the other steps hear ``versions_changed`` / ``predictions_changed`` / ``queue_changed``.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_pvs._widgets._common import collapsed, compact_table, fill_table, notify, status_label
from napari_pvs._widgets._jobs import BackgroundJob, JobProgress, Refresher
from napari_pvs._widgets._plots import LivePlot
from napari_pvs._widgets.state import WorkflowState
from napari_pvs.models.native import preload_torch_libraries
from napari_pvs.rounds import RoundConfig, start_round

#: How often round events are drained (ms): a few Hz keeps the plot live and the GUI idle.
POLL_MS = 200
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def validation_dice(metrics: dict[str, Any]) -> float | None:
    """A version's Dice on the project's fixed validation patches (None: none to measure)."""
    value = metrics.get("validation_dice")
    return float(value) if isinstance(value, int | float) else None


def version_dice(project, version) -> tuple[float | None, int]:
    """The versions table's Dice and set size: the project's one validation score."""
    return project.validation_score(version.version)


def version_state(version, current: int) -> str:
    """The versions table's status of ``version``: what it is now, never what it was when
    made (a round's version is "current" only while it is)."""
    if version.version == current:
        return "current"
    if version.status != "ready":
        return version.status
    if version.metrics.get("worse_than_base"):
        return "kept aside"  # the worse-round guard: Make current offers it
    return "ready"


class TrainStep(QWidget):
    """Start / watch / cancel a round; the versions with compare and roll back."""

    def __init__(self, state: WorkflowState) -> None:
        super().__init__()
        self.state = state
        self.viewer = state.viewer
        self.handle = None
        self.events: list[dict] = []
        self.outcome: dict | None = None
        # start_round and handle.poll run here, one at a time, never on the GUI thread
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-pvs-round")
        self._pending: Future | None = None
        self._starting = False
        self._cancel_asked = False
        self.timer = QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.poll)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self._build_round_box())
        layout.addWidget(self._build_versions_box())
        self.status_label = status_label()
        layout.addWidget(self.status_label)
        layout.addStretch(1)
        state.project_changed.connect(self._on_project_changed)
        state.versions_changed.connect(self.refresh_versions)
        state.queue_changed.connect(lambda _vid: self._show_labelled())
        # Make current (rollback reads the checkpoint: torch) runs off the GUI thread too
        self.rollback_job = BackgroundJob(self)
        self.rollback_job.succeeded.connect(self._rolled_back)
        self.rollback_job.failed.connect(self._rollback_failed)
        # the versions table and the reviewed line: read in a worker (the ledger)
        self.versions: list = []
        self._compared: dict[int, dict] = {}
        self.reader = Refresher(self._read_versions, self)
        self.reader.shown.connect(self._show_versions)
        self.reader.failed.connect(lambda message: self._report(message, "error"))
        self._on_project_changed()

    # ---------------------------------------------------------------- building
    def _build_round_box(self) -> QGroupBox:
        box = QGroupBox("Training round")
        form = QFormLayout(box)
        self.labelled_label = QLabel("")
        self.labelled_label.setWordWrap(True)
        form.addRow(self.labelled_label)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 100_000)
        self.steps_spin.setValue(200)
        self.steps_spin.setToolTip("Optimizer steps of the round")
        form.addRow("Steps", self.steps_spin)
        advanced = QWidget()
        adv = QFormLayout(advanced)
        adv.setContentsMargins(0, 0, 0, 0)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 64)
        self.batch_spin.setValue(2)
        adv.addRow("Batch", self.batch_spin)
        self.patch_spin = QSpinBox()
        self.patch_spin.setRange(8, 256)
        self.patch_spin.setValue(32)
        adv.addRow("Training patch", self.patch_spin)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(5)
        self.lr_spin.setRange(1e-5, 1e-1)
        self.lr_spin.setSingleStep(1e-4)
        self.lr_spin.setValue(3e-4)
        adv.addRow("Learning rate", self.lr_spin)
        self.minutes_spin = QSpinBox()
        self.minutes_spin.setRange(0, 24 * 60)
        self.minutes_spin.setSpecialValueText("no limit")
        adv.addRow("Time limit (min)", self.minutes_spin)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICE_CHOICES)
        adv.addRow("Device", self.device_combo)
        self.scratch_check = QCheckBox("From scratch")
        self.scratch_check.setToolTip("Train a fresh model instead of the current version")
        adv.addRow(self.scratch_check)
        self.rerank_check = QCheckBox("Re-rank after the round")
        self.rerank_check.setToolTip("Predict every volume with the new version and re-rank")
        self.rerank_check.setChecked(True)
        adv.addRow(self.rerank_check)
        form.addRow(collapsed("Advanced", advanced))
        self.start_button = QPushButton("Start round")
        self.start_button.clicked.connect(self.start)
        form.addRow(self.start_button)
        self.progress = JobProgress("steps")
        self.progress.cancel_requested.connect(self.cancel)
        form.addRow(self.progress)
        self.plot = LivePlot(
            self.viewer,
            [("loss", "loss"), ("dice", "validation Dice")],
            "step",
            height=2.6,
            ylims={"dice": (0.0, 1.0)},
        )
        form.addRow(self.plot)
        return box

    def _build_versions_box(self) -> QGroupBox:
        box = QGroupBox("Model versions")
        form = QFormLayout(box)
        self.versions_table = compact_table(
            ["version", "from", "round", "val. Dice", "status"],
            [
                "model version (* = current: it predicts and ranks)",
                "the version it was trained from",
                "the round that made it",
                "Dice on the project's fixed validation patches (for a version a round started "
                "from, as measured then)",
                "current (predicts and ranks), kept aside by the worse-round guard, ready "
                "(Make current uses it) or failed",
            ],
            fit=(0, 1, 2),
        )
        self.versions_table.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        form.addRow(self.versions_table)
        row = QHBoxLayout()
        self.compare_button = QPushButton("Compare")
        self.compare_button.setToolTip("Metrics of the selected versions side by side")
        self.compare_button.clicked.connect(self.compare)
        self.rollback_button = QPushButton("Make current")
        self.rollback_button.setToolTip(
            "Roll back (or forward) to the selected version; nothing is deleted"
        )
        self.rollback_button.clicked.connect(self.start_rollback)
        row.addWidget(self.compare_button)
        row.addWidget(self.rollback_button)
        form.addRow(row)
        self.compare_label = QLabel("")
        self.compare_label.setWordWrap(True)
        form.addRow(self.compare_label)
        self.hint_label = QLabel("")
        self.hint_label.setWordWrap(True)
        form.addRow(self.hint_label)
        return box

    # ---------------------------------------------------------------- state
    def _report(self, message: str, level: str = "info") -> None:
        notify(self.status_label, message, level)

    def _on_project_changed(self) -> None:
        project = self.state.project
        self.start_button.setEnabled(project is not None and not self.is_running())
        if project is not None:
            self.device_combo.setCurrentText(str(self.state.settings()["device"]))
            self.patch_spin.setValue(int(self.state.settings()["patch"]))
        self.refresh_versions()
        self._show_labelled()

    def _show_labelled(self) -> None:
        """The reviewed patches' line (read with the versions, off the GUI thread)."""
        self.refresh_versions()

    def _show_labelled_counts(self, reviewed: int, validation: int) -> None:
        self.labelled_label.setText(
            f"{reviewed} reviewed patches: {reviewed - validation} train, "
            f"{validation} validation (fixed when accepted)"
        )

    def is_running(self) -> bool:
        """A round starting or running (until its outcome is in the ledger)."""
        return self._starting or (self.handle is not None and bool(self.handle.running))

    def is_refreshing(self) -> bool:
        """The versions table and the reviewed line are being read again."""
        return self.reader.is_running()

    def refresh_versions(self) -> None:
        """Read the versions, their validation Dice, the stop hint and the reviewed patches in
        ``reader`` (off the GUI thread); :meth:`_show_versions` fills the table."""
        if self.state.project is None:
            self._show_versions(None)
            return
        self.reader.request()

    def _read_versions(self) -> dict | None:
        """In the worker: what the versions table, Compare and the reviewed line show."""
        project = self.state.project
        if project is None:
            return None
        versions = project.versions()
        annotations = project.annotations()
        return {
            "project": project,
            "versions": versions,
            "current": project.current_version().version,
            "dice": [version_dice(project, version) for version in versions],
            "compare": project.compare() if versions else [],
            "hint": project.stop_hint(),
            "reviewed": len(annotations),
            "validation": sum(a.split == "validation" for a in annotations),
        }

    def _show_versions(self, read: dict | None) -> None:
        project = self.state.project
        if read is not None and read["project"] is not project:
            self.refresh_versions()  # read for a project since closed or replaced
            return
        if read is None:
            self.versions, self._compared = [], {}
            fill_table(self.versions_table, [])
            self.hint_label.setText("")
            self.labelled_label.setText("open a project first (Project step)")
            return
        self.versions = read["versions"]
        self._compared = {row["version"]: row for row in read["compare"]}
        rows, tips = [], []
        for version, (dice, patches) in zip(read["versions"], read["dice"], strict=True):
            rows.append([
                f"v{version.version}" + ("*" if version.version == read["current"] else ""),
                "-" if version.parent is None else f"v{version.parent}",
                "-" if version.round is None else version.round,
                "-" if dice is None else f"{dice:.3f} on {patches}",
                version_state(version, read["current"]),
            ])  # fmt: skip
            tips.append(", ".join(f"{k} {v}" for k, v in version.metrics.items()) or "no metrics")
        fill_table(self.versions_table, rows, tips)
        self.hint_label.setText(read["hint"] or "")
        self._show_labelled_counts(read["reviewed"], read["validation"])

    def selected_versions(self) -> list[int]:
        """The selected rows' versions, as the table's last read listed them."""
        if self.state.project is None:
            return []
        rows = sorted(index.row() for index in self.versions_table.selectionModel().selectedRows())
        return [self.versions[r].version for r in rows if r < len(self.versions)]

    # ---------------------------------------------------------------- a round
    def config(self) -> RoundConfig:
        return RoundConfig(
            steps=self.steps_spin.value(),
            batch_size=self.batch_spin.value(),
            patch=self.patch_spin.value(),
            learning_rate=self.lr_spin.value(),
            from_scratch=self.scratch_check.isChecked(),
            device=self.device_combo.currentText(),
            max_minutes=self.minutes_spin.value() or None,
            rerank=self.rerank_check.isChecked(),
        )

    def start(self) -> bool:
        """Start a round: the snapshot is frozen and the worker spawned off the GUI thread."""
        project = self.state.project
        if project is None:
            self._report("open a project first (Project step)", "error")
            return False
        if self.is_running():
            self._report("a round is already running; cancel it or wait", "error")
            return False
        try:
            config = self.config()
        except ValueError as exc:
            self._report(str(exc), "error")
            return False
        self.handle, self.events, self.outcome = None, [], None
        self._loss: tuple[list[int], list[float]] = ([], [])
        self._dice: tuple[list[int], list[float]] = ([], [])
        self._cancel_asked = False
        self.plot.clear()
        self.plot.set_xmax(config.steps)
        self.progress.begin("freezing the snapshot, starting the worker…")
        self.start_button.setEnabled(False)
        self._starting = True
        self._pending = self._executor.submit(start_round, project, config)
        self._report("round starting")
        self.timer.start()
        return True

    def cancel(self) -> None:
        self._cancel_asked = True
        if self.handle is not None and self.handle.running:
            self.handle.cancel()
        self.status_label.setText("cancelling the round…")

    def poll(self) -> None:
        """Take the round's events (a QTimer tick on the GUI thread, a few times a second).

        ``handle.poll()`` itself runs on a helper thread: when the worker finishes it commits
        the round and joins the worker process, which takes seconds; the GUI only ever picks
        up finished results here.
        """
        pending = self._pending
        if pending is not None and not pending.done():
            return
        self._pending = None
        if pending is not None:
            try:
                value = pending.result()
            except (ValueError, FileNotFoundError, OSError) as exc:
                value = [{"kind": "failed", "message": str(exc)}]
            except Exception as exc:  # a bug: name it, keep the GUI alive
                value = [{"kind": "failed", "message": f"{type(exc).__name__}: {exc}"}]
            if self._starting:
                self._starting = False
                if isinstance(value, list):  # start_round raised
                    self._take(value)
                    return
                self.handle = value
                self.progress.detail.setText(f"round {value.round}: worker started")
                if self._cancel_asked:
                    value.cancel()
            else:
                self._take(value)
        if self.outcome is None and self.handle is not None:
            self._pending = self._executor.submit(self.handle.poll)
        elif self.outcome is not None:
            self.timer.stop()

    def _take(self, events: list[dict]) -> None:
        loss_changed = dice_changed = False
        for event in events:
            self.events.append(event)
            kind = event.get("kind")
            if kind == "stage":
                self.progress.detail.setText(str(event.get("message", "")))
            elif kind == "step":
                self._loss[0].append(int(event["step"]))
                self._loss[1].append(float(event["loss"]))
                self.progress.update(int(event["step"]), int(event["total"]), "training")
                loss_changed = True
            elif kind == "validation" and event.get("source") != "fit":
                # the project's fixed validation patches (fit's own split is another measure)
                self._dice[0].append(int(event["step"]))
                self._dice[1].append(float(event["dice"]))
                dice_changed = True
            elif kind in ("done", "failed", "cancelled") and self.outcome is None:
                self._finish(event)
        if loss_changed:
            self.plot.set_series("loss", *self._loss)
        if dice_changed:
            self.plot.set_series("dice", *self._dice)

    def _finish(self, event: dict) -> None:
        self.timer.stop()
        self.outcome = event
        self.start_button.setEnabled(self.state.project is not None)
        kind = event["kind"]
        self.progress.finish({"done": "done", "cancelled": "cancelled"}.get(kind, "failed"))
        if kind == "done":
            dice = validation_dice(event.get("metrics") or {})
            score = (
                f", validation Dice {dice:.3f}"
                if dice is not None
                else " (no validation patch yet: about 1 accepted patch in 4 becomes one)"
            )
            if event.get("current", True):
                self._report(f"round done: new version v{event.get('version')}{score}")
            else:  # the worse-round guard: kept, not current; Make current offers it
                self._report(
                    f"{event.get('message')} (select it and press "
                    f"'{self.rollback_button.text()}')",
                    "warning",
                )
        elif kind == "cancelled":
            self._report("round cancelled; the previous version stays current")
        else:
            self._report(
                f"round failed: {event.get('message', 'unknown error')}; the previous version "
                "stays current",
                "error",
            )
        project = self.state.project
        if project is not None:
            self.state.versions_changed.emit()
            for volume in project.volumes():
                self.state.predictions_changed.emit(volume.id)
                self.state.queue_changed.emit(volume.id)

    def teardown(self) -> None:
        """Stop polling and cancel a running round (its worker must not outlive the viewer)."""
        self.timer.stop()
        self._cancel_asked = True
        if self._pending is not None:
            with contextlib.suppress(Exception):
                value = self._pending.result(timeout=60)
                if self._starting:
                    self.handle = value
        if self.handle is not None and self.handle.running:
            self.handle.cancel()
            # the worker is going anyway; the parent must not hang on it
            with contextlib.suppress(Exception):
                self.handle.wait(timeout=30)
        self._executor.shutdown(wait=False)

    # ---------------------------------------------------------------- versions
    def compare(self) -> list[dict]:
        project = self.state.project
        chosen = self.selected_versions()
        if project is None or not chosen:
            self._report("select one or more versions in the table first", "error")
            return []
        rows = [self._compared[v] for v in chosen if v in self._compared]  # the last read's
        if not rows:
            return []
        keys = [k for k in rows[0] if k not in ("version", "created", "current")]
        lines = []
        for row in rows:
            parts = [f"{k} {row[k]:.3f}" if isinstance(row.get(k), float) else f"{k} {row.get(k)}"
                     for k in keys if row.get(k) is not None]  # fmt: skip
            lines.append(f"v{row['version']}: " + ", ".join(parts))
        self.compare_label.setText("\n".join(lines))
        return rows

    def start_rollback(self) -> bool:
        """Make the selected version current in the step's worker, buttons disabled meanwhile."""
        project = self.state.project
        chosen = self.selected_versions()
        if project is None or len(chosen) != 1:
            self._report("select exactly one version to make current", "error")
            return False
        if self.is_running() or self.rollback_job.is_running():
            self._report("wait for the round to end (or cancel it) before rolling back", "error")
            return False
        version = chosen[0]

        def work(progress, cancel):
            preload_torch_libraries()  # the rollback's checks import torch (see its module)
            project.rollback(version)
            return version

        for button in (self.rollback_button, self.start_button):
            button.setEnabled(False)
        self.status_label.setText(f"making v{version} current…")
        return self.rollback_job.start(work, f"making v{version} current")

    def _rolled_back(self, version: int) -> None:
        self.rollback_button.setEnabled(True)
        self._on_project_changed()
        self._report(f"v{version} is current: it predicts and ranks from now on")
        self.state.versions_changed.emit()

    def _rollback_failed(self, message: str) -> None:
        self.rollback_button.setEnabled(True)
        self._on_project_changed()
        self._report(message, "error")

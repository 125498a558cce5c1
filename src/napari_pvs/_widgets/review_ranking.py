"""The Review step's queue box: the volume to review, its ranking and its queue.

Thin over the project: ``project.rank`` (in ``job``, off the GUI thread; it predicts first when
the current version has no prediction) records the queue, ``project.queue`` lists it into the
shared :class:`.review_queue.ReviewQueue` shown by :mod:`.patch_table`. Opening a patch and
what to do with unsaved edits belong to :class:`.review.ReviewStep`, passed in as callbacks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from qtpy.QtWidgets import QComboBox, QFormLayout, QGroupBox, QLabel, QPushButton

from napari_pvs._widgets._common import fill_volume_combo, notify
from napari_pvs._widgets._jobs import BackgroundJob, JobProgress
from napari_pvs._widgets._layers import StagedLayers
from napari_pvs._widgets.patch_table import queue_table, show_queue
from napari_pvs._widgets.review_queue import ReviewQueue
from napari_pvs._widgets.state import WorkflowState
from napari_pvs.ranking import shortfall_message

if TYPE_CHECKING:
    from napari_pvs.project import VolumeRecord


class QueueBox(QGroupBox):
    """Choose a volume, rank its patches in the background, list its queue."""

    def __init__(
        self,
        state: WorkflowState,
        queue: ReviewQueue,
        report: Callable[..., None],
        set_status: Callable[[str], None],
        resolve_unsaved: Callable[..., bool],
        open_patch: Callable[[int], bool],
    ) -> None:
        super().__init__("Queue")
        self.state = state
        self.queue = queue
        self._report = report
        self._set_status = set_status
        self._resolve_unsaved = resolve_unsaved
        self._open_patch = open_patch
        self.job = BackgroundJob(self)
        self.job.succeeded.connect(self._on_ranked)
        self.job.failed.connect(lambda message: report(message, "error"))
        self.job.cancelled.connect(lambda: report("ranking cancelled"))
        self.job.started.connect(lambda _d: self.rank_button.setEnabled(False))
        for signal in (self.job.succeeded, self.job.failed, self.job.cancelled):
            signal.connect(lambda *_: self.rank_button.setEnabled(True))
            signal.connect(lambda *_: self.state.release(self._ranking_vid))
        self._ranking_vid: int | None = None
        self._asked_n = 0
        #: per volume: why its last ranking gave fewer patches than asked (shown under the queue)
        self._shortfalls: dict[int, str] = {}
        #: after a ranking: its notification, then its queue and first patch, a turn each
        self.after_ranking = StagedLayers(self)
        self._build()
        queue.connect(self.show_queue)
        state.volumes_changed.connect(self.refresh_volumes)
        state.queue_changed.connect(self._on_queue_changed)
        state.versions_changed.connect(self.reload_queue)
        state.settings_changed.connect(self.show_settings)

    def _build(self) -> None:
        form = QFormLayout(self)
        self.volume_combo = QComboBox()
        self.volume_combo.currentIndexChanged.connect(lambda _i: self.reload_queue())
        form.addRow("Volume", self.volume_combo)
        self.settings_label = QLabel("")
        self.settings_label.setWordWrap(True)
        form.addRow(self.settings_label)
        self.rank_button = QPushButton("Rank patches")
        self.rank_button.setToolTip(
            "Rank this volume's patches with the current model (predicting first if needed); "
            "reviewed voxels and skipped patches are left out"
        )
        self.rank_button.clicked.connect(self.rank)
        form.addRow(self.rank_button)
        self.progress = JobProgress("windows")
        self.progress.follow(self.job)
        form.addRow(self.progress)
        self.table = queue_table()
        self.table.itemSelectionChanged.connect(self._on_row_selected)
        form.addRow(self.table)
        self.queue_label = QLabel("")
        self.queue_label.setWordWrap(True)
        form.addRow(self.queue_label)

    # ---------------------------------------------------------------- the volume and queue
    def refresh_volumes(self) -> None:
        project = self.state.project
        fill_volume_combo(self.volume_combo, project)
        self.rank_button.setEnabled(project is not None and self.volume_combo.count() > 0)
        self.reload_queue()

    def show_settings(self) -> None:
        settings = self.state.settings()
        self.settings_label.setText(
            f"{settings['n']} patches of {settings['patch']}³ voxels by {settings['strategy']} "
            "(change in the Project step)"
        )

    def selected_volume(self) -> VolumeRecord | None:
        project, vid = self.state.project, self.volume_combo.currentData()
        if project is None or vid is None:
            return None
        return project.volume(int(vid))

    def _on_queue_changed(self, vid: int) -> None:
        if vid == self.volume_combo.currentData():
            self.reload_queue()

    def reload_queue(self) -> None:
        volume = self.selected_volume()
        patches = self.state.project.queue(volume.id) if volume is not None else []
        self.queue.set_patches(patches)

    def show_queue(self) -> None:
        show_queue(self.table, self.queue)
        counts = self.queue.counts()
        text = (
            f"{counts['new']} new, {counts['reviewed']} reviewed, {counts['skipped']} skipped"
            if self.queue.patches
            else "no queue yet: press Rank patches"
        )
        why = self._shortfalls.get(self.volume_combo.currentData())
        self.queue_label.setText(f"{text}\n{why}" if why and self.queue.patches else text)

    def _on_row_selected(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if rows and rows[0].row() != self.queue.index and not self._open_patch(rows[0].row()):
            self.show_queue()  # put the selection back on the open patch

    # ---------------------------------------------------------------- ranking
    def rank(self) -> bool:
        """Rank the chosen volume's patches in the background (predicting first if needed)."""
        volume = self.selected_volume()
        if volume is None:
            self._report("open a project and add a volume first (Project step)", "error")
            return False
        if self.job.is_running():
            self._report("a ranking is already running", "error")
            return False
        if not self._resolve_unsaved(retry=self.rank):
            return False
        project = self.state.project
        settings = self.state.settings()
        self._asked_n = int(settings["n"])
        vid = volume.id
        holder = self.state.claim(vid, "the Review step")
        if holder is not None:
            self._report(f"{holder} is predicting this volume; rank when it has finished",
                         "error")  # fmt: skip
            return False
        self._ranking_vid = vid

        def work(progress, cancel):
            return vid, project.rank(vid, progress=progress, cancel=cancel)

        self.job.start(work, f"Ranking {volume.name}")
        self._set_status(f"ranking {volume.name} ({settings['strategy']})…")
        return True

    def _on_ranked(self, value) -> None:
        vid, records = value
        volume = self.state.project.volume(vid)
        settings = self.state.settings()
        message = f"{len(records)} patches queued for {volume.name}"
        why = shortfall_message(len(records), self._asked_n, volume.shape, int(settings["patch"]))
        self._shortfalls[vid] = why or ""
        text = f"{message}. {why}" if why else message
        self._set_status(text)
        self.state.predictions_changed.emit(vid)
        self.state.queue_changed.emit(vid)
        # napari's notification, then the queue and its first patch, each in a turn of its own:
        # the signals above refresh the tables and the prediction's layers in this one
        # (together, over 200 ms at 256^3); the step is busy until the patch is open
        self.after_ranking.run([
            lambda: notify(None, text, "warning" if why else "info"),
            lambda: self._show_ranked(vid),
        ])  # fmt: skip

    def _show_ranked(self, vid: int) -> None:
        """Show the new queue of volume ``vid`` and open its first patch, unless the user
        chose another volume or closed the project since."""
        if self.state.project is None or self.volume_combo.currentData() != vid:
            return
        self.reload_queue()
        first = self.queue.first_new()
        if first >= 0:
            self._open_patch(first)

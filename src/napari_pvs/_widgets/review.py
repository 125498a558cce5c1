"""The workflow's Review step: the ranked queue and the patch being corrected, or the
predicted clusters answered yes/no one key at a time (the mode switch at its top).

Patches mode is thin over the project: the queue box (:mod:`.review_ranking`: ``project.rank``
off the GUI thread, ``project.queue`` listed in :mod:`.patch_table`) picks a patch;
``project.accept`` / ``project.skip`` record what the user did with it, in the workers of
:mod:`.review_patch_saves`. Selecting a patch zooms the view to it, draws its box and opens
one in-memory labels layer for the patch at its offset (``translate`` = the box's first
voxel in world coordinates, ``scale`` = the spacing), prefilled with the model's
segmentation (or the accepted labels of a reviewed patch), active, with a 1-voxel brush and
the PVS label (those layers: :mod:`.review_layers`). Painting uses the layer's own tools, so
its undo works. The review keys are bound on that layer only (they go with it) and avoid
napari's own. Candidates mode is :mod:`.review_candidates`; its Edit opens the patch around
a candidate here (a patch-size box centred on it, not a queue row), and accepting it also
calls ``project.mark_candidate_edited``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Labels
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_pvs._widgets._common import notify, status_label
from napari_pvs._widgets._jobs import BackgroundJob
from napari_pvs._widgets._layers import StagedLayers, replace_labels
from napari_pvs._widgets.review_candidates import CandidatesBox
from napari_pvs._widgets.review_layers import PatchLayers
from napari_pvs._widgets.review_patch_saves import PatchSaves
from napari_pvs._widgets.review_queue import ReviewQueue
from napari_pvs._widgets.review_ranking import QueueBox
from napari_pvs._widgets.state import WorkflowState
from napari_pvs.atomic import os_user

if TYPE_CHECKING:
    from napari_pvs.project import CandidateRecord, PatchRecord, VolumeRecord

#: Review keys, bound on the patch layer only. napari's labels layer already uses 1-7, E, P,
#: F, L, Z, M, X, B, -, =, [, ], Escape and Enter, the viewer V, the arrows and Space.
KEYS = {"accept": "a", "skip": "s", "next": "n", "previous": "Shift-N"}
KEY_HELP = (
    "Keys on the patch layer: A accept · S skip · N next · Shift+N previous · "
    "[ / ] brush smaller / larger · Ctrl+Z undo · Ctrl+Shift+Z redo"
)
#: The two ways to review: paint ranked patches, or answer predicted clusters yes/no.
MODES = ("Patches", "Candidates")


def edit_patch(candidate: CandidateRecord, edge: int, shape) -> PatchRecord:
    """The patch an edit of ``candidate`` opens: ``edge`` voxels a side (more where the
    cluster's box is larger) centred on the cluster's box, moved inside a volume of ``shape``.
    Not a queue row: its id is minus the candidate's."""
    from napari_pvs.project import PatchRecord

    start, stop = [], []
    for a, b, size in zip(candidate.bbox_start, candidate.bbox_stop, shape, strict=True):
        side = min(int(size), max(int(edge), int(b) - int(a)))
        first = min(max(0, (int(a) + int(b) - side) // 2), int(size) - side)
        start.append(first)
        stop.append(first + side)
    return PatchRecord(
        id=-candidate.id, volume_id=candidate.volume_id, start=tuple(start), stop=tuple(stop),
        strategy="candidate", score=candidate.uncertainty, predicted_pvs=1,
        model_version=candidate.model_version, round=None, rank=candidate.rank,
        status="new", shown="",
    )  # fmt: skip


class ReviewStep(QWidget):
    """Open the queue's patches one by one, correct, accept or skip (the queue: its own box)."""

    def __init__(self, state: WorkflowState) -> None:
        super().__init__()
        self.state = state
        self.viewer = state.viewer
        #: the patch's layers on the canvas (the review keys are bound on its labels layer)
        self.layers = PatchLayers(state, self._bind_keys)
        #: the 3D view's steps, one per event-loop turn; and an opened patch's
        self.staged_3d = StagedLayers(self)
        self.staged_show = StagedLayers(self)
        self.queue = ReviewQueue()
        # a volume not on the canvas yet is read here; its layers and the patch's are then
        # added in two turns of their own (one turn building both froze the canvas 1-3 s)
        self.volume_job = BackgroundJob(self)
        self.volume_job.succeeded.connect(self._on_volume_read)
        self.volume_job.failed.connect(self._on_volume_failed)
        #: the patch waiting for its volume's layers, or None
        self._opening: PatchRecord | None = None
        #: the candidate whose patch is open for an edit (Candidates mode's E), or None
        self.editing: CandidateRecord | None = None
        #: the open patch: its record, volume and the labels it starts from
        self.patch: PatchRecord | None = None
        self.volume: VolumeRecord | None = None
        self._prefill: np.ndarray | None = None

        self.status_label = status_label()
        #: Accept and Skip, each written in its own worker; unsaved edits' question
        self.saves = PatchSaves(self, state, self.queue, self.layers, lambda: self.patch,
                                lambda: self.editing, self.has_unsaved_edits, self.annotator,
                                self._enable_patch_controls, self._patch_saved,
                                lambda: self.queue_box.reload_queue(), self._report,
                                self.status_label.setText)  # fmt: skip
        self.queue_box = QueueBox(state, self.queue, self._report, self.status_label.setText,
                                  self.saves.resolve_unsaved, self.open_patch)  # fmt: skip
        self.candidates_box = CandidatesBox(state, self.annotator, self.edit_candidate,
                                            self._report, self.status_label.setText)  # fmt: skip
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(self._build_header())
        layout.addWidget(self.queue_box)
        self.patch_box = self._build_patch_box()
        layout.addWidget(self.patch_box)
        layout.addWidget(self.candidates_box)
        layout.addWidget(self.status_label)
        layout.addStretch(1)
        self.candidates_box.setVisible(False)

        state.project_changed.connect(self._on_project_changed)
        state.settings_changed.connect(self._show_brush)
        self._on_project_changed()

    # ---------------------------------------------------------------- building
    def _build_header(self) -> QVBoxLayout:
        """The mode switch and the annotator (both modes record who answered)."""
        header = QVBoxLayout()
        row = QHBoxLayout()
        row.addWidget(QLabel("Review"))
        self.mode_group = QButtonGroup(self)
        self.mode_buttons: dict[str, QRadioButton] = {}
        tips = {
            "Patches": "Paint the ranked patches (the queue below), accept or skip each",
            "Candidates": "Answer each predicted PVS cluster with one key: Y it is a PVS, N "
                          "it is not (E edits it as a patch)",
        }  # fmt: skip
        for name in MODES:
            button = QRadioButton(name)
            button.setToolTip(tips[name])
            self.mode_group.addButton(button)
            self.mode_buttons[name] = button
            row.addWidget(button)
        row.addStretch(1)
        self.mode_buttons["Patches"].setChecked(True)
        self.mode_group.buttonClicked.connect(lambda button: self.set_mode(button.text()))
        header.addLayout(row)
        row = QHBoxLayout()
        row.addWidget(QLabel("Annotator"))
        self.annotator_edit = QLineEdit(os_user())
        self.annotator_edit.setToolTip("Who reviews: recorded with every accepted or skipped "
                                       "patch and every answer (required)")  # fmt: skip
        row.addWidget(self.annotator_edit, 1)
        header.addLayout(row)
        return header

    def _build_patch_box(self) -> QGroupBox:
        box = QGroupBox("Patch")
        layout = QVBoxLayout(box)
        self.patch_label = QLabel("no patch open")
        self.patch_label.setWordWrap(True)
        layout.addWidget(self.patch_label)
        grid = QGridLayout()
        self.previous_button = QPushButton("◀ Previous")
        self.previous_button.clicked.connect(self.previous)
        self.next_button = QPushButton("Next ▶")
        self.next_button.clicked.connect(self.next)
        self.accept_button = QPushButton("Accept")
        self.accept_button.setToolTip("Save this patch as reviewed (empty = no PVS) and move on")
        self.accept_button.clicked.connect(self.accept)
        self.skip_button = QPushButton("Skip")
        self.skip_button.setToolTip("Leave this patch out of the queue and move on")
        self.skip_button.clicked.connect(self.skip)
        grid.addWidget(self.previous_button, 0, 0)
        grid.addWidget(self.next_button, 0, 1)
        grid.addWidget(self.accept_button, 1, 0)
        grid.addWidget(self.skip_button, 1, 1)
        layout.addLayout(grid)
        row = QHBoxLayout()
        row.addWidget(QLabel("Brush"))
        self.brush_spin = QSpinBox()
        self.brush_spin.setRange(1, 40)
        self.brush_spin.setSuffix(" vx")
        self.brush_spin.valueChanged.connect(self._set_brush)
        row.addWidget(self.brush_spin)
        self.contour_check = QCheckBox("Contour")
        self.contour_check.setToolTip("Draw the labels as outlines, the image visible inside")
        self.contour_check.toggled.connect(self._set_contour)
        row.addWidget(self.contour_check)
        row.addStretch(1)
        layout.addLayout(row)
        row = QHBoxLayout()
        self.uncertainty_check = QCheckBox("Uncertainty")
        self.uncertainty_check.setToolTip("Overlay the patch's predictive entropy (bits)")
        self.uncertainty_check.toggled.connect(self._show_uncertainty)
        row.addWidget(self.uncertainty_check)
        self.view3d_check = QCheckBox("3D view")
        self.view3d_check.setToolTip("The patch in 3D with its surroundings (a margin of half "
                                     "its edge), the rest of the volume hidden")  # fmt: skip
        self.view3d_check.toggled.connect(self._set_3d)
        row.addWidget(self.view3d_check)
        row.addStretch(1)
        layout.addLayout(row)
        keys = QLabel(KEY_HELP)
        keys.setWordWrap(True)
        keys.setEnabled(False)  # drawn as a hint
        layout.addWidget(keys)
        self.patch_controls = [self.previous_button, self.next_button, self.accept_button,
                               self.skip_button]  # fmt: skip
        return box

    # ---------------------------------------------------------------- helpers
    def _report(self, message: str, level: str = "info") -> None:
        notify(self.status_label, message, level)

    def _on_project_changed(self) -> None:
        self.editing = None
        self._close_patch()
        self.candidates_box.project_changed()
        self.queue_box.refresh_volumes()
        self.queue_box.show_settings()
        self._show_brush()

    # ---------------------------------------------------------------- the mode
    def mode(self) -> str:
        """ "Patches" or "Candidates"."""
        return "Candidates" if self.candidates_box.isVisibleTo(self) else "Patches"

    def set_mode(self, mode: str) -> bool:
        """Switch between painting patches and answering candidates; False if it stays (a
        patch with unsaved corrections the user keeps, or a save still running)."""
        if mode not in MODES:
            raise ValueError(f"unknown review mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode == self.mode() and self.editing is None:
            self.mode_buttons[mode].setChecked(True)
            return True
        if not self.saves.resolve_unsaved(retry=lambda: self.set_mode(mode)):
            self.mode_buttons[self.mode()].setChecked(True)
            return False
        self.editing = None
        self._close_patch()
        candidates = mode == "Candidates"
        self.mode_buttons[mode].setChecked(True)
        self.queue_box.setVisible(not candidates)
        self.patch_box.setVisible(not candidates)
        self.candidates_box.setVisible(candidates)
        if candidates:
            self.candidates_box.activate()
        else:
            self.candidates_box.deactivate()
            if self.queue.current() is not None:
                self.open_patch(self.queue.index)
        return True

    def _show_brush(self) -> None:
        self.brush_spin.blockSignals(True)
        self.brush_spin.setValue(int(self.state.settings()["brush_size"]))
        self.brush_spin.blockSignals(False)

    # ---------------------------------------------------------------- the patch
    def has_unsaved_edits(self) -> bool:
        layer = self.layers.labels()
        return (
            self.patch is not None
            and layer is not None
            and self._prefill is not None
            and not np.array_equal(np.asarray(layer.data), self._prefill)
        )

    def open_patch(self, index: int) -> bool:
        """Show queue row ``index``: zoom, box, the prefilled patch layer. False if it stays."""
        if index == self.queue.index and self.patch is not None:
            return True
        if not self.saves.resolve_unsaved(retry=lambda: self.open_patch(index)):
            return False
        patch = self.queue.select(index)
        if patch is None:
            return False
        if not self._show_patch(patch):
            return False
        self.queue_box.show_queue()
        return True

    def _show_patch(self, patch: PatchRecord) -> bool:
        """Zoom to ``patch``, draw its box and open its prefilled labels layer, active."""
        project = self.state.project
        volume = project.volume(patch.volume_id)
        image = self.state.layer_for_volume(volume)
        if image is None:
            return self._read_volume_then_show(patch, volume)
        self.patch, self.volume = patch, volume
        prefill = self.layers.take_prefill(patch)
        self._prefill = prefill.copy()
        _, rest = self.layers.show_steps(patch, prefill, image, self.brush_spin.value(),
                                         self.contour_check.isChecked())  # fmt: skip
        self.staged_show.run(rest)
        self._show_uncertainty(self.uncertainty_check.isChecked())
        if self.view3d_check.isChecked():
            self._show_3d()
        self.saves.start_clock()
        size = "x".join(str(b - a) for a, b in zip(patch.start, patch.stop, strict=True))
        if self.editing is not None:
            self.patch_label.setText(
                f"editing candidate {self.editing.id} of {volume.name}: {size} voxels at "
                f"{list(patch.start)} (model v{patch.model_version}); Accept saves it as a "
                "reviewed patch, Skip goes back to the candidate unsaved"
            )
        else:
            self.patch_label.setText(
                f"patch {patch.rank} of {volume.name} ({patch.status}): {size} voxels at "
                f"{list(patch.start)}; {patch.predicted_pvs} predicted PVS, {patch.strategy} "
                f"score {patch.score:.3g} (model v{patch.model_version})"
            )
        self._enable_patch_controls(True)
        for control in (self.previous_button, self.next_button):
            control.setEnabled(self.editing is None)
        return True

    def _read_volume_then_show(self, patch: PatchRecord, volume: VolumeRecord) -> bool:
        """Read ``volume``'s layers in the worker, then show ``patch`` (True: on its way)."""
        self._close_patch()
        self._opening = patch
        if self.volume_job.is_running():  # the read in flight ends by showing this patch
            return True
        self.status_label.setText(f"opening {volume.name}…")
        return self.volume_job.start(
            lambda progress, cancel: (volume, self.state.read_volume_layers(volume)),
            f"opening {volume.name}",
        )

    def _on_volume_read(self, result: tuple[VolumeRecord, list]) -> None:
        """This turn adds the volume's layers; the next one the patch's."""
        volume, data = result
        self.state.add_volume_layers(volume, data)
        QTimer.singleShot(0, self._show_opening)

    def _show_opening(self) -> None:
        patch, self._opening = self._opening, None
        if patch is not None:
            if self._show_patch(patch):
                self.queue_box.show_queue()
        elif (  # read for the 3D view of the open patch (its edits stay as they are)
            self.patch is not None
            and self.view3d_check.isChecked()
            and self.state.layer_for_volume(self.volume) is not None
        ):
            self.status_label.setText("")  # (it said the volume was being opened)
            self._show_3d()

    def _on_volume_failed(self, message: str) -> None:
        self._opening = None
        self._report(message, "error")

    def edit_candidate(self, candidate: CandidateRecord) -> bool:
        """Candidates mode's E: open the patch around ``candidate`` to paint (its layer and
        keys replace the candidate's until it is accepted or skipped)."""
        project = self.state.project
        volume = project.volume(candidate.volume_id)
        patch = edit_patch(candidate, int(self.state.settings()["patch"]), volume.shape)
        self.editing = candidate
        self.patch_box.setVisible(True)
        if not self._show_patch(patch):
            self.editing = None
            self.patch_box.setVisible(False)
            return False
        self.status_label.setText(f"editing candidate {candidate.id}: paint, then A accepts")
        return True

    def _end_edit(self, edited: bool) -> None:
        """Leave the edit's patch and go back to the candidates (on the next one if edited)."""
        candidate, self.editing = self.editing, None
        self._close_patch()
        self.patch_box.setVisible(False)
        if candidate is not None:
            self.candidates_box.edit_finished(candidate, edited)

    def _bind_keys(self, layer: Labels) -> None:
        actions = {"accept": self.accept, "skip": self.skip, "next": self.next,
                   "previous": self.previous}  # fmt: skip
        for name, key in KEYS.items():
            action = actions[name]
            layer.bind_key(key, lambda _layer, action=action: action(), overwrite=True)

    def _close_patch(self) -> None:
        self.patch, self.volume, self._prefill = None, None, None
        self.staged_3d.stop()
        self.staged_show.stop()
        self.layers.remove()
        self.patch_label.setText("no patch open")
        self._enable_patch_controls(False)

    def _enable_patch_controls(self, on: bool) -> None:
        for control in self.patch_controls:
            control.setEnabled(on)

    def _patch_saved(self, patch: PatchRecord, labels: np.ndarray | None) -> None:
        """``patch`` was accepted (``labels``) or skipped (None): if it is still open, that is
        what it starts from now (skipped: its edits dropped on purpose, no question), and a
        queue row's record is the queue's, with its new status."""
        if self.patch is None or self.patch.id != patch.id:
            return
        self._prefill = None if labels is None else labels.copy()
        layer = self.layers.labels()
        if labels is not None and layer is not None and np.array_equal(
            np.asarray(layer.data) > 0, labels > 0
        ):
            # fresh history: what is saved is the start now
            replace_labels(layer, labels, in_place=True)
        if patch.id >= 0:
            self.patch = self.queue.current()

    def teardown(self) -> None:
        """Stop the ranking and the candidates' listing; the candidate's layer (and its keys)
        goes; the patch layer (and its keys) go with the viewer."""
        self.queue_box.job.cancel()
        self.candidates_box.teardown()

    # ---------------------------------------------------------------- display options
    def _set_brush(self, size: int) -> None:
        self.layers.set_brush(size)
        try:
            self.state.update_settings(brush_size=int(size))
        except ValueError as exc:
            self._report(str(exc), "error")

    def _set_contour(self, on: bool) -> None:
        self.layers.set_contour(on)

    def _set_3d(self, on: bool) -> None:
        """3D: the patch's box with a margin (:meth:`PatchLayers.show_3d_steps`, one step per
        event-loop turn); 2D: as before."""
        if on and self.patch is not None:
            self._show_3d()  # hides the volume before napari switches to 3D
            return
        self.staged_3d.stop()
        if on:  # no patch open: nothing to show in 3D
            self.layers.hide_3d()
            self.viewer.dims.ndisplay = 3
            return
        # 2D first: the layers shown again are then sliced as planes, not volumes
        self.viewer.dims.ndisplay = 2
        if self.patch is not None:
            self.layers.frame()
        self.staged_3d.run(self.layers.hide_3d_steps())

    def _show_3d(self) -> None:
        image = self.state.layer_for_volume(self.volume)
        if image is None:  # its layer was closed: read in the worker (it held the viewer), 3D next
            if not self.volume_job.is_running():
                volume = self.volume
                self.status_label.setText(f"opening {volume.name} for the 3D view…")
                self.volume_job.start(
                    lambda progress, cancel: (volume, self.state.read_volume_layers(volume)),
                    f"opening {volume.name}",
                )
            return
        self.staged_3d.run(self.layers.show_3d_steps(self.patch, image))

    def _show_uncertainty(self, on: bool) -> None:
        if not on or self.patch is None:
            self.layers.hide_uncertainty()
        elif not self.layers.show_uncertainty(self.patch):
            self._report(
                "this prediction has no uncertainty map; segment with MC samples or test-time "
                "flips (Segment step, Advanced) to get one",
                "warning",
            )

    # ---------------------------------------------------------------- actions
    def annotator(self) -> str | None:
        """The Annotator field's name; None (with a message) when it is empty."""
        name = self.annotator_edit.text().strip()
        if not name:
            self._report("enter who reviews in Annotator: it is recorded with every patch",
                         "error")  # fmt: skip
            self.annotator_edit.setFocus()
            return None
        return name

    def is_busy(self) -> bool:
        """Whether a ranking, an Accept, a Skip, a volume's opening, a candidates' listing or
        answers' saving runs in the step's workers, or a ranking's queue or an opened patch is
        still being shown."""
        candidates = self.candidates_box
        return (self.queue_box.job.is_running() or self.queue_box.after_ranking.is_running()
                or self.saves.is_saving()
                or self.volume_job.is_running() or self._opening is not None
                or candidates.load_job.is_running() or candidates.is_saving()
                or self.staged_show.is_running())  # fmt: skip

    @property
    def accept_job(self) -> BackgroundJob:
        """Accept's worker (:class:`.review_patch_saves.PatchSaves`)."""
        return self.saves.accept_job

    @property
    def skip_job(self) -> BackgroundJob:
        """Skip's worker (:class:`.review_patch_saves.PatchSaves`)."""
        return self.saves.skip_job

    def accept(self) -> bool:
        """Accept the open patch (empty counts as reviewed background) in the step's worker,
        then open the next new one (after a candidate's edit: the next candidate)."""
        if self.editing is not None:
            return self.saves.accept(lambda: self._end_edit(edited=True))
        return self.saves.accept(
            lambda: self._move(self.queue.next_index("new"), "all patches of this queue are done")
        )

    def skip(self) -> bool:
        """Leave the open patch out (without saving edits) and open the next new one; the
        ledger's record of it is written in the step's worker meanwhile. A candidate's edit
        is left unsaved, back to the candidate."""
        if self.editing is not None:
            return self.saves.skip(lambda: self._end_edit(edited=False))
        return self.saves.skip(
            lambda: self._move(self.queue.next_index("new"), "no new patch after this one")
        )

    def next(self) -> bool:
        if self._editing_refuses():
            return False
        return self._move(self.queue.next_index(), "this is the last patch of the queue")

    def previous(self) -> bool:
        if self._editing_refuses():
            return False
        return self._move(self.queue.previous_index(), "this is the first patch of the queue")

    def _editing_refuses(self) -> bool:
        if self.editing is None:
            return False
        self._report(f"finish the edit of candidate {self.editing.id} first: A accepts it, S "
                     "goes back to the candidate unsaved", "warning")  # fmt: skip
        return True

    def _move(self, index: int, message: str) -> bool:
        if index < 0:
            self.status_label.setText(self.status_label.text() + f"; {message}")
            return False
        return self.open_patch(index)

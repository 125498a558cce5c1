"""The Review step's Candidates mode: is this predicted cluster a PVS? One key per answer.

Thin over the project: ``project.refresh_candidates`` (predicting first when the current
version has no prediction) and ``project.candidates`` fill the list in ``load_job``;
their clusters (``project.candidate_mask``) come with the list; ``project.answer`` /
``project.undo_answer`` record what the annotator said, one at a time in the worker, in the
order given (:mod:`.review_answer_saves`). An answer changes the list and the counter at once
and the next candidate is shown without waiting for its save; a save that fails is shown and
its candidate is asked again. The candidate's layers: :mod:`.review_candidate_layers`; the
list: :mod:`.review_candidate_queue`. E(dit) hands the candidate to the Review step, which
opens the patch around it as in Patches mode (``edit`` callback) and, once that patch is
accepted, calls ``project.mark_candidate_edited`` and comes back here
(:meth:`CandidatesBox.edit_finished`).

The keys are bound on the candidate's own layer, so they work only while it is the active
layer and go with it when the mode ends. N answers "not a PVS", so the issue's N for "next"
is Shift+M here (Shift+N: previous).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Labels
from qtpy.QtCore import Qt
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import (
    QApplication,
    QComboBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QLabel,
    QPushButton,
)

from napari_pvs._widgets._common import fill_volume_combo
from napari_pvs._widgets._jobs import BackgroundJob, JobProgress, ReadAhead
from napari_pvs._widgets.review_answer_saves import AnswerSaves, Save
from napari_pvs._widgets.review_candidate_layers import (
    CandidateLayers,
    CandidateView,
    block_shape,
    orthogonal_planes,
)
from napari_pvs._widgets.review_candidate_queue import CandidateQueue
from napari_pvs._widgets.state import WorkflowState
from napari_pvs.candidates import DEFAULT_ORDER, ORDERS

if TYPE_CHECKING:
    from napari.layers import Image

    from napari_pvs.project import CandidateRecord, VolumeRecord

#: The Candidates mode's keys, bound on the candidate's layer only (napari's labels layer uses
#: E for its eraser and M for a new label: not on this layer, which is never painted).
KEYS = {"yes": "y", "no": "n", "edit": "e", "skip": "s", "undo": "u",
        "previous": "Shift-N", "next": "Shift-M"}  # fmt: skip
KEY_HELP = (
    "Keys on the candidate layer: Y PVS · N not a PVS · E edit as a patch · S skip · "
    "U undo the last answer · Shift+N previous · Shift+M next (N alone answers no)"
)
#: What each answer's key means, for messages.
ANSWER_WORDS = {"yes": "a PVS", "no": "not a PVS", "skip": "skipped"}
#: The candidate's status once an answer is recorded.
ANSWER_STATUS = {"yes": "yes", "no": "no", "skip": "skipped"}
#: What each candidate order asks first (the Order box's tooltips).
ORDER_MEANINGS = {
    "uncertain": "the clusters the model is least sure about first (mean entropy)",
    "size": "small, medium and large clusters in turn, each by uncertainty",
    "region": "the regions of the volume's region map in turn, each by uncertainty",
}
#: How long closing the step waits for answers still being written (each takes milliseconds).
FLUSH_WAIT_S = 30.0


class CandidatesBox(QGroupBox):
    """Choose a volume, find its candidates, answer them one key at a time."""

    def __init__(
        self,
        state: WorkflowState,
        annotator: Callable[[], str | None],
        edit: Callable[[CandidateRecord], bool],
        report: Callable[..., None],
        say: Callable[[str], None],
    ) -> None:
        super().__init__("Candidates")
        self.state = state
        self.viewer = state.viewer
        self._annotator = annotator
        self._edit = edit
        self._report = report
        #: the status line alone, for what happens on every key (no notification each time)
        self._say = say
        self.queue = CandidateQueue()
        self.layers = CandidateLayers(state, self._bind_keys)
        #: lists and finds candidates (predicting first when needed)
        self.load_job = BackgroundJob(self)
        self.load_job.succeeded.connect(self._on_loaded)
        self.load_job.failed.connect(lambda message: self._loaded_failed(message))
        self.load_job.cancelled.connect(lambda: self._loaded_failed("finding cancelled"))
        #: this session's answered candidates, oldest first (what U undoes, newest first)
        self.history: list[int] = []
        #: the answers' and undos' writes, one at a time in the worker, in the order given
        self.saves = AnswerSaves(self, state, self.queue, self.history, self.show_candidate,
                                 lambda: self.active, self._volume_id, report, say)  # fmt: skip
        self.active = False
        self.view: CandidateView | None = None
        #: each listed candidate's cluster, a mask over its box (read with the list)
        self.masks: dict[int, np.ndarray] = {}
        self._volume: VolumeRecord | None = None
        self._image: Image | None = None
        self._loading_vid: int | None = None
        self._shown_at = 0.0
        #: the candidate layer's shape for the listed candidates (:func:`block_shape`)
        self._block: list[int] | None = None
        #: the candidate shown after this one: its surroundings and planes, read in a worker
        self._ahead = ReadAhead(self)
        self._build()
        self.queue.connect(self.show_counts)
        state.volumes_changed.connect(self.refresh_volumes)
        state.versions_changed.connect(self._on_versions_changed)

    @property
    def pending(self) -> deque[Save]:
        """The writes waiting for the worker, oldest first."""
        return self.saves.pending

    def _volume_id(self) -> int | None:
        return self._volume.id if self._volume is not None else None

    # ---------------------------------------------------------------- building
    def _build(self) -> None:
        form = QFormLayout(self)
        self.volume_combo = QComboBox()
        self.volume_combo.currentIndexChanged.connect(lambda _i: self.reload())
        form.addRow("Volume", self.volume_combo)
        self.order_combo = QComboBox()
        self.order_combo.addItems(list(ORDERS))
        for index, name in enumerate(ORDERS):
            self.order_combo.setItemData(index, ORDER_MEANINGS[name], Qt.ItemDataRole.ToolTipRole)
        self.order_combo.setCurrentText(DEFAULT_ORDER)
        self.order_combo.setToolTip("Which candidates are asked first (Find candidates again to "
                                    "apply a new order)")  # fmt: skip
        form.addRow("Order", self.order_combo)
        self.find_button = QPushButton("Find candidates")
        self.find_button.setToolTip(
            "List every predicted PVS cluster of this volume with the current model (predicting "
            "first if needed), most uncertain first; answered clusters and clusters inside "
            "reviewed patches are not asked again"
        )
        self.find_button.clicked.connect(self.find)
        form.addRow(self.find_button)
        self.progress = JobProgress("windows")
        self.progress.follow(self.load_job)
        form.addRow(self.progress)
        self.counter_label = QLabel("")
        self.counter_label.setWordWrap(True)
        form.addRow(self.counter_label)
        self.candidate_label = QLabel("no candidate shown")
        self.candidate_label.setWordWrap(True)
        form.addRow(self.candidate_label)
        self.planes_label = QLabel()
        self.planes_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.planes_label.setToolTip(
            "The candidate's three orthogonal planes through the canvas's point (first axis, "
            "second, third), the cluster tinted"
        )
        form.addRow(self.planes_label)
        grid = QGridLayout()
        buttons = [
            ("yes_button", "Yes: PVS (Y)", lambda: self.answer("yes"), 0, 0),
            ("no_button", "No (N)", lambda: self.answer("no"), 0, 1),
            ("edit_button", "Edit (E)", self.edit, 1, 0),
            ("skip_button", "Skip (S)", lambda: self.answer("skip"), 1, 1),
            ("previous_button", "◀ Previous", self.previous, 2, 0),
            ("next_button", "Next ▶", self.next, 2, 1),
            ("undo_button", "Undo last answer (U)", self.undo, 3, 0),
        ]
        for name, text, action, row, column in buttons:
            button = QPushButton(text)
            button.clicked.connect(lambda _checked=False, action=action: action())
            setattr(self, name, button)
            grid.addWidget(button, row, column)
        self.edit_button.setToolTip(
            "Open the patch around this candidate to paint it (Patches mode's tools); "
            "accepting it marks the candidate edited"
        )
        self.skip_button.setToolTip("Ask this candidate again after the open ones")
        form.addRow(grid)
        keys = QLabel(KEY_HELP)
        keys.setWordWrap(True)
        keys.setEnabled(False)  # drawn as a hint
        form.addRow(keys)
        self.controls = [self.yes_button, self.no_button, self.edit_button, self.skip_button,
                         self.previous_button, self.next_button]  # fmt: skip
        self._enable_controls()

    def _enable_controls(self) -> None:
        shown = self.active and self.queue.current() is not None
        for control in self.controls:
            control.setEnabled(shown)
        self.undo_button.setEnabled(self.active)
        self.find_button.setEnabled(
            self.active and self.state.project is not None and not self.load_job.is_running()
        )

    # ---------------------------------------------------------------- the mode
    def activate(self) -> None:
        """The mode begins: list the chosen volume's candidates (in the worker)."""
        self.active = True
        self.refresh_volumes()

    def deactivate(self) -> None:
        """The mode ends: the candidate's layer goes, and its keys with it (saves go on)."""
        self.active = False
        self.layers.remove()
        self.view = None
        self.candidate_label.setText("no candidate shown")
        self.planes_label.clear()
        self._enable_controls()

    def teardown(self, wait_s: float = FLUSH_WAIT_S) -> None:
        """Stop listing; write the answers still waiting (up to ``wait_s``: they were given,
        so closing must not lose them); the candidate's layer and its keys go."""
        self.load_job.cancel()
        deadline = time.monotonic() + wait_s
        while self.is_saving() and time.monotonic() < deadline:
            QApplication.processEvents()  # the worker's results come back as events
            time.sleep(0.005)
        if self.active:
            self.deactivate()

    def project_changed(self) -> None:
        """Another project: nothing of the last one's list, history or images stays."""
        self.saves.forget_project()
        self.history.clear()  # shared with the saves: emptied, not replaced
        self._volume = self._image = None
        self.queue.set_candidates([])
        self.layers.remove()
        self.refresh_volumes()

    def refresh_volumes(self) -> None:
        fill_volume_combo(self.volume_combo, self.state.project)
        self.reload()

    def selected_volume(self) -> VolumeRecord | None:
        project, vid = self.state.project, self.volume_combo.currentData()
        if project is None or vid is None:
            return None
        return project.volume(int(vid))

    def _on_versions_changed(self) -> None:
        if self.active:
            self.reload()

    # ---------------------------------------------------------------- listing
    def reload(self) -> bool:
        """List the volume's candidates (in the worker), found again first when the current
        version predicted the volume since they were found."""
        return self._start_listing(refresh=False)

    def find(self) -> bool:
        """Find the volume's candidates with the current model (predicting first if needed)."""
        return self._start_listing(refresh=True)

    def _start_listing(self, refresh: bool) -> bool:
        self._enable_controls()
        if not self.active:
            return False
        volume = self.selected_volume()
        if volume is None:
            self.queue.set_candidates([])
            self.show_counts()
            if refresh:
                self._report("open a project and add a volume first (Project step)", "error")
            return False
        if self.load_job.is_running():
            if refresh:
                self._report("candidates are being listed; try again in a moment", "warning")
            return False
        project, vid, order = self.state.project, volume.id, self.order_combo.currentText()
        if refresh:
            holder = self.state.claim(vid, "the Review step")
            if holder is not None:
                self._report(f"{holder} is predicting this volume; find candidates when it has "
                             "finished", "error")  # fmt: skip
                return False
            self._loading_vid = vid

        def work(progress, cancel):
            predicted = refresh and not project.has_prediction(vid)
            if predicted:
                project.predict(vid, progress=progress, cancel=cancel)
            # the current version's prediction is there but not yet asked about: ask about it
            current = project.has_prediction(vid) and not project.candidates_current(vid)
            if refresh or current:
                project.refresh_candidates(vid, order=order)
            listed = [c for c in project.candidates(vid, status=None) if c.status != "stale"]
            masks = {c.id: project.candidate_mask(c.id) for c in listed}
            return vid, predicted, listed, masks, project.current_version().version

        self.load_job.start(work, f"{'Finding' if refresh else 'Listing'} candidates of "
                                  f"{volume.name}")  # fmt: skip
        self._enable_controls()
        return True

    def _loaded_failed(self, message: str) -> None:
        self.state.release(self._loading_vid)
        self._loading_vid = None
        self._enable_controls()
        self._report(message, "error")

    def _on_loaded(self, value) -> None:
        vid, predicted, listed, masks, current = value
        refreshed = self._loading_vid == vid  # Find (not a listing)
        self.state.release(self._loading_vid)
        self._loading_vid = None
        if predicted:
            self.state.predictions_changed.emit(vid)
        if vid != self.volume_combo.currentData():  # another volume was chosen meanwhile
            self._enable_controls()
            self.reload()
            return
        # what the worker listed may predate answers still waiting to be saved: keep ours
        waiting = self.saves.waiting_ids()
        mine = {c.id: c.status for c in self.queue.candidates if c.id in waiting}
        self.queue.set_candidates(listed)
        self.masks = masks
        for cid, status in mine.items():
            self.queue.set_status(cid, status)
        self._volume = self.state.project.volume(vid)
        self._block = block_shape(listed, self._volume.shape)  # once per list, not per answer
        versions = {c.model_version for c in listed if c.status in ("open", "skipped")}
        old = sorted(v for v in versions if v != current)
        if refreshed:
            self._report(f"{self.queue.counts()['left']} candidates to answer in "
                         f"{self._volume.name} (model v{current})")  # fmt: skip
        elif not listed:
            self._report("no candidates yet: press Find candidates")
        elif old:
            self._report(f"these candidates were proposed by model v{old[-1]}; the current "
                         f"model is v{current}: press Find candidates to ask about its "
                         "prediction", "warning")  # fmt: skip
        if self.active:
            if refreshed:  # found again (perhaps in another order): from the first to ask
                self.queue.select(-1)
            shown = self.queue.current()
            index = self.queue.index if shown is not None else self.queue.next_to_ask()
            if index >= 0:
                self.show_candidate(index)
            else:
                self.candidate_label.setText("nothing left to ask in this volume")
        self._enable_controls()

    def show_counts(self) -> None:
        c = self.queue.counts()
        self.counter_label.setText(
            f"answered {c['answered']}: {c['yes']} yes, {c['no']} no, {c['edited']} edited · "
            f"{c['skipped']} skipped · {c['left']} left"
            if self.queue.candidates
            else "no candidates listed: press Find candidates"
        )

    # ---------------------------------------------------------------- showing one
    def _image_layer(self, volume: VolumeRecord) -> Image:
        """The volume's image layer (kept: looking it up queries the ledger, which a save in
        the worker may be holding)."""
        if self._image is None or self._image not in self.viewer.layers or (
            self._image.metadata.get("project_volume") != volume.id
        ):  # fmt: skip
            self._image = self.state.show_volume(volume)
        return self._image

    def show_candidate(self, index: int) -> bool:
        """Show list row ``index``: the canvas on its widest plane with its outline (the
        candidate's layer active: the keys work), the three planes, its numbers."""
        candidate = self.queue.select(index)
        if candidate is None or self._volume is None:
            return False
        try:
            image = self._image_layer(self._volume)
            ahead = self._ahead.take(self._ahead_key(candidate, image))
            if ahead is not None:
                self.view, picture = ahead
            else:
                if candidate.id not in self.masks:
                    self.masks[candidate.id] = self.state.project.candidate_mask(candidate.id)
                self.view = self.layers.read(candidate, self.masks[candidate.id], image)
                picture = None
        except FileNotFoundError as exc:
            self._report(str(exc), "error")
            return False
        self.layers.show(candidate, self.view, image, self._block)
        if picture is None:
            picture = _planes(self.view, image)
        self.planes_label.setPixmap(_pixmap(picture))
        self._shown_at = time.monotonic()
        self.candidate_label.setText(_describe(candidate, self.queue.index,
                                               len(self.queue.candidates)))  # fmt: skip
        self._enable_controls()
        self._read_next_ahead(image)
        return True

    @staticmethod
    def _ahead_key(candidate: CandidateRecord, image: Image) -> tuple:
        """What a candidate's read-ahead view and planes depend on."""
        return (candidate.id, id(image), tuple(float(v) for v in image.contrast_limits))

    def _read_next_ahead(self, image: Image) -> None:
        """Read the candidate an answer shows next (its surroundings and three planes) in a
        worker while the user looks at this one: the key press then shows it without reading
        the image on the GUI thread."""
        index = self.queue.next_to_ask()
        if index < 0:
            return
        candidate = self.queue.candidates[index]
        cluster = self.masks.get(candidate.id)
        if cluster is None:
            return
        layers = self.layers

        def read() -> tuple[CandidateView, np.ndarray]:
            view = layers.read(candidate, cluster, image)
            return view, _planes(view, image)

        self._ahead.start(self._ahead_key(candidate, image), read)

    def _bind_keys(self, layer: Labels) -> None:
        actions = {
            "yes": lambda: self.answer("yes"), "no": lambda: self.answer("no"),
            "edit": self.edit, "skip": lambda: self.answer("skip"), "undo": self.undo,
            "previous": self.previous, "next": self.next,
        }  # fmt: skip
        for name, key in KEYS.items():
            action = actions[name]
            layer.bind_key(key, lambda _layer, action=action: action(), overwrite=True)

    def next(self) -> bool:
        return self._move(self.queue.next_index(), "this is the last candidate")

    def previous(self) -> bool:
        return self._move(self.queue.previous_index(), "this is the first candidate")

    def _move(self, index: int, message: str) -> bool:
        if index < 0:
            self._say(message)
            return False
        return self.show_candidate(index)

    # ---------------------------------------------------------------- answers
    def answer(self, answer: str) -> bool:
        """Record ``answer`` ("yes", "no" or "skip") for the shown candidate: the list and the
        counter change now, the next candidate is shown now, the ledger is written in the
        worker (a candidate answered before is first undone there)."""
        candidate = self.queue.current()
        if candidate is None:
            self._report("no candidate shown; press Find candidates", "error")
            return False
        if candidate.status == "edited":
            self._report(f"candidate {candidate.id} was edited as a patch; change it in "
                         "Patches mode", "error")  # fmt: skip
            return False
        annotator = self._annotator()
        if annotator is None:
            return False
        seconds = time.monotonic() - self._shown_at
        saves = []
        if candidate.status in ("yes", "no"):  # changing an earlier answer: undo it first
            self._forget(candidate.id)
            saves.append(Save(candidate.id, None, None, annotator, candidate.status))
        saves.append(Save(candidate.id, answer, seconds, annotator, candidate.status))
        self.history.append(candidate.id)
        self.queue.set_status(candidate.id, ANSWER_STATUS[answer])
        self.saves.add(*saves)
        self._say(f"candidate {candidate.id}: {ANSWER_WORDS[answer]}")
        self._show_next_to_ask()
        return True

    def _show_next_to_ask(self) -> None:
        index = self.queue.next_to_ask()
        if index >= 0:
            self.show_candidate(index)
        else:
            self.candidate_label.setText("nothing left to ask in this volume")
            self._report("every candidate of this volume is answered")

    def undo(self) -> bool:
        """Undo the last answer of this session (else the project's latest one): its voxels
        go back to unlabelled and its candidate is asked again, shown now."""
        annotator = self._annotator()
        if annotator is None:
            return False
        if not self.history:
            self.saves.add(Save(None, None, None, annotator, "open"))
            self._say("undoing the project's latest answer…")
            return True
        cid = self.history.pop()
        candidate = self.queue.get(cid)
        waiting = next((s for s in reversed(self.pending)
                        if s.candidate_id == cid and s.answer is not None), None)  # fmt: skip
        saves = []
        if waiting is not None:  # not written yet, and now it never will be
            self.pending.remove(waiting)
            # back to what it was, unless an earlier answer is still to be undone (re-answer)
            status = "open" if waiting.before in ("yes", "no") else waiting.before
        else:
            before = candidate.status if candidate is not None else "open"
            saves.append(Save(cid, None, None, annotator, before))
            status = "open"
        self.queue.set_status(cid, status)
        self.saves.add(*saves)
        self._say(f"candidate {cid}: answer undone")
        index = self.queue.position(cid)
        if index >= 0:
            self.show_candidate(index)
        return True

    def _forget(self, cid: int) -> None:
        if cid in self.history:
            self.history.remove(cid)

    def is_saving(self) -> bool:
        """Whether answers wait for (or are in) the worker."""
        return self.saves.is_saving()

    # ---------------------------------------------------------------- edit
    def edit(self) -> bool:
        """Open the patch around the shown candidate to paint it (the Review step's patch)."""
        candidate = self.queue.current()
        if candidate is None:
            self._report("no candidate shown; press Find candidates", "error")
            return False
        if candidate.status in ("yes", "no"):
            self._report(f"candidate {candidate.id} is answered ({candidate.status}); U undoes "
                         "the last answer", "error")  # fmt: skip
            return False
        index = self.queue.index
        self.deactivate()  # its layer and keys make way for the patch's
        if self._edit(candidate):
            return True
        self.active = True
        self.show_candidate(index)
        return False

    def edit_finished(self, candidate: CandidateRecord, edited: bool) -> None:
        """Back from the patch: the candidate is edited (its patch accepted) or asked again."""
        self.active = True
        if edited:
            self.queue.set_status(candidate.id, "edited")
            self._show_next_to_ask()
        else:
            index = self.queue.position(candidate.id)
            if index >= 0:
                self.show_candidate(index)


def _describe(candidate: CandidateRecord, index: int, total: int) -> str:
    where = ", ".join(f"{c:.0f}" for c in candidate.centre)
    return (
        f"candidate {candidate.id} ({index + 1} of {total}, {candidate.status}): "
        f"{candidate.voxels} voxels ({candidate.volume_mm3:.2f} mm³) at ({where}); "
        f"probability {candidate.mean_probability:.2f}, uncertainty "
        f"{candidate.uncertainty:.2f} bits (model v{candidate.model_version})"
    )


def _planes(view: CandidateView, image: Image) -> np.ndarray:
    """The three planes through the candidate in the image layer's contrast."""
    spacing = [float(s) for s in image.scale[-3:]]
    return orthogonal_planes(view.crop, view.mask, view.point, spacing, image.contrast_limits)


def _pixmap(picture: np.ndarray) -> QPixmap:
    height, width, _ = picture.shape
    data = np.ascontiguousarray(picture)
    image = QImage(data.data, width, height, 3 * width, QImage.Format.Format_RGB888)
    return QPixmap.fromImage(image.copy())  # the copy owns its bytes

"""The Candidates mode's answers on their way to the ledger, apart from showing candidates.

An answer changes the list at once (:class:`.review_candidate_queue.CandidateQueue`) and its
write (``project.answer``, or ``project.undo_answer``) waits here: one at a time in the step's
worker, in the order given, so a key press never waits for the disk. A write that fails puts
its candidate back as it was and says why; once none waits, ``state.answers_changed`` tells the
other steps. Kept out of :mod:`.review_candidates` so that the box only shows candidates and
reads keys, and this queue is the one place that knows what is written, what waits and what
failed. It reaches the box only through what its constructor is given.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qtpy.QtCore import QObject

from napari_pvs._widgets._jobs import BackgroundJob

if TYPE_CHECKING:
    from napari_pvs._widgets.review_candidate_queue import CandidateQueue
    from napari_pvs._widgets.state import WorkflowState


@dataclass
class Save:
    """One ledger write waiting for (or in) the step's worker: an answer, or the undoing of
    the candidate's answer (``answer`` None). ``before`` is the candidate's status to go back
    to if the write fails."""

    candidate_id: int | None
    answer: str | None
    seconds: float | None
    annotator: str
    before: str


class AnswerSaves(QObject):
    """Writes the Candidates mode's answers and undos one at a time in a worker, in order."""

    def __init__(
        self,
        parent: QObject,
        state: WorkflowState,
        queue: CandidateQueue,
        history: list[int],
        show: Callable[[int], bool],
        is_active: Callable[[], bool],
        volume_id: Callable[[], int | None],
        report: Callable[..., None],
        say: Callable[[str], None],
    ) -> None:
        super().__init__(parent)
        self.state = state
        #: the box's list: a failed write puts its candidate's status back here
        self.queue = queue
        #: the box's answered candidates, oldest first (a failed write takes its own out, a
        #: failed undo puts it back so U may try again); shared, so changed in place only
        self.history = history
        self._show = show
        self._is_active = is_active
        self._volume_id = volume_id
        self._report = report
        self._say = say
        #: writes answers and undos, one at a time, in the order given
        self.save_job = BackgroundJob(self, progress_bar=False)
        self.save_job.succeeded.connect(self._on_saved)
        self.save_job.failed.connect(self._on_save_failed)
        self.pending: deque[Save] = deque()
        self._saving: Save | None = None
        #: the ledger's answer id of each candidate answered (filled as saves return)
        self.answer_ids: dict[int, int] = {}

    def add(self, *saves: Save) -> None:
        """Queue ``saves`` in order and start the next write when none runs."""
        self.pending.extend(saves)
        self._drain()

    def waiting_ids(self) -> set[int | None]:
        """The candidates whose writes wait or run (their statuses in the list are newer than
        the ledger's)."""
        waiting = {s.candidate_id for s in self.pending}
        if self._saving is not None:
            waiting.add(self._saving.candidate_id)
        return waiting

    def forget_project(self) -> None:
        """Another project: the writes still waiting cannot be made (said), ids go."""
        if self.pending:  # the last project is closed already: these cannot be written now
            self._report(f"{len(self.pending)} answers were not saved: their project was closed "
                         "before they could be written", "warning")  # fmt: skip
        self.pending.clear()
        self.answer_ids.clear()

    def _drain(self) -> None:
        """Start the next waiting save when none runs."""
        if self.save_job.is_running() or not self.pending:
            return
        save = self.pending.popleft()
        project = self.state.project
        if save.answer is None:
            answer_id = self.answer_ids.get(save.candidate_id) if save.candidate_id else None

            def work(progress, cancel):
                undo_id = answer_id
                if save.candidate_id is not None and answer_id is None:  # answered before
                    earlier = [a for a in project.answers()
                               if a.candidate_id == save.candidate_id]  # fmt: skip
                    if not earlier:
                        return save, None, None
                    undo_id = earlier[-1].id
                record = project.undo_answer(undo_id, annotator=save.annotator)
                # open again, or stale when its version's candidates were found anew since
                after = project.candidate(record.candidate_id).status if record else None
                return save, record, after

            what = "undoing an answer"
        else:

            def work(progress, cancel):
                record = project.answer(save.candidate_id, save.answer,
                                        annotator=save.annotator, seconds=save.seconds)  # fmt: skip
                return save, record, None

            what = f"saving the answer on candidate {save.candidate_id}"
        self._saving = save
        self.save_job.start(work, what)

    def is_saving(self) -> bool:
        """Whether answers wait for (or are in) the worker."""
        return self.save_job.is_running() or bool(self.pending)

    def _on_saved(self, value) -> None:
        save, record, after = value
        self._saving = None
        if save.answer is not None:
            self.answer_ids[save.candidate_id] = record.id
        elif record is not None:
            cid = record.candidate_id
            self.answer_ids.pop(cid, None)
            if not any(s.candidate_id == cid for s in self.pending):  # nothing newer given
                self.queue.set_status(cid, after)
            if after == "stale":
                self._report(
                    f"candidate {cid}: answer undone; its model version's candidates were found "
                    "anew since, so it is not asked again",
                    "warning",
                )
            elif save.candidate_id is None:  # the project's latest answer: its candidate is back
                index = self.queue.position(cid)
                if index >= 0 and self._is_active():
                    self._show(index)
                self._say(f"candidate {cid}: answer undone")
        elif save.candidate_id is None:
            self._report("no answer to undo")
        self._drain_then_tell()

    def _drain_then_tell(self) -> None:
        """Start the next save; once none waits, tell the other steps the answers changed."""
        self._drain()
        vid = self._volume_id()
        if not self.is_saving() and vid is not None:
            self.state.answers_changed.emit(vid)

    def _on_save_failed(self, message: str) -> None:
        save, self._saving = self._saving, None
        if save is not None and save.candidate_id is not None:
            self.queue.set_status(save.candidate_id, save.before)
            if save.candidate_id in self.history:
                self.history.remove(save.candidate_id)
            # an answer that followed this write is dropped with it (it built on it)
            for later in [s for s in self.pending if s.candidate_id == save.candidate_id]:
                self.pending.remove(later)
            if save.answer is None and save.before in ("yes", "no", "skipped"):
                self.history.append(save.candidate_id)  # the answer stands: U may try again
            what = "answer" if save.answer is not None else "undo"
            self._report(f"could not save the {what} on candidate {save.candidate_id}: "
                         f"{message}; it is back in the list", "error")  # fmt: skip
        else:
            self._report(f"could not undo: {message}", "error")
        self._drain_then_tell()

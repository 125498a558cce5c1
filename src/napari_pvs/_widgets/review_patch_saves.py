"""The Patches mode's Accept and Skip on their way to the project, apart from showing patches.

Accept writes the label store and the ledger (``project.accept``, and
``project.mark_candidate_edited`` for a candidate's edit), fsynced: it runs in its own worker
with the patch's controls disabled, and the step's next action (``then``) waits for it. Skip
writes the ledger only (``project.skip``) in another worker while the step moves on at once; a
failed skip reloads the queue. Kept out of :mod:`.review` so that the step only shows and
navigates patches, and this is the one place that knows what is written, what runs and what
failed. Leaving a patch with unsaved corrections asks here too (Accept, Discard or Cancel).
It reaches the step only through what its constructor is given.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import QObject
from qtpy.QtWidgets import QWidget

from napari_pvs._widgets._jobs import BackgroundJob

if TYPE_CHECKING:
    from napari_pvs._widgets.review_layers import PatchLayers
    from napari_pvs._widgets.review_queue import ReviewQueue
    from napari_pvs._widgets.state import WorkflowState
    from napari_pvs.project import CandidateRecord, PatchRecord

#: What switching away from a patch with unsaved edits can do (the last changes nothing).
UNSAVED_CHOICES = ("Accept", "Discard", "Cancel")


class PatchSaves(QObject):
    """Accepts the open patch in one worker, records skips in another, and asks what to do
    with unsaved corrections before the step leaves a patch."""

    def __init__(
        self,
        parent: QWidget,
        state: WorkflowState,
        queue: ReviewQueue,
        layers: PatchLayers,
        patch: Callable[[], PatchRecord | None],
        editing: Callable[[], CandidateRecord | None],
        has_unsaved_edits: Callable[[], bool],
        annotator: Callable[[], str | None],
        enable_controls: Callable[[bool], None],
        saved: Callable[[PatchRecord, np.ndarray | None], None],
        reload_queue: Callable[[], None],
        report: Callable[..., None],
        say: Callable[[str], None],
    ) -> None:
        super().__init__(parent)
        #: the step: the question about unsaved corrections opens over it
        self.step = parent
        self.state = state
        #: the step's queue: an accepted or skipped row's status changes here
        self.queue = queue
        #: the patch's layers: what Accept saves is read from its labels layer
        self.layers = layers
        self._patch = patch
        self._editing = editing
        self._has_unsaved_edits = has_unsaved_edits
        self._annotator = annotator
        self._enable_controls = enable_controls
        #: tells the step what the saved patch starts from now (its labels; None: skipped)
        self._saved = saved
        self._reload_queue = reload_queue
        self._report = report
        self._say = say
        # Accept writes the label store and the ledger (fsynced): off the GUI thread too, with
        # the status line for progress (a napari progress bar costs the GUI thread 10-80 ms)
        self.accept_job = BackgroundJob(self, progress_bar=False)
        self.accept_job.succeeded.connect(self._on_accepted)
        self.accept_job.failed.connect(self._on_accept_failed)
        self._after_accept: Callable[[], object] | None = None
        self._saving_rank = 0
        # Skip writes the ledger: in its own worker, the next patch opens meanwhile
        self.skip_job = BackgroundJob(self, progress_bar=False)
        self.skip_job.succeeded.connect(self._on_skipped)
        self.skip_job.failed.connect(self._on_skip_failed)
        #: when the open patch was shown: Accept records the seconds spent on it
        self._opened_at = 0.0

    def start_clock(self) -> None:
        """A patch was just shown: the seconds its Accept records count from now."""
        self._opened_at = time.monotonic()

    def is_saving(self) -> bool:
        """Whether an Accept or a Skip runs in its worker."""
        return self.accept_job.is_running() or self.skip_job.is_running()

    def refuse_while_accepting(self) -> bool:
        """True (and says so) while an Accept is being saved: the patch must not change."""
        if not self.accept_job.is_running():
            return False
        self._report(f"saving patch {self._saving_rank}… (wait a moment)", "warning")
        return True

    def resolve_unsaved(self, retry: Callable[[], object] | None = None) -> bool:
        """Before leaving a patch: ask what to do with unsaved edits; False = stay for now.

        "Accept" saves in the worker and then calls ``retry`` (the action that asked), so the
        answer "stay" comes back at once and the action happens once the patch is saved.
        """
        if self.refuse_while_accepting():
            return False
        if not self._has_unsaved_edits():
            return True
        choice = self.state.ask(
            self.step,
            "Unsaved corrections",
            f"Patch {self._patch().rank} has corrections that are not accepted yet. Accept "
            "them, discard them, or stay on this patch?",
            list(UNSAVED_CHOICES),
        )
        if choice == "Accept":
            self.accept(retry)
            return False
        return choice == "Discard"

    def accept(self, then: Callable[[], object] | None = None) -> bool:
        """Save the open patch through ``project.accept`` in the worker, the patch's controls
        disabled meanwhile; ``then()`` runs on the GUI thread once it is saved."""
        layer = self.layers.labels()
        patch = self._patch()
        if patch is None or layer is None:
            self._report("no patch open; select one in the queue", "error")
            return False
        if self.refuse_while_accepting():
            return False
        annotator = self._annotator()
        if annotator is None:
            return False
        project, candidate, layers = self.state.project, self._editing(), self.layers
        labels = (np.asarray(layer.data) > 0).astype(np.uint8)
        seconds = time.monotonic() - self._opened_at
        # the patch Accept moves on to (the next new one): its prefill is read in the worker
        upcoming = None if candidate is not None else self.queue.row(self.queue.next_index("new"))

        def work(progress, cancel):
            annotation = project.accept(
                patch.volume_id,
                patch.start,
                patch.stop,
                labels,
                annotator=annotator,
                seconds=seconds,
                patch_id=None if candidate is not None else patch.id,
                model_version=patch.model_version,
            )
            if candidate is not None:
                project.mark_candidate_edited(candidate.id, annotation.id)
            ahead = None if upcoming is None else (upcoming, layers.prefill_labels(upcoming))
            return patch, labels, annotation, ahead

        self._after_accept, self._saving_rank = then, patch.rank
        self._enable_controls(False)
        self._say(f"saving patch {patch.rank}…")
        return self.accept_job.start(work, f"saving patch {patch.rank}")

    def _on_accepted(self, value) -> None:
        patch, labels, annotation, ahead = value
        then, self._after_accept = self._after_accept, None
        if ahead is not None:
            self.layers.keep_read_ahead(*ahead)
        self._enable_controls(self._patch() is not None)
        if patch.id >= 0:  # a queue row (not a candidate's edit)
            self.queue.set_status(patch.id, "reviewed")
        self._saved(patch, labels)
        name = self.state.project.volume(patch.volume_id).name
        what = (f"the edit of candidate {-patch.id}" if patch.id < 0
                else f"patch {patch.rank}")  # fmt: skip
        # the status line alone: a notification on every Accept floods napari's corner and
        # costs the GUI thread a widget each time (failures still notify)
        self._say(f"accepted {what} of {name} "
                  f"({annotation.pvs_voxels or 0} PVS voxels, {annotation.split})")  # fmt: skip
        self.state.queue_changed.emit(patch.volume_id)
        if then is not None:
            then()

    def _on_accept_failed(self, message: str) -> None:
        self._after_accept = None
        self._enable_controls(self._patch() is not None)
        self._report(f"could not accept patch {self._saving_rank}: {message}", "error")

    def skip(self, then: Callable[[], object]) -> bool:
        """Leave the open patch out (its edits dropped, no question) and call ``then()`` at
        once; the ledger's record is written in the worker meanwhile. A candidate's edit is
        only left unsaved (nothing is written)."""
        patch = self._patch()
        if patch is None:
            self._report("no patch open; select one in the queue", "error")
            return False
        if self.refuse_while_accepting():
            return False
        candidate = self._editing()
        if candidate is not None:
            self._saved(patch, None)
            self._report(f"left the edit of candidate {candidate.id} unsaved")
            then()
            return True
        if self.skip_job.is_running():
            self._report("saving the last skip… (wait a moment)", "warning")
            return False
        annotator = self._annotator()
        if annotator is None:
            return False
        project = self.state.project

        def work(progress, cancel):
            project.skip(patch.id, annotator=annotator)
            return patch

        self.skip_job.start(work, f"skipping patch {patch.rank}")
        self.queue.set_status(patch.id, "skipped")
        self._saved(patch, None)
        self._say(f"skipping patch {patch.rank}…")
        then()
        return True

    def _on_skipped(self, patch: PatchRecord) -> None:
        self._say(f"skipped patch {patch.rank}")
        self.state.queue_changed.emit(patch.volume_id)

    def _on_skip_failed(self, message: str) -> None:
        """The skip is not in the ledger: the patch is new again (reload the queue)."""
        self._report(f"could not skip the patch: {message}", "error")
        self._reload_queue()

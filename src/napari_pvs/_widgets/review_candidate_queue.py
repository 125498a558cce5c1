"""The Review step's candidates as a Qt-free selectable list (the shape of :mod:`.review_queue`).

It holds one volume's :class:`~napari_pvs.project.CandidateRecord` rows in asking order and the
selected position. The order: candidates answered earlier first (so Shift+N reaches them),
then the open ones in rank order, then the skipped ones (asked again only after the open
ones). ``set_status`` records an answer at once, before the ledger has it (the save runs in the
step's worker; a failed save sets the status back), so the counter and the next candidate
never wait for the disk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from napari_pvs.project import CandidateRecord

#: Statuses still to be asked, in the order they are asked.
TO_ASK = ("open", "skipped")
#: Statuses of a finished answer: the candidate's voxels are labelled (or it became a patch).
ANSWERED = ("yes", "no", "edited")


def asking_order(candidates: Sequence[CandidateRecord]) -> list[CandidateRecord]:
    """Answered ones first (by id), then open by rank, then skipped by rank; stale left out."""

    def key(record: CandidateRecord) -> tuple[int, int, int]:
        if record.status in ANSWERED:
            return (0, 0, record.id)
        return (1 + TO_ASK.index(record.status), record.rank, record.id)

    return sorted((c for c in candidates if c.status != "stale"), key=key)


class CandidateQueue:
    """Candidates in asking order and the selected one (``index``, -1 when none)."""

    def __init__(self) -> None:
        self.candidates: list[CandidateRecord] = []
        self.index = -1
        self._listeners: list[Callable[[], None]] = []

    def connect(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def set_candidates(self, candidates: Sequence[CandidateRecord]) -> None:
        """Replace the rows, keeping the selected candidate selected when it is still there."""
        selected = self.current()
        self.candidates = asking_order(candidates)
        self.index = self.position(selected.id) if selected is not None else -1
        self._changed()

    def current(self) -> CandidateRecord | None:
        return self.candidates[self.index] if 0 <= self.index < len(self.candidates) else None

    def position(self, candidate_id: int) -> int:
        return next((i for i, c in enumerate(self.candidates) if c.id == candidate_id), -1)

    def get(self, candidate_id: int) -> CandidateRecord | None:
        i = self.position(candidate_id)
        return self.candidates[i] if i >= 0 else None

    def select(self, index: int) -> CandidateRecord | None:
        self.index = index if 0 <= index < len(self.candidates) else -1
        return self.current()

    def next_index(self) -> int:
        return self.index + 1 if self.index + 1 < len(self.candidates) else -1

    def previous_index(self) -> int:
        return self.index - 1 if self.index > 0 else -1

    def next_to_ask(self) -> int:
        """The first open candidate after the selected one (else before it), then the first
        skipped one other than the selected; -1 when nothing is left to ask."""
        count = len(self.candidates)
        start = self.index + 1 if self.index >= 0 else 0
        for status in TO_ASK:
            for step in range(count):
                i = (start + step) % count
                if i != self.index and self.candidates[i].status == status:
                    return i
        return -1

    def set_status(self, candidate_id: int, status: str) -> None:
        i = self.position(candidate_id)
        if i >= 0 and self.candidates[i].status != status:
            self.candidates[i] = replace(self.candidates[i], status=status)
            self._changed()

    def counts(self) -> dict[str, int]:
        """Candidates by status, with ``answered`` (yes + no + edited) and ``left`` (to ask)."""
        out = {"open": 0, "yes": 0, "no": 0, "skipped": 0, "edited": 0}
        for candidate in self.candidates:
            out[candidate.status] = out.get(candidate.status, 0) + 1
        out["answered"] = sum(out[s] for s in ANSWERED)
        out["left"] = sum(out[s] for s in TO_ASK)
        return out

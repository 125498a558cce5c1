"""The Review step's candidates as a Qt-free selectable list (the shape of :mod:`.review_queue`).

It holds one volume's :class:`~napari_pvs.project.CandidateRecord` rows in asking order and the
selected position. The order: candidates answered earlier first (so Shift+N reaches them),
then the open ones in rank order, then the skipped ones (asked again only after the open
ones). ``set_status`` records an answer at once, before the ledger has it (the save runs in the
step's worker; a failed save sets the status back), so the counter and the next candidate
never wait for the disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from napari_pvs._widgets.review_queue import SelectableRows

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


class CandidateQueue(SelectableRows):
    """Candidates in asking order and the selected one (``index``, -1 when none)."""

    ordered = staticmethod(asking_order)

    @property
    def candidates(self) -> list[CandidateRecord]:
        return self.rows

    def set_candidates(self, candidates: Sequence[CandidateRecord]) -> None:
        self.set_rows(candidates)

    def get(self, candidate_id: int) -> CandidateRecord | None:
        i = self.position(candidate_id)
        return self.candidates[i] if i >= 0 else None

    def next_index(self) -> int:
        return self.index + 1 if self.index + 1 < len(self.candidates) else -1

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

    def counts(self) -> dict[str, int]:
        """Candidates by status, with ``answered`` (yes + no + edited) and ``left`` (to ask)."""
        out = {"open": 0, "yes": 0, "no": 0, "skipped": 0, "edited": 0}
        for candidate in self.candidates:
            out[candidate.status] = out.get(candidate.status, 0) + 1
        out["answered"] = sum(out[s] for s in ANSWERED)
        out["left"] = sum(out[s] for s in TO_ASK)
        return out

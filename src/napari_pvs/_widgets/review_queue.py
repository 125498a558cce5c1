"""The Review step's queue as a Qt-free selectable list (the napari-animation key-frame shape).

It holds the project's :class:`~napari_pvs.project.PatchRecord` rows in display order and the
selected position; ``select_next``/``select_previous`` move it and ``set_status`` records what
the user did. Listeners (the Qt table) are plain callbacks, so the logic is testable without a
display.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from napari_pvs.project import PatchRecord


def display_order(patches: Sequence[PatchRecord]) -> list[PatchRecord]:
    """Newest model version's queue first, each in rank order (reviewed rows keep their place)."""
    return sorted(patches, key=lambda p: (-(p.model_version or 0), p.rank, p.id))


class SelectableRows:
    """Records in an order, the selected one (``index``, -1 when none) and plain-callback
    listeners; a subclass gives the order (:meth:`ordered`)."""

    def __init__(self) -> None:
        self.rows: list = []
        self.index = -1
        self._listeners: list[Callable[[], None]] = []

    @staticmethod
    def ordered(rows: Sequence) -> list:
        return list(rows)

    def connect(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def set_rows(self, rows: Sequence) -> None:
        """Replace the rows, keeping the selected row selected when it is still there."""
        selected = self.current()
        self.rows = self.ordered(rows)
        self.index = self.position(selected.id) if selected is not None else -1
        self._changed()

    def current(self):
        return self.row(self.index)

    def row(self, index: int):
        """The record at ``index``; None when there is none (``index`` -1 included)."""
        return self.rows[index] if 0 <= index < len(self.rows) else None

    def position(self, row_id: int) -> int:
        return next((i for i, r in enumerate(self.rows) if r.id == row_id), -1)

    def select(self, index: int):
        self.index = index if 0 <= index < len(self.rows) else -1
        return self.current()

    def previous_index(self) -> int:
        return self.index - 1 if self.index > 0 else -1

    def set_status(self, row_id: int, status: str) -> None:
        i = self.position(row_id)
        if i >= 0 and self.rows[i].status != status:
            self.rows[i] = replace(self.rows[i], status=status)
            self._changed()


class ReviewQueue(SelectableRows):
    """Patches in display order and the selected one (``index``, -1 when none)."""

    ordered = staticmethod(display_order)

    @property
    def patches(self) -> list[PatchRecord]:
        return self.rows

    def set_patches(self, patches: Sequence[PatchRecord]) -> None:
        self.set_rows(patches)

    def next_index(self, status: str | None = None) -> int:
        """The next row after the selected one (with ``status``, if given); -1 if none."""
        for i in range(self.index + 1, len(self.patches)):
            if status is None or self.patches[i].status == status:
                return i
        return -1

    def first_new(self) -> int:
        return next((i for i, p in enumerate(self.patches) if p.status == "new"), -1)

    def counts(self) -> dict[str, int]:
        out = {"new": 0, "reviewed": 0, "skipped": 0}
        for patch in self.patches:
            out[patch.status] = out.get(patch.status, 0) + 1
        return out

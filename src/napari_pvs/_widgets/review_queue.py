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


class ReviewQueue:
    """Patches in display order and the selected one (``index``, -1 when none)."""

    def __init__(self) -> None:
        self.patches: list[PatchRecord] = []
        self.index = -1
        self._listeners: list[Callable[[], None]] = []

    def connect(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def set_patches(self, patches: Sequence[PatchRecord]) -> None:
        """Replace the rows, keeping the selected patch selected when it is still there."""
        selected = self.current()
        self.patches = display_order(patches)
        ids = [p.id for p in self.patches]
        self.index = ids.index(selected.id) if selected is not None and selected.id in ids else -1
        self._changed()

    def current(self) -> PatchRecord | None:
        return self.patches[self.index] if 0 <= self.index < len(self.patches) else None

    def position(self, patch_id: int) -> int:
        return next((i for i, p in enumerate(self.patches) if p.id == patch_id), -1)

    def select(self, index: int) -> PatchRecord | None:
        self.index = index if 0 <= index < len(self.patches) else -1
        return self.current()

    def next_index(self, status: str | None = None) -> int:
        """The next row after the selected one (with ``status``, if given); -1 if none."""
        for i in range(self.index + 1, len(self.patches)):
            if status is None or self.patches[i].status == status:
                return i
        return -1

    def previous_index(self) -> int:
        return self.index - 1 if self.index > 0 else -1

    def first_new(self) -> int:
        return next((i for i, p in enumerate(self.patches) if p.status == "new"), -1)

    def set_status(self, patch_id: int, status: str) -> None:
        i = self.position(patch_id)
        if i >= 0:
            self.patches[i] = replace(self.patches[i], status=status)
            self._changed()

    def counts(self) -> dict[str, int]:
        out = {"new": 0, "reviewed": 0, "skipped": 0}
        for patch in self.patches:
            out[patch.status] = out.get(patch.status, 0) + 1
        return out

"""What a user may write to name a volume of a project: ``#2`` (an id), a name, or its path.

A volume named only with digits must never be mistaken for an id (that annotated the wrong
scan), so an id is written ``#2`` (or given as a number, e.g. ``--id 2``); any other word is the
volume's name, and the path a volume was added with names it too; a bare number that names no
volume is refused with a sentence saying how to write an id. Every string reference of the
project (``Project.volume``, ``accept``, ``rank``, ``labels``, ``remove_volume``...) follows these
rules. Reached as :meth:`Project.find_volume`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from napari_pvs.project.volumes import Volumes


def parse_id(text: str) -> int | None:
    """The id of ``#N`` (``None`` for anything else)."""
    text = str(text).strip()
    if text.startswith("#") and text[1:].isdigit():
        return int(text[1:])
    return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def find_volume(project: Volumes, ref: str | int, *, by_id: bool = False):
    """The live volume ``ref`` names in ``project``: ``#N`` or an int (or ``by_id``) is an id,
    else a name, else the path it was added with. ``ValueError`` (listing the volumes) when
    none matches; a removed volume's sentence comes from ``Volumes.volume``."""
    if isinstance(ref, int) or by_id:
        try:
            return project.volume(int(ref))
        except (TypeError, ValueError) as exc:
            if isinstance(ref, int) or str(ref).isdigit():
                raise
            raise ValueError(f"--id must be a number, got {ref!r}") from exc
    text = str(ref)
    number = parse_id(text)
    if number is not None:
        return project.volume(number)
    live = project.rows()
    for record in live:
        if record.name == text:
            return record
    path = Path(text).expanduser().absolute()
    for record in live:
        if _same_file(record.path, path):
            return record
    live_ids = {r.id for r in live}
    for record in project.rows(include_removed=True):
        if record.id not in live_ids and text in (record.name, str(record.path)):
            return project.volume(record.id)  # raises the sentence saying it was removed
    names = ", ".join(f"#{r.id} {r.name} ({r.path})" for r in live) or "none"
    hint = f" (for the volume id {text} write #{text} or --id {text})" if text.isdigit() else ""
    raise ValueError(
        f"no volume {text!r} in the project{hint} (an id is written #N, a name as is, or the "
        f"path it was added with); volumes: {names}"
    )

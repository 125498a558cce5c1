"""The fixed names inside a project folder (the layout in ``docs/project.md``)."""

from __future__ import annotations

from pathlib import Path

MARKER = "napari-pvs-project.json"
MARKER_FORMAT = "napari-pvs-project"
LEDGER = "ledger.sqlite"
LOCK = "lock"
#: The folders every project has from its creation on.
FOLDERS = ("volumes", "predictions", "models", "rounds", "exports", "journal")


def label_store_path(folder: Path, volume_id: int) -> Path:
    """The zarr label store of a volume of the project in ``folder``."""
    return folder / "volumes" / str(volume_id) / "labels.zarr"

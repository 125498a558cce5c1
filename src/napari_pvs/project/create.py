"""Making a new project folder, built under a temporary name and renamed (all or nothing)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from napari_pvs import atomic
from napari_pvs.project.layout import FOLDERS, LEDGER, MARKER, MARKER_FORMAT
from napari_pvs.project.ledger import create_ledger
from napari_pvs.project.records import now
from napari_pvs.project.schema import SCHEMA_VERSION
from napari_pvs.project.versions import insert_initial_version


def create_project_folder(
    folder: str | os.PathLike,
    *,
    model: str | os.PathLike,
    seed: int,
    validation_fraction: float,
    validation_max: int,
) -> Path:
    """The new project's folder (see :meth:`Project.create <napari_pvs.project.Project.create>`
    for the arguments and what is refused)."""
    from napari_pvs.models import default_checkpoint_path
    from napari_pvs.models.checkpoint_checks import bundled_metadata

    folder = Path(folder).expanduser().absolute()
    if folder.is_dir():  # a create killed half-way through a contents swap (a mount point)
        atomic.settle_contents(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        what = "a napari-pvs project" if (folder / MARKER).exists() else "files"
        raise FileExistsError(
            f"{folder} already holds {what}; choose a new or empty folder "
            "(open an existing project with Project.open / napari-pvs project status)"
        )
    if not 0 <= float(validation_fraction) <= 0.5:
        raise ValueError(
            f"validation_fraction must be between 0 and 0.5, got {validation_fraction}"
        )
    if int(validation_max) < 0:
        raise ValueError(f"validation_max must be >= 0, got {validation_max}")
    source = default_checkpoint_path() if str(model) == "default" else Path(model)
    # the bundled checkpoint as shipped: its digest, no torch; anything else read in full
    meta = bundled_metadata(source) if str(model) == "default" else None
    if meta is None:
        from napari_pvs.models.checkpoint import read_checkpoint

        _, meta = read_checkpoint(source)  # refuses a missing, corrupt or tampered checkpoint
    created = now()
    with atomic.atomic_output(folder, overwrite=folder.exists()) as tmp:
        tmp.mkdir()
        for sub in FOLDERS:
            (tmp / sub).mkdir()
        with atomic.atomic_output(tmp / "models" / "v0.safetensors") as ckpt:
            shutil.copyfile(source, ckpt)
        create_ledger(
            tmp / LEDGER,
            {
                "schema_version": SCHEMA_VERSION,
                "created": created,
                "seed": int(seed),
                "validation_fraction": float(validation_fraction),
                "validation_max": int(validation_max),
                "current_version": 0,
                "initial_model": str(model),
            },
            created=created,
            detail={"model": str(model), "seed": int(seed)},
            initial_rows=lambda db: insert_initial_version(db, meta, created),
        )
        atomic.write_text(
            tmp / MARKER, json.dumps({"format": MARKER_FORMAT, "created": created}, indent=1)
        )
    return folder

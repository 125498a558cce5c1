"""Repair on open: finish what a killed process left half done; never touch acknowledged data."""

from __future__ import annotations

from napari_pvs.project.annotations import Annotations
from napari_pvs.project.records import ProjectError
from napari_pvs.project.round_log import RoundLog
from napari_pvs.project.volumes import Volumes


def repair(volumes: Volumes, annotations: Annotations, round_log: RoundLog) -> None:
    """Run the repair steps in order (a project opened for writing runs them first)."""
    # 1-2. Accepts whose intent committed are finished from the journal; other journal files go.
    annotations.finish_interrupted()
    # 3. Label stores: each live volume has one (created if missing and never annotated).
    for volume in volumes.rows(include_removed=True):
        store = volumes.label_store_path(volume.id)
        if not store.is_dir():
            annotated = annotations.count(volume.id)
            if annotated:
                raise ProjectError(
                    f"the label store {store} of volume {volume.name!r} is missing but the "
                    f"ledger records {annotated} annotations in it; restore it from a backup"
                )
            volumes.create_label_store(volume.id, volume.shape)
        for partial in store.rglob("*.partial"):
            partial.unlink()  # zarr's temporary chunk files of a killed write
    # 4. Rounds whose process died: failed; their unacknowledged files go.
    round_log.fail_interrupted()

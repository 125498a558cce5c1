"""Repair on open: finish what a killed process left half done; never touch acknowledged data."""

from __future__ import annotations

import os

import numpy as np

from napari_pvs.project.annotations import Annotations
from napari_pvs.project.answers import Answers
from napari_pvs.project.records import ProjectError, now
from napari_pvs.project.round_log import RoundLog
from napari_pvs.project.volumes import Volumes


def repair(
    volumes: Volumes, annotations: Annotations, answers: Answers, round_log: RoundLog
) -> None:
    """Run the repair steps in order (a project opened for writing runs them first)."""
    # 1-2. Accepts whose intent committed are finished from the journal; other journal files go.
    annotations.finish_interrupted()
    # 2b. Answers (and undos) whose intent committed are finished from their intent rows.
    answers.finish_interrupted()
    # 3. Label stores: each live volume has one (created if missing and never annotated); a
    # removed volume's store is in archive/.
    for volume in volumes.rows():
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


def repair_label_stores(volumes: Volumes, annotations: Annotations) -> list[dict]:
    """``napari-pvs project repair``: move every unreadable label chunk aside, keep the rest.

    Each damaged chunk file goes to ``damaged/<time>/`` (same relative path, nothing deleted);
    the chunk's region is made consistent again (a lost ``labels`` chunk clears ``reviewed``
    there, a lost ``reviewed`` chunk marks the labels unreviewed), so those voxels are simply
    unreviewed; every intact annotation keeps its labels. The volume's labels become writable
    again. Returns, per repaired volume, the files moved and the annotations that overlapped
    them (to review again).
    """
    import zarr

    from napari_pvs.project.volumes import UNREVIEWED

    folder = volumes.folder
    aside = folder / "damaged" / now().replace(":", "-")
    reports = []
    for record in volumes.rows(include_removed=True):
        store = volumes.label_store_path(record.id)
        flagged = volumes.labels_damaged_error(record.id) is not None
        if not store.is_dir():
            continue
        damaged = volumes.damaged_label_chunks(record.id)
        if not damaged and not flagged:
            continue
        moved, regions = [], []
        for name, index, key, _reason in damaged:
            target = aside / key.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(key, target)
            moved.append(str(target))
            group = zarr.open_group(str(store), mode="r+")
            chunks, shape = group[name].chunks, group[name].shape
            region = tuple(
                slice(i * c, min((i + 1) * c, s))
                for i, c, s in zip(index, chunks, shape, strict=True)
            )
            size = tuple(r.stop - r.start for r in region)
            if name == "labels":
                group["reviewed"][region] = np.zeros(size, dtype=bool)
            else:
                group["labels"][region] = np.full(size, UNREVIEWED, dtype=np.uint8)
            regions.append(region)
        touched = sorted(
            a.id
            for a in annotations.annotations(record.id)
            if any(
                all(a.start[d] < r[d].stop and r[d].start < a.stop[d] for d in range(3))
                for r in regions
            )
        )
        detail = {"moved": moved, "annotations_touched": touched}
        volumes.record_labels_repaired(record.id, detail)
        reports.append({"volume": record.id, "name": record.name, **detail})
    return reports

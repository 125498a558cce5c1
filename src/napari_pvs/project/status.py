"""The project's status: what ``napari-pvs project status`` prints and the GUI's tables show."""

from __future__ import annotations

from typing import Any

from napari_pvs.project.annotations import Annotations
from napari_pvs.project.answers import Answers
from napari_pvs.project.candidates import Candidates
from napari_pvs.project.ledger import Ledger
from napari_pvs.project.queue import Queue
from napari_pvs.project.round_log import RoundLog
from napari_pvs.project.versions import Versions
from napari_pvs.project.volumes import Volumes


def project_status(
    ledger: Ledger,
    volumes: Volumes,
    annotations: Annotations,
    queue: Queue,
    versions: Versions,
    round_log: RoundLog,
    candidates: Candidates,
    answers: Answers,
) -> dict[str, Any]:
    """Volumes, reviewed patches and answers, versions with metrics, the current one, rounds."""
    rows = []
    for v in volumes.volumes():
        accepted = annotations.annotations(v.id)
        patches = queue.queue(v.id)
        rows.append(
            {
                "id": v.id,
                "name": v.name,
                "path": str(v.path),
                "shape": list(v.shape),
                "modality": v.modality,
                "annotations": len(accepted),
                "validation": sum(a.split == "validation" for a in accepted),
                "pvs_voxels": sum(a.pvs_voxels or 0 for a in accepted),
                "queue_new": sum(p.status == "new" for p in patches),
                "skipped": sum(p.status == "skipped" for p in patches),
                "answers": answers.counts(v.id)["total"],
                "candidates_open": candidates.counts(v.id)["open"],
                "predicted_versions": versions.predicted_versions(v.id),
            }
        )
    return {
        "path": str(ledger.folder),
        "schema_version": ledger.schema_version,
        "volumes": rows,
        "answers": answers.counts(),
        "versions": versions.compare(),
        "current_version": versions.current_version().version,
        "rounds": [
            {
                "id": r.id,
                "status": r.status,
                "base_version": r.base_version,
                "new_version": r.new_version,
                "annotations": len(r.snapshot_annotation_ids),
                "message": r.message,
            }
            for r in round_log.rounds()
        ],
        "stop_hint": round_log.stop_hint(),
    }

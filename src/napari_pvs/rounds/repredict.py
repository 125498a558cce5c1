"""After a round's training: predict the volumes that have annotations or a queue with the new
version into ``rounds/r<N>/predictions/`` and rank their patches for the next review."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from napari_pvs import atomic
from napari_pvs.progress import check_cancelled


def predict_and_rank(plan, model, emit, cancel) -> dict[str, list[dict[str, Any]]]:
    """Predict every target volume of ``plan`` with ``model`` and rank it (unless the round
    does not re-rank); the new queue rows per volume id. A volume with nothing left to rank
    gets an empty queue and a stage event saying why."""
    import zarr

    from napari_pvs.inference import Predictor
    from napari_pvs.io import open_volume
    from napari_pvs.ranking import rank_patches

    queues: dict[str, list[dict[str, Any]]] = {}
    targets = plan["volumes"]
    for index, target in enumerate(targets, start=1):
        check_cancelled(cancel)
        emit(
            {
                "kind": "stage",
                "message": f"predicting {target['name']} ({index}/{len(targets)}) with "
                f"v{plan['new_version']}",
            }
        )
        volume = open_volume(target["path"], modality=target["modality"])
        out = Path(target["prediction"])
        remove_output(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        Predictor(model, modality=target["modality"], **plan["predictor"]).predict(
            volume, out, cancel=cancel
        )
        atomic.fsync_path(out)
        if not plan["config"]["rerank"]:
            continue
        labels = zarr.open_group(target["labels"], mode="r")["labels"]
        try:
            ranked = rank_patches(
                out,
                n=plan["queue"]["n"],
                patch=plan["queue"]["patch"],
                strategy=plan["queue"]["strategy"],
                exclude=labels,
                exclude_boxes=[tuple(b) for b in target["skipped"]],
                seed=plan["config"]["seed"],
                image=volume,
            )
        except ValueError as exc:  # nothing left to rank: say so, keep the round
            emit({"kind": "stage", "message": f"no queue for {target['name']}: {exc}"})
            ranked = []
        queues[str(target["id"])] = [asdict(r) for r in ranked]
    return queues


def remove_output(path: Path) -> None:
    """Remove a prediction store (a folder) or file left at ``path``, if any."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()

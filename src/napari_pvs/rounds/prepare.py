"""Part 1 of a round, in the process holding the project: freeze the accepted annotations
(ledger row ``running`` with their ids) and the yes/no answers into the snapshot and write down
the round's plan. Accepts and answers made later go to the next round."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from napari_pvs.progress import Cancelled
from napari_pvs.rounds.config import RoundConfig
from napari_pvs.rounds.snapshot import ANSWER_LABELS, write_snapshot


def prepare_round(project, config: RoundConfig | None = None) -> dict[str, Any]:
    """Freeze the accepted annotations into a snapshot and return the round's plan (JSON-able).

    ValueError when there is neither a training annotation nor a training answer, or another
    round is running.
    """
    config = config or RoundConfig()
    project._require_writable()
    answered = [a for a in project.answers(split="train") if a.answer in ANSWER_LABELS]
    if not project.annotations(split="train") and not answered:
        raise ValueError(
            "the project has no accepted training annotations yet; review and accept some "
            "patches (napari-pvs project queue / project accept) or answer some candidates "
            "(napari-pvs project candidates / project answer) first"
        )
    record = project._begin_round(asdict(config))
    try:
        return _write_plan(project, record, config)
    except BaseException as exc:
        status = "cancelled" if isinstance(exc, Cancelled | KeyboardInterrupt) else "failed"
        project._finish_round(record.id, status, f"preparing the snapshot failed: {exc}")
        raise


def _write_plan(project, record, config: RoundConfig) -> dict[str, Any]:
    """Write the snapshot; return the plan, everything the worker needs (no ledger access)."""
    from napari_pvs.models.checkpoint_checks import manifest_hash  # torch-free: GUI process

    folder = project.path / "rounds" / f"r{record.id}"
    (folder / "train").mkdir(parents=True, exist_ok=True)
    snapshot, manifest = write_snapshot(project, record, folder)
    settings = project.settings()
    targets = _prediction_targets(project, folder)
    return {
        "round": record.id,
        "project": str(project.path),
        "folder": str(folder),
        "snapshot": str(snapshot),
        "base_version": record.base_version,
        "base_checkpoint": str(project.checkpoint_path(record.base_version)),
        "new_version": record.new_version,
        "checkpoint": str(project.path / "models" / f"v{record.new_version}.safetensors"),
        "config": asdict(config),
        "manifest_hash": manifest_hash(manifest),
        "volumes": targets,
        "predictor": project.predictor_options(device=config.device),
        "queue": {
            "strategy": config.strategy or settings["strategy"],
            "n": int(config.n or settings["n"]),
            "patch": int(settings["patch"]),
        },
    }


def _prediction_targets(project, folder) -> list[dict[str, Any]]:
    """The volumes the new version re-predicts (and re-ranks): those with annotations, answers
    or a queue, with where their labels are and where their prediction goes."""
    targets = []
    for volume in project.volumes():
        if project.annotations(volume.id) or project.answers(volume.id) or project.queue(volume.id):
            targets.append(
                {
                    "id": volume.id,
                    "name": volume.name,
                    "path": str(volume.path),
                    "modality": volume.modality,
                    "labels": str(project._label_store_path(volume.id)),
                    "skipped": project.excluded_boxes(volume.id),
                    "prediction": str(folder / "predictions" / f"{volume.id}.zarr"),
                }
            )
    return targets

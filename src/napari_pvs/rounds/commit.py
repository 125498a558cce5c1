"""Part 3 of a round, in the project's process: put the predictions in place and commit the
version, ``current``, the round status and the new queues in one ledger transaction; or
record a failed or cancelled round, leaving the previous version current."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from napari_pvs import atomic
from napari_pvs.rounds.config import RoundOutcome
from napari_pvs.rounds.repredict import remove_output


def commit_round(project, plan: dict[str, Any], result: dict[str, Any]) -> RoundOutcome:
    """Move the round's predictions into place and commit it (one ledger transaction)."""
    from napari_pvs.ranking import RankedPatch
    from napari_pvs.validation import GuardDecision

    number = int(plan["new_version"])
    queues: dict[int, list[RankedPatch]] = {}
    for target in plan["volumes"]:
        source = Path(target["prediction"])
        if source.is_dir():
            final = project.prediction_path(target["id"], number)
            final.parent.mkdir(parents=True, exist_ok=True)
            remove_output(final)
            os.replace(source, final)
            atomic.fsync_folder(final.parent)
        rows = result["queues"].get(str(target["id"]))
        if rows is None:
            continue
        # Patches reviewed while the round ran are not queued again.
        reviewed = project.labels(target["id"])["reviewed"]
        kept = []
        for row in rows:
            box = tuple(
                slice(a, b) for a, b in zip(row["bbox_start"], row["bbox_stop"], strict=True)
            )
            if not np.asarray(reviewed[box]).any():
                kept.append(RankedPatch(**{**row, "rank": len(kept) + 1}))
        queues[int(target["id"])] = kept
    metrics = result["metrics"]
    worse = bool(metrics.get("worse_than_base"))
    message = f"v{number} is current"
    if worse:
        message = GuardDecision(**metrics["guard"]).sentence(number, int(plan["base_version"]))
    version = project._commit_round(
        plan["round"],
        metrics=metrics,
        manifest_hash=plan["manifest_hash"],
        queues=queues,
        make_current=not worse,
        message=message,
        checkpoint_sha256=result.get("checkpoint_sha256"),
    )
    _clean_work(plan)
    return RoundOutcome(
        round=plan["round"],
        status="done",
        version=version.version,
        metrics=metrics,
        message=message,
        stop_hint=project.stop_hint(),
        current=not worse,
    )


def abandon_round(project, plan: dict[str, Any], status: str, message: str) -> RoundOutcome:
    """Record a failed or cancelled round; the previous version stays current."""
    current = project.current_version().version
    message = f"{message}; v{current} stays current"
    project._finish_round(plan["round"], status, message)
    _clean_work(plan)
    return RoundOutcome(round=plan["round"], status=status, version=current, message=message)


def _clean_work(plan: dict[str, Any]) -> None:
    """Drop the round's intermediate files (fit's checkpoints, unplaced predictions); the
    snapshot, events and worker log stay as the round's record."""
    for name in ("predictions", "train"):
        shutil.rmtree(Path(plan["folder"]) / name, ignore_errors=True)

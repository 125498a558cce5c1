"""The ledger's rounds: their rows only (the work itself is :mod:`napari_pvs.rounds`).

A round freezes the accepted annotations and allocates its version number when it begins; it
ends committed (a ready, current version with new queues, in one transaction), failed or
cancelled (the current version stays). Files of versions that never became ready are removed.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

from napari_pvs import atomic
from napari_pvs.models.checkpoint_checks import metadata_if_unchanged
from napari_pvs.project.annotations import Annotations
from napari_pvs.project.ledger import Ledger
from napari_pvs.project.queue import Queue
from napari_pvs.project.records import ModelVersion, RoundRecord, now
from napari_pvs.project.settings import Settings
from napari_pvs.project.versions import Versions

#: A round whose validation Dice gains less than this did not improve (stopping hint).
STOP_MIN_GAIN = 0.005


class RoundLog:
    """The ``rounds`` table."""

    def __init__(
        self,
        ledger: Ledger,
        versions: Versions,
        queue: Queue,
        annotations: Annotations,
        settings: Settings,
    ) -> None:
        self._ledger = ledger
        self._versions = versions
        self._queue = queue
        self._annotations = annotations
        self._settings = settings

    def rounds(self) -> list[RoundRecord]:
        rows = self._ledger.query(
            "SELECT id, started, finished, status, base_version, new_version, config, "
            "snapshot_annotation_ids, message FROM rounds ORDER BY id"
        )
        return [
            RoundRecord(
                id=r[0],
                started=r[1],
                finished=r[2],
                status=r[3],
                base_version=r[4],
                new_version=r[5],
                config=json.loads(r[6]),
                snapshot_annotation_ids=json.loads(r[7]),
                message=r[8],
            )
            for r in rows
        ]

    def round(self, round_id: int) -> RoundRecord:
        for record in self.rounds():
            if record.id == int(round_id):
                return record
        raise ValueError(f"there is no round {round_id}")

    def begin_round(self, config: dict[str, Any]) -> RoundRecord:
        """Freeze the round's annotation set and allocate its version number (one transaction).

        Refused while another round is running.
        """
        with self._ledger.transaction() as db:
            if db.execute("SELECT 1 FROM rounds WHERE status = 'running'").fetchone():
                raise ValueError("a round is already running in this project; wait or cancel it")
            ids = self._annotations.ids()
            newest_round = db.execute("SELECT MAX(new_version) FROM rounds").fetchone()[0]
            newest = max(self._versions.newest(), int(newest_round or 0))
            base = self._versions.current_number()
            cursor = db.execute(
                "INSERT INTO rounds(started, status, base_version, new_version, config, "
                "snapshot_annotation_ids) VALUES (?, 'running', ?, ?, ?, ?)",
                (now(), base, newest + 1, json.dumps(config), json.dumps(ids)),
            )
            round_id = int(cursor.lastrowid)
            self._ledger.event(
                "round-start",
                {"round": round_id, "base_version": base, "annotations": len(ids)},
                db,
            )
        return self.round(round_id)

    def commit_round(
        self,
        round_id: int,
        *,
        metrics: dict[str, Any],
        manifest_hash: str,
        queues: dict[int, list[Any]],
        strategy: str | None = None,
        make_current: bool = True,
        message: str | None = None,
        checkpoint_sha256: str | None = None,
    ) -> ModelVersion:
        """Make the round's checkpoint a ready version, current with its new queues; with
        ``make_current`` False (the worse-round guard) it is kept as a ready version only and
        the current version and its queues stay.

        The checkpoint is verified before it can become current: by ``checkpoint_sha256``, the
        digest of the bytes the round's worker wrote and read back in full (no torch here, which
        may be napari's process), or else by a full read.
        """
        info = self.round(round_id)
        number = int(info.new_version)
        checkpoint = self._ledger.folder / "models" / f"v{number}.safetensors"
        if checkpoint_sha256:
            metadata_if_unchanged(checkpoint, checkpoint_sha256)
        else:
            from napari_pvs.models.checkpoint import read_checkpoint

            read_checkpoint(checkpoint)
        atomic.fsync_path(checkpoint)
        with self._ledger.transaction() as db:
            self._versions.add_ready(
                number,
                parent=info.base_version,
                metrics=metrics,
                manifest_hash=manifest_hash,
                round_id=round_id,
                db=db,
            )
            if make_current:
                self._versions.make_current(number, db)
                for volume_id, ranked in queues.items():
                    self._queue.record_queue(
                        volume_id, ranked, model_version=number, round=round_id, db=db
                    )
            db.execute(
                "UPDATE rounds SET status = 'done', finished = ?, message = ? WHERE id = ?",
                (now(), message or f"v{number} is current", round_id),
            )
            self._ledger.event(
                "round-done",
                {"round": round_id, "version": number, "metrics": metrics,
                 "current": bool(make_current)},
                db,
            )  # fmt: skip
        return self._versions.version(number)

    def finish_round(self, round_id: int, status: str, message: str) -> None:
        """Mark a round failed or cancelled; the current version stays as it was."""
        with self._ledger.transaction() as db:
            db.execute(
                "UPDATE rounds SET status = ?, finished = ?, message = ? WHERE id = ? "
                "AND status = 'running'",
                (status, now(), message, int(round_id)),
            )
            self._ledger.event(f"round-{status}", {"round": int(round_id), "message": message}, db)
        self.remove_orphans()

    def stop_hint(self, patience: int | None = None) -> str | None:
        """A sentence when the last ``patience`` rounds did not improve validation Dice.

        Each round scores its base and its new model on the same validation patches (the set
        may grow between rounds), so its gain is ``validation_dice - base_validation_dice``;
        a gain under :data:`STOP_MIN_GAIN` is no improvement. None while rounds still pay.
        """
        patience = int(patience or self._settings.settings()["stop_patience"])
        gains = []
        for version in self._versions.versions():
            new = version.metrics.get("validation_dice")
            old = version.metrics.get("base_validation_dice")
            if version.round is not None and version.status == "ready" and None not in (new, old):
                gains.append(float(new) - float(old))
        recent = gains[-patience:]
        if len(recent) < patience or max(recent) >= STOP_MIN_GAIN:
            return None
        return (
            f"validation Dice has not improved for {patience} rounds (gains "
            f"{', '.join(f'{g:+.3f}' for g in recent)}); more labels of the same kind may no "
            "longer pay: review other regions or stop"
        )

    def fail_interrupted(self) -> None:
        """Rounds whose process died (a project opened for writing has no other writer):
        status ``interrupted``; their work files (training data, partial predictions) and
        unacknowledged versions go, with the temporaries of dead processes."""
        for (round_id,) in self._ledger.query("SELECT id FROM rounds WHERE status = 'running'"):
            self.finish_round(
                round_id,
                "interrupted",
                "interrupted: the process running this round ended before it finished; the "
                "previous version stays current",
            )
            work = self._ledger.folder / "rounds" / f"r{round_id}"
            for name in ("train", "predictions"):
                shutil.rmtree(work / name, ignore_errors=True)
        self.remove_orphans()
        root = self._ledger.folder
        for folder in (root, *(p for p in root.glob("*/") if p.is_dir()),
                       *root.glob("predictions/*/"), *root.glob("volumes/*/"),
                       *root.glob("rounds/*/")):  # fmt: skip
            atomic.sweep_folder(folder)

    def remove_orphans(self) -> None:
        """Checkpoints and predictions of versions the ledger does not hold as ready."""
        ready = {v.version for v in self._versions.versions() if v.status == "ready"}
        running = {r.new_version for r in self.rounds() if r.status == "running"}
        self._versions.remove_files_except(ready | running)

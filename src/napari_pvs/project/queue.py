"""The review queue: ranked patches per volume (``new``, then ``reviewed`` or ``skipped``)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from napari_pvs.progress import CancelToken, ProgressCallback
from napari_pvs.project.ledger import Ledger
from napari_pvs.project.records import PatchRecord, now
from napari_pvs.project.settings import Settings
from napari_pvs.project.versions import Versions
from napari_pvs.project.volumes import UNREVIEWED, Volumes

PATCH_STATUSES = ("new", "reviewed", "skipped")


class Queue:
    """The ``patches`` table: what the ranking put in front of the annotator, and its fate."""

    def __init__(
        self, ledger: Ledger, volumes: Volumes, versions: Versions, settings: Settings
    ) -> None:
        self._ledger = ledger
        self._volumes = volumes
        self._versions = versions
        self._settings = settings

    def record_queue(
        self,
        ref: int | str,
        ranked: Sequence[Any],
        *,
        model_version: int | None,
        round: int | None = None,
        db: sqlite3.Connection | None = None,
    ) -> list[PatchRecord]:
        """Replace the volume's ``new`` queue rows with ``ranked`` (``RankedPatch`` rows)."""
        record = self._volumes.volume(ref)
        shown = now()

        def write(tx: sqlite3.Connection) -> list[int]:
            tx.execute("DELETE FROM patches WHERE volume_id = ? AND status = 'new'", (record.id,))
            ids = []
            for row in ranked:
                cursor = tx.execute(
                    "INSERT INTO patches(volume_id, z0, y0, x0, z1, y1, x1, strategy, score, "
                    "predicted_pvs, model_version, round, rank, status, shown) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'new', ?)",
                    (
                        record.id,
                        *[int(v) for v in row.bbox_start],
                        *[int(v) for v in row.bbox_stop],
                        row.strategy,
                        float(row.score),
                        int(row.predicted_pvs),
                        model_version,
                        round,
                        int(row.rank),
                        shown,
                    ),
                )
                ids.append(int(cursor.lastrowid))
            self._ledger.event(
                "queue",
                {"volume": record.id, "patches": len(ids), "model_version": model_version,
                 "round": round, "strategy": ranked[0].strategy if ranked else None},
                tx,
            )  # fmt: skip
            return ids

        if db is not None:
            write(db)
        else:
            with self._ledger.transaction() as tx:
                write(tx)
        return self.queue(record.id, status="new")

    def queue(self, ref: int | str | None = None, status: str | None = None) -> list[PatchRecord]:
        """Queued patches (of one volume, of one status), by volume then rank."""
        clauses, params = [], []
        if ref is not None:
            clauses.append("volume_id = ?")
            params.append(self._volumes.volume(ref).id)
        if status is not None:
            if status not in PATCH_STATUSES:
                raise ValueError(f"status must be one of {PATCH_STATUSES}, got {status!r}")
            clauses.append("status = ?")
            params.append(status)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = self._ledger.query(
            "SELECT id, volume_id, z0, y0, x0, z1, y1, x1, strategy, score, predicted_pvs, "
            f"model_version, round, rank, status, shown FROM patches {where} "
            "ORDER BY volume_id, status, rank, id",
            params,
        )
        return [
            PatchRecord(
                id=r[0],
                volume_id=r[1],
                start=tuple(r[2:5]),
                stop=tuple(r[5:8]),
                strategy=r[8],
                score=r[9],
                predicted_pvs=r[10],
                model_version=r[11],
                round=r[12],
                rank=r[13],
                status=r[14],
                shown=r[15],
            )
            for r in rows
        ]

    def excluded_boxes(self, ref: int | str) -> list[tuple[list[int], list[int]]]:
        """Boxes a new queue must avoid: skipped patches (reviewed ones are in the store)."""
        return [(list(p.start), list(p.stop)) for p in self.queue(ref, status="skipped")]

    def rank(
        self,
        ref: int | str,
        *,
        strategy: str | None = None,
        n: int | None = None,
        patch: int | None = None,
        version: int | str | None = None,
        seed: int = 0,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> list[PatchRecord]:
        """Rank patches of a volume for review and record them as its queue.

        Predicts first when the version has no complete prediction of the volume. Reviewed
        voxels (the label store) and skipped patches are excluded. Defaults come from the
        project settings.
        """
        from napari_pvs import limits
        from napari_pvs.ranking import rank_patches

        record = self._volumes.volume(ref)
        settings = self._settings.settings()
        number = self._versions.number(version)
        strategy = limits.check_strategy(settings["strategy"] if strategy is None else strategy)
        n = limits.check_count(settings["n"] if n is None else n)
        divisor = limits.model_size_divisor(self._versions.checkpoint_path(number))
        if patch is None:  # the project's setting, fitted to a volume smaller than it
            low, high = limits.patch_range(record.shape, divisor)
            patch = max(low, min(int(settings["patch"]), high))
        patch = limits.check_patch(patch, record.shape, divisor, record.name)
        path = self._versions.predict(record.id, version=number, progress=progress, cancel=cancel)
        ranked = rank_patches(
            path,
            n=n,
            patch=patch,
            strategy=strategy,
            exclude=self._volumes.labels(record.id)["labels"],
            unlabelled_value=UNREVIEWED,
            exclude_boxes=self.excluded_boxes(record.id),
            seed=seed,
            image=self._volumes.open_volume(record.id),
        )
        return self.record_queue(record.id, ranked, model_version=number)

    def skip(self, patch_id: int, *, annotator: str = "") -> None:
        """Mark a queued patch skipped (it will not be ranked again)."""
        rows = self._ledger.query("SELECT status FROM patches WHERE id = ?", (int(patch_id),))
        if not rows:
            raise ValueError(f"there is no queued patch {patch_id}")
        with self._ledger.transaction() as db:
            db.execute("UPDATE patches SET status = 'skipped' WHERE id = ?", (int(patch_id),))
            self._ledger.event("skip", {"patch": int(patch_id), "annotator": annotator}, db)

    def patch_volume(self, patch_id: int) -> int | None:
        """The volume id of a queued patch; None when there is no such patch."""
        rows = self._ledger.query("SELECT volume_id FROM patches WHERE id = ?", (int(patch_id),))
        return rows[0][0] if rows else None

    def mark_reviewed(self, patch_id: int, db: sqlite3.Connection) -> None:
        """An accept reviewed the patch (in the accept's transaction)."""
        db.execute("UPDATE patches SET status = 'reviewed' WHERE id = ?", (patch_id,))

    def skip_new(self, volume_id: int, db: sqlite3.Connection) -> None:
        """Skip the volume's still new patches (it left the project; the caller's transaction)."""
        db.execute(
            "UPDATE patches SET status = 'skipped' WHERE volume_id = ? AND status = 'new'",
            (volume_id,),
        )

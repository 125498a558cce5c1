"""The project's candidates: predicted clusters listed for yes/no review (``candidates`` table).

:meth:`Candidates.refresh` finds the clusters of a volume's current prediction
(:func:`napari_pvs.candidates.find_candidates`; clusters touching any labelled voxel, i.e. a
reviewed patch or an earlier answer, are left out) and records them with stable ids, ranked
(1 = ask first) and ``open``. Each row keeps its cluster as a bit mask over its box, so an
answer writes exactly the cluster's voxels whatever happens to the prediction stores later.
Refreshing again for the same version keeps the ids and statuses of the clusters it finds again
(matched by seed voxel) and re-ranks them; open or skipped candidates of an older version, and
those of this version now touching labels, become ``stale``. Answered ones never change here.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import numpy as np

from napari_pvs.project.ledger import Ledger
from napari_pvs.project.records import CandidateRecord, ProjectError, now
from napari_pvs.project.versions import Versions
from napari_pvs.project.volumes import UNREVIEWED, Volumes

CANDIDATE_STATUSES = ("open", "yes", "no", "skipped", "edited", "stale")
#: Statuses still to be asked (skipped ones after the open ones).
ASKABLE = ("open", "skipped")
#: The ``meta`` key prefix recording, per volume, the version its candidates were found in.
FOUND_VERSION = "candidates_version."

_COLUMNS = (
    "id, volume_id, model_version, z0, y0, x0, z1, y1, x1, seed_z, seed_y, seed_x, centre_z, "
    "centre_y, centre_x, voxels, volume_mm3, mean_probability, uncertainty, rank, status, "
    "annotation_id"
)


def pack_mask(mask: np.ndarray) -> bytes:
    """A boolean mask as bits (its shape is the box's, kept beside it)."""
    return np.packbits(np.asarray(mask, dtype=bool).ravel()).tobytes()


def unpack_mask(data: bytes, shape: Sequence[int]) -> np.ndarray:
    """The boolean mask of ``shape`` that :func:`pack_mask` stored."""
    size = int(np.prod(shape))
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=size)
    return bits.astype(bool).reshape(tuple(int(s) for s in shape))


class Candidates:
    """The ``candidates`` table: which clusters to ask about, in which order, and their fate."""

    def __init__(self, ledger: Ledger, volumes: Volumes, versions: Versions) -> None:
        self._ledger = ledger
        self._volumes = volumes
        self._versions = versions

    # -- reading ------------------------------------------------------------------------------
    def _record(self, r: tuple) -> CandidateRecord:
        return CandidateRecord(
            id=r[0],
            volume_id=r[1],
            model_version=r[2],
            bbox_start=list(r[3:6]),
            bbox_stop=list(r[6:9]),
            seed=list(r[9:12]),
            centre=list(r[12:15]),
            voxels=r[15],
            volume_mm3=r[16],
            mean_probability=r[17],
            uncertainty=r[18],
            rank=r[19],
            status=r[20],
            annotation_id=r[21],
        )

    def candidate(self, candidate_id: int) -> CandidateRecord:
        rows = self._ledger.query(
            f"SELECT {_COLUMNS} FROM candidates WHERE id = ?", (int(candidate_id),)
        )
        if not rows:
            raise ValueError(
                f"there is no candidate {candidate_id}; list them with "
                "'napari-pvs project candidates PROJECT'"
            )
        return self._record(rows[0])

    def mask(self, candidate_id: int) -> np.ndarray:
        """The candidate's cluster as a boolean mask over its box."""
        record = self.candidate(candidate_id)
        data = self._ledger.query("SELECT mask FROM candidates WHERE id = ?", (record.id,))[0][0]
        shape = [b - a for a, b in zip(record.bbox_start, record.bbox_stop, strict=True)]
        return unpack_mask(data, shape)

    def candidates(
        self,
        ref: int | str | None = None,
        status: str | Sequence[str] | None = "open",
        n: int | None = None,
    ) -> list[CandidateRecord]:
        """Candidates (of one volume; of one status or several, None: all) in the order to ask
        them: open before skipped before the rest, then by rank (volumes interleaved)."""
        clauses: list[str] = []
        params: list[Any] = []
        if ref is not None:
            clauses.append("volume_id = ?")
            params.append(self._volumes.volume(ref).id)
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            for name in wanted:
                if name not in CANDIDATE_STATUSES:
                    raise ValueError(
                        f"candidate status must be one of {', '.join(CANDIDATE_STATUSES)}, "
                        f"got {name!r}"
                    )
            clauses.append(f"status IN ({', '.join('?' * len(wanted))})")
            params.extend(wanted)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        limit = ""
        if n is not None:
            if int(n) < 1:
                raise ValueError(f"n must be at least 1, got {n}")
            limit = f" LIMIT {int(n)}"
        order = "CASE status WHEN 'open' THEN 0 WHEN 'skipped' THEN 1 ELSE 2 END"
        rows = self._ledger.query(
            f"SELECT {_COLUMNS} FROM candidates {where} "
            f"ORDER BY {order}, rank, volume_id, id{limit}",
            params,
        )
        return [self._record(r) for r in rows]

    def counts(self, volume_id: int | None = None) -> dict[str, int]:
        """How many candidates have each status (of one volume, or all)."""
        where, params = ("WHERE volume_id = ?", (volume_id,)) if volume_id is not None else ("", ())
        sql = f"SELECT status, COUNT(*) FROM candidates {where} GROUP BY status"
        rows = dict(self._ledger.query(sql, params))
        return {name: int(rows.get(name, 0)) for name in CANDIDATE_STATUSES}

    def is_current(self, ref: int | str) -> bool:
        """True when the volume's candidates were found in the current version's prediction."""
        record = self._volumes.volume(ref)
        return self._found_version(record.id) == self._versions.current_number()

    def _found_version(self, volume_id: int) -> int | None:
        """The version whose prediction the volume's candidates were last found in."""
        return self._ledger.meta(f"{FOUND_VERSION}{volume_id}")

    def reopened_status(self, candidate_id: int) -> str:
        """What an undone answer leaves its candidate: ``open``, or ``stale`` when the
        volume's candidates were found again in another version's prediction since."""
        candidate = self.candidate(candidate_id)
        found = self._found_version(candidate.volume_id)
        return "open" if found in (None, candidate.model_version) else "stale"

    # -- writing ------------------------------------------------------------------------------
    def refresh(
        self,
        ref: int | str,
        *,
        order: str = "uncertain",
        min_voxels: int = 1,
        regions=None,
    ) -> list[CandidateRecord]:
        """(Re)compute the volume's candidates from the current version's prediction; returns
        its open candidates in rank order (see the module docstring)."""
        from napari_pvs.candidates import check_order, cluster_mask, find_candidates
        from napari_pvs.io import open_prediction

        self._ledger.require_writable()
        check_order(order)
        record = self._volumes.volume(ref)
        number = self._versions.current_number()
        if not self._versions.has_prediction(record.id, number):
            raise ProjectError(
                f"volume {record.name!r} has no complete prediction by the current version "
                f"v{number}; predict it first (napari-pvs project candidates PROJECT "
                f"{record.name} --refresh predicts it, as does Project.predict)"
            )
        group = open_prediction(self._versions.prediction_path(record.id, number))
        # the clusters are labelled over the whole segmentation anyway: read it once
        segmentation = np.asarray(group["segmentation"][:])

        def compute() -> tuple[list, list[bytes]]:
            found = find_candidates(
                segmentation,
                group["probability"],
                group.get("entropy"),
                volume_id=record.id,
                spacing=record.spacing,
                exclude=self._volumes.labels(record.id)["labels"],
                unlabelled_value=UNREVIEWED,
                order=order,
                regions=regions,
                min_voxels=min_voxels,
            )
            masks = []
            for c in found:
                box = tuple(slice(a, b) for a, b in zip(c.bbox_start, c.bbox_stop, strict=True))
                seed = [s - a for s, a in zip(c.seed, c.bbox_start, strict=True)]
                masks.append(pack_mask(cluster_mask(segmentation[box], seed)))
            return found, masks

        # Computed without the project's lock (answers go on meanwhile); when anything was
        # written in between, computed again holding it, so no answered cluster comes back.
        before = self._ledger.last_event_id()
        found, masks = compute()
        with self._ledger.mutex:
            if self._ledger.last_event_id() != before:
                found, masks = compute()
            with self._ledger.transaction() as db:
                self._record_refresh(db, record.id, number, found, masks, order)
        return self.candidates(record.id, status="open")

    def _record_refresh(
        self, db: sqlite3.Connection, volume_id: int, number: int, found, masks, order: str
    ) -> None:
        db.execute(
            "UPDATE candidates SET status = 'stale' WHERE volume_id = ? AND model_version != ? "
            "AND status IN ('open', 'skipped')",
            (volume_id, number),
        )
        known = {
            tuple(r[1:4]): (r[0], r[4])
            for r in db.execute(
                "SELECT id, seed_z, seed_y, seed_x, status FROM candidates "
                "WHERE volume_id = ? AND model_version = ?",
                (volume_id, number),
            )
        }
        open_order = [c for c in found if known.get(c.seed, (None, "open"))[1] == "open"]
        skipped_order = [c for c in found if known.get(c.seed, (None, "open"))[1] == "skipped"]
        rank_of = {c.seed: i + 1 for i, c in enumerate(open_order + skipped_order)}
        created = now()
        seen = set()
        added = 0
        for c, mask in zip(found, masks, strict=True):
            seen.add(c.seed)
            if c.seed in known:
                candidate_id, status = known[c.seed]
                if status in ASKABLE:
                    db.execute(
                        "UPDATE candidates SET rank = ? WHERE id = ?",
                        (rank_of[c.seed], candidate_id),
                    )
                continue
            db.execute(
                "INSERT INTO candidates(volume_id, model_version, z0, y0, x0, z1, y1, x1, seed_z, "
                "seed_y, seed_x, centre_z, centre_y, centre_x, voxels, volume_mm3, "
                "mean_probability, uncertainty, score, rank, status, created, mask) "
                f"VALUES ({', '.join('?' * 23)})",
                (volume_id, number, *c.bbox_start, *c.bbox_stop, *c.seed, *c.centre, c.voxels,
                 c.volume_mm3, c.mean_probability, c.uncertainty, c.score, rank_of[c.seed],
                 "open", created, mask),
            )  # fmt: skip
            added += 1
        gone = [cid for seed, (cid, status) in known.items()
                if seed not in seen and status in ASKABLE]  # fmt: skip
        db.executemany("UPDATE candidates SET status = 'stale' WHERE id = ?", [(i,) for i in gone])
        self._ledger.set_meta(db, f"{FOUND_VERSION}{volume_id}", number)
        self._ledger.event(
            "candidates",
            {"volume": volume_id, "model_version": number, "found": len(found), "new": added,
             "stale": len(gone), "order": order},
            db,
        )  # fmt: skip

    def mark_edited(self, candidate_id: int, annotation) -> CandidateRecord:
        """The candidate was reviewed as a patch (``annotation``, an accepted one) instead."""
        self._ledger.require_writable()
        candidate = self.candidate(candidate_id)
        if annotation.volume_id != candidate.volume_id:
            raise ValueError(
                f"annotation {annotation.id} is of volume {annotation.volume_id}, candidate "
                f"{candidate.id} of volume {candidate.volume_id}; pass the patch accepted "
                "around the candidate"
            )
        if candidate.status not in (*ASKABLE, "edited"):
            raise ValueError(
                f"candidate {candidate.id} is {candidate.status!r}; only an open or skipped "
                "candidate can be edited (undo its answer first)"
            )
        with self._ledger.transaction() as db:
            self.set_status(candidate.id, "edited", db, annotation_id=annotation.id)
            self._ledger.event(
                "candidate-edited", {"candidate": candidate.id, "annotation": annotation.id}, db
            )
        return self.candidate(candidate.id)

    def retire_volume(self, volume_id: int, db: sqlite3.Connection) -> None:
        """The volume left the project: its open and skipped candidates go stale."""
        db.execute(
            "UPDATE candidates SET status = 'stale' WHERE volume_id = ? "
            "AND status IN ('open', 'skipped')",
            (volume_id,),
        )

    def set_status(
        self,
        candidate_id: int,
        status: str,
        db: sqlite3.Connection,
        annotation_id: int | None = None,
    ) -> None:
        """Set a candidate's status (in the caller's transaction)."""
        if status not in CANDIDATE_STATUSES:
            raise ValueError(f"candidate status must be one of {CANDIDATE_STATUSES}")
        db.execute(
            "UPDATE candidates SET status = ?, annotation_id = ? WHERE id = ?",
            (status, annotation_id, int(candidate_id)),
        )

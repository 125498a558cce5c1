"""Accepted annotations: reviewed patches written to the label store, durably, with provenance.

Accepting an annotation is durable the moment :meth:`Annotations.accept` returns: the patch is
first written to a journal file (``journal/<token>.npy``, fsynced) and an intent row commits;
then the label and ``reviewed`` chunks are written and fsynced; then the annotation row commits
and the intent row goes, in one transaction. A crash before the intent row loses an
unacknowledged accept and nothing else; a crash after it is finished on the next open by
writing the journalled patch again (the label write is idempotent). Chunk files are replaced by
rename, so a torn write never damages the labels of neighbouring annotations in the same chunk.
"""

from __future__ import annotations

import contextlib
import hashlib
import io as _io
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from napari_pvs import atomic
from napari_pvs.io.damage import damaged_file_error
from napari_pvs.project.label_writes import write_label_box
from napari_pvs.project.ledger import Ledger
from napari_pvs.project.queue import Queue
from napari_pvs.project.records import Annotation, ProjectError, now
from napari_pvs.project.versions import Versions
from napari_pvs.project.volumes import LabelsDamaged, Volumes

SPLITS = ("train", "validation")


class Annotations:
    """The ``annotations`` and ``pending_accepts`` tables, the accept journal and label writes."""

    def __init__(self, ledger: Ledger, volumes: Volumes, versions: Versions, queue: Queue) -> None:
        self._ledger = ledger
        self._volumes = volumes
        self._versions = versions
        self._queue = queue
        self._journal = ledger.folder / "journal"

    def _split_for(self, volume_id: int, start, stop) -> str:
        """Train or validation, fixed at accept time by a seeded rule (see docs/project.md)."""
        rows = self._ledger.query(
            "SELECT split, z0, y0, x0, z1, y1, x1 FROM annotations WHERE volume_id = ?",
            (volume_id,),
        )
        overlapping = {r[0] for r in rows if _overlap(start, stop, r[1:4], r[4:7])}
        if "validation" in overlapping:
            return "validation"
        if "train" in overlapping:
            return "train"
        fraction = float(self._ledger.meta("validation_fraction", 0.25))
        limit = int(self._ledger.meta("validation_max", 8))
        if fraction <= 0 or limit <= 0:
            return "train"
        counts = dict(self._ledger.query("SELECT split, COUNT(*) FROM annotations GROUP BY split"))
        n_validation = int(counts.get("validation", 0))
        if n_validation >= limit:
            return "train"
        block = max(2, round(1 / fraction))
        k = sum(int(v) for v in counts.values())
        seed = int(self._ledger.meta("seed", 0))
        position = int(np.random.default_rng([seed, k // block]).integers(block))
        return "validation" if k % block == position else "train"

    def accept(
        self,
        ref: int | str,
        start: Sequence[int],
        stop: Sequence[int],
        labels,
        *,
        annotator: str = "",
        seconds: float | None = None,
        patch_id: int | None = None,
        model_version: int | None = None,
    ) -> Annotation:
        """Accept a reviewed patch: labels (0/1) of the box ``[start, stop)`` of a volume.

        Durable when it returns (see the module docstring). A patch with no PVS is real
        background. Accepting exactly the same labels for the same box again returns the
        existing annotation. Bad labels, a box outside the volume or a removed volume raise
        ``ValueError`` before anything is written.
        """
        self._ledger.require_writable()
        record = self._volumes.volume(ref)
        self._volumes.require_unchanged(record)
        self._volumes.require_labels_writable(record)
        start = tuple(int(v) for v in start)
        stop = tuple(int(v) for v in stop)
        if len(start) != 3 or len(stop) != 3:
            raise ValueError("start and stop must be three voxel indices each (z y x order)")
        if any(a < 0 or b > s or a >= b for a, b, s in zip(start, stop, record.shape, strict=True)):
            raise ValueError(
                f"box {list(start)}..{list(stop)} is not inside volume {record.name!r} of shape "
                f"{list(record.shape)}; need 0 <= start < stop <= shape on every axis"
            )
        patch = _check_patch_labels(labels, tuple(b - a for a, b in zip(start, stop, strict=True)))
        if patch_id is not None and self._queue.patch_volume(patch_id) != record.id:
            raise ValueError(f"patch {patch_id} is not a queued patch of {record.name!r}")
        if model_version is None:
            model_version = self._versions.current_version().version
        elif not self._versions.exists(model_version):
            raise ValueError(f"there is no model version {model_version} in the project")
        digest = _labels_digest(patch)
        with self._ledger.mutex:
            same = self._latest_identical(record.id, start, stop, digest)
            if same is not None:
                return same
            token = uuid.uuid4().hex
            buffer = _io.BytesIO()
            np.save(buffer, patch, allow_pickle=False)
            atomic.write_bytes(self._journal / f"{token}.npy", buffer.getvalue())
            with self._ledger.transaction() as db:
                db.execute(
                    f"INSERT INTO pending_accepts VALUES ({', '.join('?' * 15)})",
                    (
                        token,
                        record.id,
                        *start,
                        *stop,
                        str(annotator),
                        now(),
                        model_version,
                        None if seconds is None else float(seconds),
                        None if patch_id is None else int(patch_id),
                        self._split_for(record.id, start, stop),
                        digest,
                    ),
                )
            return self._finish_pending(token, repaired=False)

    def _latest_identical(self, volume_id, start, stop, digest) -> Annotation | None:
        rows = self._ledger.query(
            "SELECT id, z0, y0, x0, z1, y1, x1, digest FROM annotations WHERE volume_id = ? "
            "ORDER BY id DESC",
            (volume_id,),
        )
        for row in rows:
            if _overlap(start, stop, row[1:4], row[4:7]):
                if tuple(row[1:4]) == start and tuple(row[4:7]) == stop and row[7] == digest:
                    return self.annotation(row[0])
                return None
        return None

    def _finish_pending(self, token: str, *, repaired: bool) -> Annotation:
        """Write a journalled accept's labels (idempotent) and commit its annotation row."""
        row = self._ledger.query(
            "SELECT volume_id, z0, y0, x0, z1, y1, x1, annotator, created, model_version, "
            "seconds, patch_id, split, digest FROM pending_accepts WHERE token = ?",
            (token,),
        )[0]
        volume_id, start, stop = int(row[0]), tuple(row[1:4]), tuple(row[4:7])
        journal = self._journal / f"{token}.npy"
        try:
            patch = np.load(journal, allow_pickle=False)
            ok = patch.shape == tuple(b - a for a, b in zip(start, stop, strict=True))
            ok = ok and _labels_digest(patch) == row[13]
        except (OSError, ValueError):
            ok = False
        if not ok:  # the journal is written before its intent row, so this means tampering
            with self._ledger.transaction() as db:
                db.execute("DELETE FROM pending_accepts WHERE token = ?", (token,))
                self._ledger.event("accept-lost", {"token": token, "volume": volume_id}, db)
            raise ProjectError(
                f"the journal file {journal} of an interrupted accept is missing or damaged; "
                "that patch was not saved: accept it again"
            )
        try:
            self._write_labels(volume_id, start, stop, patch)
        except Exception as exc:
            if damaged_file_error(None, exc) is None:
                raise
            # A damaged label chunk: this accept fails (now, and never commits later) and the
            # volume's labels become read-only; every other volume keeps working.
            with self._ledger.transaction() as db:
                db.execute("DELETE FROM pending_accepts WHERE token = ?", (token,))
                self._ledger.event(
                    "accept-failed", {"token": token, "volume": volume_id, "why": "damaged"}, db
                )
            with contextlib.suppress(FileNotFoundError):
                journal.unlink()
            raise self._volumes.mark_labels_damaged(volume_id, start, stop) from exc
        with self._ledger.transaction() as db:
            cursor = db.execute(
                "INSERT INTO annotations(volume_id, z0, y0, x0, z1, y1, x1, annotator, created, "
                "model_version, seconds, empty, patch_id, split, pvs_voxels, digest) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    volume_id,
                    *start,
                    *stop,
                    row[7],
                    row[8],
                    row[9],
                    row[10],
                    int(not patch.any()),
                    row[11],
                    row[12],
                    int(patch.sum()),
                    row[13],
                ),
            )
            annotation_id = int(cursor.lastrowid)
            if row[11] is not None:
                self._queue.mark_reviewed(row[11], db)
            db.execute("DELETE FROM pending_accepts WHERE token = ?", (token,))
            self._ledger.event(
                "accept-repaired" if repaired else "accept",
                {
                    "annotation": annotation_id,
                    "volume": volume_id,
                    "start": list(start),
                    "stop": list(stop),
                    "split": row[12],
                    "annotator": row[7],
                    "pvs_voxels": int(patch.sum()),
                },
                db,
            )
        with contextlib.suppress(FileNotFoundError):
            journal.unlink()
        return self.annotation(annotation_id)

    def _write_labels(self, volume_id: int, start, stop, patch: np.ndarray) -> None:
        """Write the patch as labels (all of the box reviewed), durably."""
        store = self._volumes.label_store_path(volume_id)
        write_label_box(store, start, stop, patch, np.ones(patch.shape, dtype=bool))

    def annotation(self, annotation_id: int) -> Annotation:
        rows = self._annotation_rows("WHERE id = ?", (int(annotation_id),))
        if not rows:
            raise ValueError(f"there is no annotation {annotation_id}")
        return rows[0]

    def _annotation_rows(self, where: str, params: Sequence[Any]) -> list[Annotation]:
        rows = self._ledger.query(
            "SELECT id, volume_id, z0, y0, x0, z1, y1, x1, annotator, created, model_version, "
            f"seconds, empty, patch_id, split, pvs_voxels FROM annotations {where} ORDER BY id",
            params,
        )
        return [
            Annotation(
                id=r[0],
                volume_id=r[1],
                start=tuple(r[2:5]),
                stop=tuple(r[5:8]),
                annotator=r[8],
                created=r[9],
                model_version=r[10],
                seconds=r[11],
                empty=bool(r[12]),
                patch_id=r[13],
                split=r[14],
                pvs_voxels=r[15],
            )
            for r in rows
        ]

    def annotations(
        self, ref: int | str | None = None, split: str | None = None
    ) -> list[Annotation]:
        """Accepted annotations (of one volume, of one split), oldest first."""
        clauses, params = [], []
        if ref is not None:
            clauses.append("volume_id = ?")
            params.append(self._volumes.volume(ref).id)
        if split is not None:
            if split not in SPLITS:
                raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
            clauses.append("split = ?")
            params.append(split)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        return self._annotation_rows(where, params)

    def ids(self) -> list[int]:
        """Every annotation id, oldest first (a round's frozen snapshot)."""
        return [r[0] for r in self._ledger.query("SELECT id FROM annotations ORDER BY id")]

    def count(self, volume_id: int) -> int:
        """How many annotations the volume has (removed volumes included)."""
        return self._ledger.query(
            "SELECT COUNT(*) FROM annotations WHERE volume_id = ?", (volume_id,)
        )[0][0]

    def finish_interrupted(self) -> None:
        """Finish the accepts whose intent committed; drop journal files that have none."""
        self._journal.mkdir(exist_ok=True)
        # Accepts whose intent committed: write the journalled labels again, then commit.
        pending = self._ledger.query("SELECT token FROM pending_accepts ORDER BY rowid")
        for (token,) in pending:
            # a lost journal is logged (accept-lost); damaged labels mark their volume only
            with contextlib.suppress(ProjectError, LabelsDamaged):
                self._finish_pending(token, repaired=True)
        # Journal files without an intent row: their accept never got acknowledged.
        for item in self._journal.iterdir():
            item.unlink()


def _overlap(a0, a1, b0, b1) -> bool:
    return all(x0 < y1 and y0 < x1 for x0, x1, y0, y1 in zip(a0, a1, b0, b1, strict=True))


def _labels_digest(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.uint8).tobytes()).hexdigest()


def _check_patch_labels(labels, expected_shape: tuple[int, ...]) -> np.ndarray:
    """Patch labels as uint8 0/1, or a ValueError naming what is wrong and the fix."""
    array = np.asarray(labels)
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_
    ):
        raise ValueError(
            f"labels must be a numeric array of 0 (no PVS) and 1 (PVS), got dtype {array.dtype}"
        )
    if tuple(array.shape) != tuple(expected_shape):
        raise ValueError(
            f"labels have shape {tuple(array.shape)} but the box is {tuple(expected_shape)}; "
            "pass the patch exactly as large as the box (stop - start)"
        )
    bad = ~np.isin(array, (0, 1))
    if bad.any():
        found = np.unique(array[bad])[:5]
        raise ValueError(
            f"labels may only be 0 (no PVS) and 1 (PVS); found {', '.join(map(str, found))} "
            f"in {int(bad.sum())} voxels (255 = not reviewed is for the store, not for patches)"
        )
    return array.astype(np.uint8)

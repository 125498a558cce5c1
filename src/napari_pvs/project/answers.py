"""Answers to candidates: yes/no/skip on a predicted cluster, a durable partial label.

"yes" sets the cluster's voxels that are still unreviewed (255) in the label store to 1 (PVS),
"no" sets them to 0 (background); every other voxel of the box stays as it was, so the rest of
the box stays 255 (not reviewed) and the loss ignores it. "skip" writes no labels; the
candidate is asked again after the open ones. The voxels an answer wrote are kept (a bit mask
over the box in its row), so undo puts exactly those back to 255 (except voxels an accepted
patch has written since: those are the patch's now).

An answer (and an undo) is durable the moment it returns, journalled like an accept
(:mod:`napari_pvs.project.annotations`): an intent row in ``pending_answers`` commits first,
holding the voxels and the value to write; then the label and ``reviewed`` chunks are written
and fsynced (:mod:`napari_pvs.project.label_writes`); then the answer row, the candidate's
status and the removal of the intent commit in one transaction. A crash before the intent row
loses an unacknowledged answer and nothing else; a crash after it is finished on the next open
(the label write is idempotent).

A fixed share of yes/no answers (one in :data:`HELD_OUT_EVERY`, by a rule seeded with the
project's seed) is ``held-out``: rounds never train on them and each version's precision on
them is tracked; the others are ``train``.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

import numpy as np

from napari_pvs.io.damage import damaged_file_error
from napari_pvs.project.annotations import Annotations
from napari_pvs.project.candidates import ASKABLE, Candidates, pack_mask, unpack_mask
from napari_pvs.project.label_writes import read_label_box, write_label_box
from napari_pvs.project.ledger import Ledger
from napari_pvs.project.records import AnswerRecord, now
from napari_pvs.project.volumes import UNREVIEWED, LabelsDamaged, Volumes

#: What an annotator can answer; yes/no write labels, skip does not.
ANSWERS = ("yes", "no", "skip")
#: The label value each answer writes on the cluster.
ANSWER_VALUES = {"yes": 1, "no": 0}
#: The candidate status each answer leaves.
ANSWER_STATUS = {"yes": "yes", "no": "no", "skip": "skipped"}
ANSWER_SPLITS = ("train", "held-out")
#: One yes/no answer in this many is held out (never trained on).
HELD_OUT_EVERY = 5

_COLUMNS = (
    "id, candidate_id, volume_id, answer, annotator, created, model_version, split, z0, y0, x0, "
    "z1, y1, x1, voxels_written, seconds, undone"
)


class Answers:
    """The ``answers`` and ``pending_answers`` tables and the label writes of answers."""

    def __init__(
        self,
        ledger: Ledger,
        volumes: Volumes,
        candidates: Candidates,
        annotations: Annotations,
    ) -> None:
        self._ledger = ledger
        self._volumes = volumes
        self._candidates = candidates
        self._annotations = annotations

    # -- reading ------------------------------------------------------------------------------
    def _record(self, r: tuple) -> AnswerRecord:
        return AnswerRecord(
            id=r[0],
            candidate_id=r[1],
            volume_id=r[2],
            answer=r[3],
            annotator=r[4],
            created=r[5],
            model_version=r[6],
            split=r[7],
            bbox_start=list(r[8:11]),
            bbox_stop=list(r[11:14]),
            voxels_written=r[14],
            seconds=r[15],
            undone=r[16],
        )

    def answer_record(self, answer_id: int) -> AnswerRecord:
        rows = self._ledger.query(f"SELECT {_COLUMNS} FROM answers WHERE id = ?", (int(answer_id),))
        if not rows:
            raise ValueError(f"there is no answer {answer_id}")
        return self._record(rows[0])

    def answers(
        self,
        ref: int | str | None = None,
        split: str | None = None,
        *,
        include_undone: bool = False,
    ) -> list[AnswerRecord]:
        """Answers (of one volume, of one split), oldest first; undone ones only when asked."""
        clauses: list[str] = []
        params: list[Any] = []
        if ref is not None:
            clauses.append("volume_id = ?")
            params.append(self._volumes.volume(ref).id)
        if split is not None:
            if split not in ANSWER_SPLITS:
                raise ValueError(f"split must be one of {ANSWER_SPLITS}, got {split!r}")
            clauses.append("split = ?")
            params.append(split)
        if not include_undone:
            clauses.append("undone IS NULL")
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = self._ledger.query(f"SELECT {_COLUMNS} FROM answers {where} ORDER BY id", params)
        return [self._record(r) for r in rows]

    def written_mask(self, answer_id: int) -> np.ndarray:
        """The voxels of its box the answer wrote (a boolean mask over the box)."""
        record = self.answer_record(answer_id)
        data = self._ledger.query("SELECT written FROM answers WHERE id = ?", (record.id,))[0][0]
        return unpack_mask(data, _shape(record.bbox_start, record.bbox_stop))

    def counts(self, volume_id: int | None = None) -> dict[str, int]:
        """Live (not undone) answers: total, yes, no, skipped, and held-out yes/no."""
        where = "WHERE undone IS NULL" + (" AND volume_id = ?" if volume_id is not None else "")
        params = (volume_id,) if volume_id is not None else ()
        rows = self._ledger.query(
            f"SELECT answer, split, COUNT(*) FROM answers {where} GROUP BY answer, split", params
        )
        counts = {"total": 0, "yes": 0, "no": 0, "skipped": 0, "held_out": 0}
        for answer, split, count in rows:
            counts["total"] += count
            counts["skipped" if answer == "skip" else answer] += count
            if split == "held-out" and answer != "skip":
                counts["held_out"] += count
        return counts

    # -- answering ----------------------------------------------------------------------------
    def answer(
        self, candidate_id: int, answer: str, *, annotator: str, seconds: float | None = None
    ) -> AnswerRecord:
        """Answer a candidate (see the module docstring); durable when it returns.

        Refused (ValueError, nothing written): an unknown answer, an empty annotator, a
        candidate already answered (undo it first), stale (refresh the volume's candidates) or
        edited.
        """
        self._ledger.require_writable()
        if answer not in ANSWERS:
            raise ValueError(f"answer must be one of {', '.join(ANSWERS)}, got {answer!r}")
        annotator = _check_annotator(annotator)
        with self._ledger.mutex:
            candidate = self._candidates.candidate(candidate_id)
            if candidate.status not in ASKABLE:
                raise ValueError(_not_askable(candidate))
            record = self._volumes.volume(candidate.volume_id)
            start, stop = candidate.bbox_start, candidate.bbox_stop
            written = np.zeros(_shape(start, stop), dtype=bool)
            value = UNREVIEWED
            if answer != "skip":
                self._volumes.require_unchanged(record)
                self._volumes.require_labels_writable(record)
                labels, _ = self._read_box(record.id, start, stop)
                written = self._candidates.mask(candidate.id) & (labels == UNREVIEWED)
                value = ANSWER_VALUES[answer]
            token = uuid.uuid4().hex
            with self._ledger.transaction() as db:
                db.execute(
                    "INSERT INTO pending_answers(token, kind, candidate_id, answer_id, answer, "
                    "annotator, created, seconds, split, value, reviewed, mask) "
                    "VALUES (?, 'answer', ?, NULL, ?, ?, ?, ?, ?, ?, 1, ?)",
                    (token, candidate.id, answer, annotator, now(),
                     None if seconds is None else float(seconds), self._split_for(answer),
                     value, pack_mask(written)),
                )  # fmt: skip
            return self._finish_pending(token, repaired=False)

    def undo(self, answer_id: int | None = None, *, annotator: str) -> AnswerRecord | None:
        """Undo an answer (default: the latest one not undone): exactly the voxels it wrote go
        back to 255 (voxels an accepted patch wrote since stay the patch's) and the candidate
        is open again (stale when the volume's candidates come from another version now: the
        next refresh finds the cluster again). Durable when it returns; None when there is
        nothing to undo."""
        self._ledger.require_writable()
        annotator = _check_annotator(annotator)
        with self._ledger.mutex:
            if answer_id is None:
                rows = self._ledger.query(
                    "SELECT id FROM answers WHERE undone IS NULL ORDER BY id DESC LIMIT 1"
                )
                if not rows:
                    return None
                answer_id = int(rows[0][0])
            record = self.answer_record(answer_id)
            if record.undone is not None:
                raise ValueError(f"answer {record.id} was already undone ({record.undone})")
            restore = np.zeros(_shape(record.bbox_start, record.bbox_stop), dtype=bool)
            if record.voxels_written:
                volume = self._volumes.volume(record.volume_id)
                self._volumes.require_labels_writable(volume)
                restore = self.written_mask(record.id) & ~self._patched_since(record)
            token = uuid.uuid4().hex
            with self._ledger.transaction() as db:
                db.execute(
                    "INSERT INTO pending_answers(token, kind, candidate_id, answer_id, answer, "
                    "annotator, created, seconds, split, value, reviewed, mask) "
                    "VALUES (?, 'undo', ?, ?, ?, ?, ?, NULL, ?, ?, 0, ?)",
                    (token, record.candidate_id, record.id, record.answer, annotator, now(),
                     record.split, UNREVIEWED, pack_mask(restore)),
                )  # fmt: skip
            return self._finish_pending(token, repaired=False)

    def _patched_since(self, record: AnswerRecord) -> np.ndarray:
        """Voxels of the answer's box inside patches accepted after it (they are the patch's)."""
        start, stop = record.bbox_start, record.bbox_stop
        covered = np.zeros(_shape(start, stop), dtype=bool)
        for a in self._annotations.annotations(record.volume_id):
            if a.created < record.created:
                continue
            low = [max(x, y) for x, y in zip(a.start, start, strict=True)]
            high = [min(x, y) for x, y in zip(a.stop, stop, strict=True)]
            if all(lo < hi for lo, hi in zip(low, high, strict=True)):
                box = tuple(
                    slice(lo - s, hi - s) for lo, hi, s in zip(low, high, start, strict=True)
                )
                covered[box] = True
        return covered

    def _split_for(self, answer: str) -> str:
        """Held-out for one yes/no answer in HELD_OUT_EVERY, by a rule seeded with the project's
        seed over the live yes/no answers so far (an undone and redone answer keeps its split
        when nothing else changed)."""
        if answer == "skip":
            return "train"
        k = self._ledger.query(
            "SELECT COUNT(*) FROM answers WHERE undone IS NULL AND answer != 'skip'"
        )[0][0]
        seed = int(self._ledger.meta("seed", 0))
        position = int(np.random.default_rng([seed, 18, k // HELD_OUT_EVERY]).integers(
            HELD_OUT_EVERY))  # fmt: skip
        return "held-out" if k % HELD_OUT_EVERY == position else "train"

    def _read_box(self, volume_id: int, start, stop) -> tuple[np.ndarray, np.ndarray]:
        store = self._volumes.label_store_path(volume_id)
        try:
            return read_label_box(store, start, stop)
        except Exception as exc:
            if damaged_file_error(None, exc) is None:
                raise
            raise self._volumes.mark_labels_damaged(volume_id, start, stop) from exc

    def _finish_pending(self, token: str, *, repaired: bool) -> AnswerRecord:
        """Write a journalled answer's (or undo's) labels (idempotent), then commit it."""
        row = self._ledger.query(
            "SELECT kind, candidate_id, answer_id, answer, annotator, created, seconds, split, "
            "value, reviewed, mask FROM pending_answers WHERE token = ?",
            (token,),
        )[0]
        kind, candidate_id, answer_id, answer, annotator, created = row[:6]
        seconds, split, value, reviewed, packed = row[6:]
        candidate = self._candidates.candidate(candidate_id)
        start, stop = candidate.bbox_start, candidate.bbox_stop
        mask = unpack_mask(packed, _shape(start, stop))
        if mask.any():
            try:
                labels, marked = self._read_box(candidate.volume_id, start, stop)
                write_label_box(
                    self._volumes.label_store_path(candidate.volume_id),
                    start,
                    stop,
                    np.where(mask, np.uint8(value), labels).astype(np.uint8),
                    np.where(mask, bool(reviewed), marked),
                )
            except Exception as exc:
                if not isinstance(exc, LabelsDamaged) and damaged_file_error(None, exc) is None:
                    raise
                # A damaged label chunk: this answer fails (now, and never commits later) and
                # the volume's labels become read-only; every other volume keeps working.
                with self._ledger.transaction() as db:
                    db.execute("DELETE FROM pending_answers WHERE token = ?", (token,))
                    detail = {"token": token, "kind": kind, "candidate": candidate_id}
                    self._ledger.event("answer-failed", {**detail, "why": "damaged"}, db)
                if isinstance(exc, LabelsDamaged):
                    raise
                raise self._volumes.mark_labels_damaged(candidate.volume_id, start, stop) from exc
        suffix = "-repaired" if repaired else ""
        with self._ledger.transaction() as db:
            if kind == "answer":
                cursor = db.execute(
                    "INSERT INTO answers(candidate_id, volume_id, answer, annotator, created, "
                    "model_version, seconds, split, z0, y0, x0, z1, y1, x1, voxels_written, "
                    f"written) VALUES ({', '.join('?' * 16)})",
                    (candidate_id, candidate.volume_id, answer, annotator, created,
                     candidate.model_version, seconds, split, *start, *stop, int(mask.sum()),
                     packed),
                )  # fmt: skip
                answer_id = int(cursor.lastrowid)
                self._candidates.set_status(candidate_id, ANSWER_STATUS[answer], db)
            else:
                db.execute(
                    "UPDATE answers SET undone = ?, undone_by = ? WHERE id = ?",
                    (created, annotator, answer_id),
                )
                # open again (stale if its version's candidates were replaced meanwhile),
                # unless another live answer stands (a skip undone under a later yes)
                latest = db.execute(
                    "SELECT answer FROM answers WHERE candidate_id = ? AND undone IS NULL "
                    "ORDER BY id DESC LIMIT 1",
                    (candidate_id,),
                ).fetchone()
                if latest is None:
                    status = self._candidates.reopened_status(candidate_id)
                else:
                    status = ANSWER_STATUS[latest[0]]
                self._candidates.set_status(candidate_id, status, db)
            db.execute("DELETE FROM pending_answers WHERE token = ?", (token,))
            self._ledger.event(
                ("answer" if kind == "answer" else "answer-undo") + suffix,
                {"answer": answer_id, "candidate": candidate_id, "volume": candidate.volume_id,
                 "value": answer, "annotator": annotator, "voxels": int(mask.sum()),
                 "split": split},
                db,
            )  # fmt: skip
        return self.answer_record(answer_id)

    def finish_interrupted(self) -> None:
        """Finish the answers and undos whose intent committed (labels written again)."""
        pending = self._ledger.query("SELECT token FROM pending_answers ORDER BY rowid")
        for (token,) in pending:
            # damaged labels fail that answer (logged) and mark their volume only
            with contextlib.suppress(LabelsDamaged):
                self._finish_pending(token, repaired=True)


def _shape(start, stop) -> tuple[int, int, int]:
    return tuple(int(b) - int(a) for a, b in zip(start, stop, strict=True))  # type: ignore[return-value]


def _check_annotator(annotator: str) -> str:
    name = str(annotator or "").strip()
    if not name:
        raise ValueError(
            "an answer needs the annotator's name (who said yes or no); pass annotator=NAME "
            "(CLI: --annotator NAME)"
        )
    return name


def _not_askable(candidate) -> str:
    if candidate.status == "stale":
        return (
            f"candidate {candidate.id} is stale (proposed by v{candidate.model_version}; its "
            "volume's candidates were recomputed since); refresh the candidates and answer a "
            "current one"
        )
    if candidate.status == "edited":
        return (
            f"candidate {candidate.id} was edited as reviewed patch (annotation "
            f"{candidate.annotation_id}); it needs no answer"
        )
    return (
        f"candidate {candidate.id} is already answered {candidate.status!r}; undo that answer "
        "first to answer it again"
    )

"""The facade :class:`Project`: it opens the ledger and composes the project's parts.

Each concept is one module of this package, and each part runs SQL only on its own tables:
``ledger`` (the connection, transactions, meta, events, migrations), ``volumes``,
``annotations`` (the durable accept), ``queue``, ``versions`` (checkpoints and predictions),
``round_log``, ``settings``, ``export`` (burden, export), ``status``, ``repair`` and
``create``. ``Project`` is the one public API over them (``docs/project.md``); each method is
documented on the part it delegates to. No Qt, no napari: the CLI and the napari widgets are
thin adapters over it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from napari_pvs.progress import CancelToken, ProgressCallback
from napari_pvs.project.annotations import Annotations
from napari_pvs.project.answers import Answers
from napari_pvs.project.candidates import Candidates
from napari_pvs.project.create import create_project_folder
from napari_pvs.project.export import Exports
from napari_pvs.project.ledger import Ledger
from napari_pvs.project.queue import Queue
from napari_pvs.project.records import (
    Annotation,
    AnswerRecord,
    CandidateRecord,
    ModelVersion,
    PatchRecord,
    RoundRecord,
    VolumeRecord,
)
from napari_pvs.project.refs import find_volume
from napari_pvs.project.repair import repair, repair_label_stores
from napari_pvs.project.round_log import RoundLog
from napari_pvs.project.settings import Settings
from napari_pvs.project.status import project_status
from napari_pvs.project.versions import Versions
from napari_pvs.project.volumes import Volumes


class Project:
    """An open annotation project (see the package docstring and ``docs/project.md``).

    Open it with :meth:`create` or :meth:`open`; use it as a context manager or call
    :meth:`close`. Methods are thread-safe (one connection behind a lock), so a GUI may call
    them from worker threads.
    """

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self.path = ledger.folder
        self.readonly = ledger.readonly
        self._round_handles: list[Any] = []  # running rounds.RoundHandle objects
        self._settings = Settings(ledger)
        self._volumes = Volumes(ledger)
        self._versions = Versions(ledger, self._volumes, self._settings)
        self._queue = Queue(ledger, self._volumes, self._versions, self._settings)
        self._annotations = Annotations(ledger, self._volumes, self._versions, self._queue)
        self._round_log = RoundLog(
            ledger, self._versions, self._queue, self._annotations, self._settings
        )
        self._exports = Exports(ledger, self._volumes, self._annotations, self._versions)
        self._candidates = Candidates(ledger, self._volumes, self._versions)
        self._answers = Answers(ledger, self._volumes, self._candidates, self._annotations)

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        folder: str | os.PathLike,
        *,
        model: str | os.PathLike = "default",
        seed: int = 0,
        validation_fraction: float = 0.25,
        validation_max: int = 8,
    ) -> Project:
        """Make a new project in ``folder`` (new or empty) with ``model`` as version 0.

        ``model``: ``"default"`` (the bundled model) or a napari-pvs checkpoint. The
        ``validation_fraction`` of accepted patches (at most ``validation_max``) becomes fixed
        validation data by a rule seeded with ``seed``. The folder is built under a temporary
        name and renamed, so an interrupted create leaves nothing behind.
        """
        return cls.open(
            create_project_folder(
                folder,
                model=model,
                seed=seed,
                validation_fraction=validation_fraction,
                validation_max=validation_max,
            )
        )

    @classmethod
    def open(cls, folder: str | os.PathLike, *, readonly: bool = False) -> Project:
        """Open an existing project; migrate an older ledger; repair an interrupted accept.

        Raises :class:`ProjectError` when ``folder`` is not a project or its ledger is damaged
        or newer than this napari-pvs, :class:`ProjectLocked` when another live process holds
        it for writing. A read-only project needs no lock and changes nothing.
        """
        ledger = Ledger.open(Path(folder).expanduser().absolute(), readonly=readonly)
        try:
            project = cls(ledger)
            if not readonly:
                repair(project._volumes, project._annotations, project._answers, project._round_log)
        except BaseException:
            ledger.release_lock()
            raise
        return project

    def close(self) -> None:
        """Close the ledger and release the write lock; a round still running is cancelled
        (recorded as such) first."""
        for handle in list(self._round_handles):
            if handle.running:
                handle.stop()
        self._ledger.close()

    def __enter__(self) -> Project:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Project({str(self.path)!r}{', readonly' if self.readonly else ''})"

    # -- the ledger (private: napari_pvs.rounds, tests and benchmarks use them) ---------------
    def _transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return self._ledger.transaction()

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self._ledger.query(sql, params)

    def _require_writable(self) -> None:
        self._ledger.require_writable()

    @property
    def schema_version(self) -> int:
        return self._ledger.schema_version

    # -- volumes ------------------------------------------------------------------------------
    def _label_store_path(self, volume_id: int) -> Path:
        return self._volumes.label_store_path(volume_id)

    def add_volume(
        self, path: str | os.PathLike, *, modality: str | None = None, name: str | None = None
    ) -> VolumeRecord:
        return self._volumes.add_volume(path, modality=modality, name=name)

    def set_modality(self, ref: int | str | VolumeRecord, modality: str) -> VolumeRecord:
        return self._volumes.set_modality(ref, modality)

    def remove_volume(self, ref: int | str) -> Path:
        """Take a volume out of the project (it can be added again); its patches still in the
        queue are skipped, its open candidates go stale, its rows stay in the history and its
        reviewed labels move to ``archive/<id>-<name>/`` (returned)."""
        record = self._volumes.volume(ref)
        with self._ledger.transaction() as db:
            self._volumes.mark_removed(record, db)
            self._queue.skip_new(record.id, db)
            self._candidates.retire_volume(record.id, db)
        return self._volumes.archive_labels(record)

    def volumes(self) -> list[VolumeRecord]:
        return self._volumes.volumes()

    def volume(self, ref: int | str | VolumeRecord) -> VolumeRecord:
        return self._volumes.volume(ref)

    def find_volume(self, ref: int | str, *, by_id: bool = False) -> VolumeRecord:
        return find_volume(self._volumes, ref, by_id=by_id)

    def open_volume(self, ref: int | str):
        return self._volumes.open_volume(ref)

    def check_volume(self, ref: int | str) -> bool:
        return self._volumes.check_volume(ref)

    def labels(self, ref: int | str):
        return self._volumes.labels(ref)

    def repair(self) -> list[dict[str, Any]]:
        """Move damaged label chunks aside (``damaged/<time>/``), keeping every intact
        annotation, and make those volumes' labels writable again (see
        :func:`napari_pvs.project.repair.repair_label_stores`)."""
        self._ledger.require_writable()
        return repair_label_stores(self._volumes, self._annotations)

    # -- annotations --------------------------------------------------------------------------
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
        return self._annotations.accept(
            ref, start, stop, labels, annotator=annotator, seconds=seconds,
            patch_id=patch_id, model_version=model_version,
        )  # fmt: skip

    def annotation(self, annotation_id: int) -> Annotation:
        return self._annotations.annotation(annotation_id)

    def annotations(
        self, ref: int | str | None = None, split: str | None = None
    ) -> list[Annotation]:
        return self._annotations.annotations(ref, split)

    # -- candidates and answers (yes/no review of predicted clusters) --------------------------
    def refresh_candidates(
        self, ref: int | str, *, order: str = "uncertain", min_voxels: int = 1
    ) -> list[CandidateRecord]:
        """(Re)compute the volume's candidates from the current version's prediction (needs
        :meth:`predict` done); returns its open candidates in rank order. ``order``:
        ``uncertain``, ``size`` or ``region`` (needs the volume's region map)."""
        regions = self._exports.region_map(ref) if order == "region" else None
        return self._candidates.refresh(ref, order=order, min_voxels=min_voxels, regions=regions)

    def candidates(
        self,
        ref: int | str | None = None,
        status: str | Sequence[str] | None = "open",
        n: int | None = None,
    ) -> list[CandidateRecord]:
        return self._candidates.candidates(ref, status, n)

    def candidate(self, candidate_id: int) -> CandidateRecord:
        return self._candidates.candidate(candidate_id)

    def candidate_mask(self, candidate_id: int):
        """The candidate's cluster: a boolean mask over its box (``bbox_start..bbox_stop``)."""
        return self._candidates.mask(candidate_id)

    def candidates_current(self, ref: int | str) -> bool:
        """True when the volume's candidates come from the current version's prediction."""
        return self._candidates.is_current(ref)

    def answer(
        self, candidate_id: int, answer: str, *, annotator: str, seconds: float | None = None
    ) -> AnswerRecord:
        return self._answers.answer(candidate_id, answer, annotator=annotator, seconds=seconds)

    def undo_answer(self, answer_id: int | None = None, *, annotator: str) -> AnswerRecord | None:
        return self._answers.undo(answer_id, annotator=annotator)

    def answers(
        self, ref: int | str | None = None, split: str | None = None, *, include_undone=False
    ) -> list[AnswerRecord]:
        return self._answers.answers(ref, split, include_undone=include_undone)

    def answer_mask(self, answer_id: int):
        """The voxels of its box an answer wrote (a boolean mask over ``bbox_start..stop``)."""
        return self._answers.written_mask(answer_id)

    def mark_candidate_edited(self, candidate_id: int, annotation_id: int) -> CandidateRecord:
        """An accepted patch (``annotation_id``) reviewed the candidate instead of an answer."""
        return self._candidates.mark_edited(
            candidate_id, self._annotations.annotation(annotation_id)
        )

    # -- the queue ----------------------------------------------------------------------------
    def skip(self, patch_id: int, *, annotator: str = "") -> None:
        self._queue.skip(patch_id, annotator=annotator)

    def record_queue(
        self,
        ref: int | str,
        ranked: Sequence[Any],
        *,
        model_version: int | None,
        round: int | None = None,
        db: sqlite3.Connection | None = None,
    ) -> list[PatchRecord]:
        return self._queue.record_queue(
            ref, ranked, model_version=model_version, round=round, db=db
        )

    def queue(self, ref: int | str | None = None, status: str | None = None) -> list[PatchRecord]:
        return self._queue.queue(ref, status)

    def excluded_boxes(self, ref: int | str) -> list[tuple[list[int], list[int]]]:
        return self._queue.excluded_boxes(ref)

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
        return self._queue.rank(
            ref, strategy=strategy, n=n, patch=patch, version=version, seed=seed,
            progress=progress, cancel=cancel,
        )  # fmt: skip

    # -- model versions and predictions -------------------------------------------------------
    def versions(self) -> list[ModelVersion]:
        return self._versions.versions()

    def version(self, version: int | str) -> ModelVersion:
        return self._versions.version(version)

    def current_version(self) -> ModelVersion:
        return self._versions.current_version()

    def checkpoint_path(self, version: int | str | None = None) -> Path:
        return self._versions.checkpoint_path(version)

    def load_model(self, version: int | str | None = None, device: str = "cpu"):
        return self._versions.load_model(version, device)

    def rollback(self, version: int | str) -> None:
        self._versions.rollback(version)

    def compare(self, versions: Iterable[int | str] | None = None) -> list[dict[str, Any]]:
        return self._versions.compare(versions)

    def validation_score(self, version: int | str) -> tuple[float | None, int]:
        return self._versions.validation_score(version)

    def prediction_path(self, ref: int | str, version: int | str | None = None) -> Path:
        return self._versions.prediction_path(ref, version)

    def predictor_options(self, **overrides) -> dict[str, Any]:
        return self._versions.predictor_options(**overrides)

    def has_prediction(self, ref: int | str, version: int | str | None = None) -> bool:
        return self._versions.has_prediction(ref, version)

    def predict(
        self,
        ref: int | str,
        *,
        version: int | str | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        model=None,
        **predictor_options,
    ) -> Path:
        return self._versions.predict(
            ref, version=version, progress=progress, cancel=cancel, model=model,
            **predictor_options,
        )  # fmt: skip

    # -- rounds (rows only; the work is napari_pvs.rounds) -------------------------------------
    def rounds(self) -> list[RoundRecord]:
        return self._round_log.rounds()

    def round(self, round_id: int) -> RoundRecord:
        return self._round_log.round(round_id)

    def _begin_round(self, config: dict[str, Any]) -> RoundRecord:
        return self._round_log.begin_round(config)

    def _commit_round(
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
        return self._round_log.commit_round(
            round_id, metrics=metrics, manifest_hash=manifest_hash, queues=queues,
            strategy=strategy, make_current=make_current, message=message,
            checkpoint_sha256=checkpoint_sha256,
        )  # fmt: skip

    def _finish_round(self, round_id: int, status: str, message: str) -> None:
        self._round_log.finish_round(round_id, status, message)

    def stop_hint(self, patience: int | None = None) -> str | None:
        return self._round_log.stop_hint(patience)

    # -- settings, events, status -------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return self._settings.settings()

    def update_settings(self, **values: Any) -> dict[str, Any]:
        return self._settings.update_settings(**values)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return self._ledger.events(kind)

    def status(self) -> dict[str, Any]:
        return project_status(
            self._ledger, self._volumes, self._annotations, self._queue, self._versions,
            self._round_log, self._candidates, self._answers,
        )  # fmt: skip

    # -- the PVS burden and export ------------------------------------------------------------
    def region_map(self, ref: int | str):
        return self._exports.region_map(ref)

    def burden(
        self,
        ref: int | str | None = None,
        version: int | str | None = None,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> list[dict[str, Any]]:
        return self._exports.burden(ref, version, progress=progress, cancel=cancel)

    def export(
        self,
        out: str | os.PathLike | None = None,
        *,
        format: str = "nifti",
        overwrite: bool = False,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> dict[str, Any]:
        return self._exports.export(
            out, format=format, overwrite=overwrite, progress=progress, cancel=cancel
        )

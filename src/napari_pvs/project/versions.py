"""Model versions and what each produces: checkpoints ``models/v<N>.safetensors``, the current
version, rollback, and per-volume prediction stores ``predictions/<volume id>/v<N>.zarr``."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from napari_pvs import atomic
from napari_pvs.progress import CancelToken, ProgressCallback
from napari_pvs.project.ledger import Ledger
from napari_pvs.project.records import ModelVersion, now
from napari_pvs.project.settings import Settings
from napari_pvs.project.volumes import Volumes


class Versions:
    """The ``model_versions`` table, the ``current_version`` meta key, checkpoints and
    predictions."""

    def __init__(self, ledger: Ledger, volumes: Volumes, settings: Settings) -> None:
        self._ledger = ledger
        self._volumes = volumes
        self._settings = settings

    def _version_record(self, row: tuple) -> ModelVersion:
        return ModelVersion(
            version=int(row[0]),
            checkpoint=self._ledger.folder / row[1],
            parent=row[2],
            created=row[3],
            status=row[4],
            metrics=json.loads(row[5] or "{}"),
            manifest_hash=row[6],
            round=row[7],
        )

    def versions(self) -> list[ModelVersion]:
        rows = self._ledger.query(
            "SELECT version, checkpoint, parent, created, status, metrics, manifest_hash, round "
            "FROM model_versions ORDER BY version"
        )
        return [self._version_record(r) for r in rows]

    def version(self, version: int | str) -> ModelVersion:
        number = parse_version(version)
        for record in self.versions():
            if record.version == number:
                return record
        known = ", ".join(f"v{v.version}" for v in self.versions())
        raise ValueError(f"there is no model version v{number}; versions: {known}")

    def current_version(self) -> ModelVersion:
        return self.version(self.current_number())

    def number(self, version: int | str | None = None) -> int:
        """The number of ``version`` (3, "3" or "v3"), the current version's when None."""
        return self.current_version().version if version is None else parse_version(version)

    def current_number(self) -> int:
        return int(self._ledger.meta("current_version", 0))

    def exists(self, version: int) -> bool:
        """True when the ledger holds ``version`` (in any status)."""
        return bool(
            self._ledger.query("SELECT 1 FROM model_versions WHERE version = ?", (version,))
        )

    def newest(self) -> int:
        """The highest version number the ledger holds."""
        return int(self._ledger.query("SELECT MAX(version) FROM model_versions")[0][0] or 0)

    def checkpoint_path(self, version: int | str | None = None) -> Path:
        record = self.current_version() if version is None else self.version(version)
        return record.checkpoint

    def load_model(self, version: int | str | None = None, device: str = "cpu"):
        """``(model, metadata)`` of a version (current by default), verified on load."""
        from napari_pvs.models.checkpoint import load_checkpoint

        return load_checkpoint(self.checkpoint_path(version), device=device)

    def rollback(self, version: int | str) -> None:
        """Make ``version`` current again; nothing is deleted (roll forward the same way)."""
        from napari_pvs.models.checkpoint import read_checkpoint

        record = self.version(version)
        if record.status != "ready":
            raise ValueError(f"version v{record.version} is {record.status}, not ready")
        read_checkpoint(record.checkpoint)  # refuses a missing or damaged checkpoint
        previous = self.current_version().version
        with self._ledger.transaction() as db:
            self.make_current(record.version, db)
            self._ledger.event("rollback", {"from": previous, "to": record.version}, db)

    def make_current(self, version: int, db: sqlite3.Connection) -> None:
        """Make ``version`` current, in the caller's transaction."""
        self._ledger.set_meta(db, "current_version", version)

    def add_ready(
        self,
        version: int,
        *,
        parent: int | None,
        metrics: dict[str, Any],
        manifest_hash: str,
        round_id: int,
        db: sqlite3.Connection,
    ) -> None:
        """Record a round's verified checkpoint as a ready version, in the caller's
        transaction."""
        db.execute(
            "INSERT INTO model_versions VALUES (?, ?, ?, ?, 'ready', ?, ?, ?)",
            (
                version,
                f"models/v{version}.safetensors",
                parent,
                now(),
                json.dumps(metrics, default=float),
                manifest_hash,
                round_id,
            ),
        )

    def validation_score(self, version: int | str) -> tuple[float | None, int]:
        """The one validation Dice of a version and the set's size in patches, (None, 0) until
        measured: what the versions table, Compare and the learning curve all show.

        A round's version: as scored at the end of its round. A version no round made (the
        initial model): as scored, on that round's validation patches, at the start of the
        first finished round that trained from it. A checkpoint's own training metrics were
        measured on another set and are never shown as this number.
        """
        records = self.versions()
        number = parse_version(version)
        for record in records:
            if record.version == number and record.round is not None:
                return _score(record.metrics, "validation_dice")
        for record in records:
            if record.parent == number and record.round is not None:
                dice, patches = _score(record.metrics, "base_validation_dice")
                if dice is not None:
                    return dice, patches
        return None, 0

    def compare(self, versions: Iterable[int | str] | None = None) -> list[dict[str, Any]]:
        """Versions' metrics side by side (one dict per version), ``validation_dice`` and
        ``validation_patches`` from :meth:`validation_score` (a checkpoint's own number, if
        any, as ``checkpoint_validation_dice``); per-patch counts left out."""
        chosen = self.versions() if versions is None else [self.version(v) for v in versions]
        current = self.current_version().version
        rows = []
        for v in chosen:
            metrics = {k: m for k, m in v.metrics.items() if k not in _BULKY_METRICS}
            if v.round is None and "validation_dice" in metrics:
                metrics["checkpoint_validation_dice"] = metrics.pop("validation_dice")
            dice, patches = self.validation_score(v.version)
            rows.append({
                "version": v.version,
                "parent": v.parent,
                "round": v.round,
                "status": v.status,
                "current": v.version == current,
                "created": v.created,
                **metrics,
                "validation_dice": dice,
                "validation_patches": patches,
            })  # fmt: skip
        return rows

    # -- predictions --------------------------------------------------------------------------
    def prediction_path(self, ref: int | str, version: int | str | None = None) -> Path:
        record = self._volumes.volume(ref)
        number = self.number(version)
        return self._ledger.folder / "predictions" / str(record.id) / f"v{number}.zarr"

    def predictor_options(self, **overrides) -> dict[str, Any]:
        """Predictor settings every project prediction uses (settings, then ``overrides``)."""
        from napari_pvs.models import prediction_options

        settings = self._settings.settings()
        stored = {"tta": settings["predict_tta"], "mc_samples": int(settings["predict_mc"]),
                  "device": settings["device"]}  # fmt: skip
        return prediction_options(**{**stored, **overrides})

    def has_prediction(self, ref: int | str, version: int | str | None = None) -> bool:
        """True when the version's prediction store of the volume is complete."""
        import zarr

        from napari_pvs.io import ATTRS_KEY

        path = self.prediction_path(ref, version)
        if not path.is_dir():
            return False
        try:
            attrs = dict(zarr.open_group(str(path), mode="r").attrs).get(ATTRS_KEY, {})
            return bool(attrs.get("complete", False))
        except Exception:  # an unreadable partial store is simply not complete
            return False

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
        """Predict a volume with a version (current by default) into its prediction store.

        Resumes an interrupted run; a store made with other settings is refused by the
        Predictor (never mixed or overwritten).
        """
        self._ledger.require_writable()
        record = self._volumes.volume(ref)
        self._volumes.require_unchanged(record)
        number = self.number(version)
        out = self.prediction_path(record.id, number)
        if self.has_prediction(record.id, number):
            return out  # (before torch is imported: showing a stored prediction needs none)
        from napari_pvs.inference import Predictor

        out.parent.mkdir(parents=True, exist_ok=True)
        options = self.predictor_options(**predictor_options)
        if model is None:
            model, _ = self.load_model(number, device="cpu")
        predictor = Predictor(model, modality=record.modality, **options)
        predictor.predict(
            self._volumes.open_volume(record.id), out, progress=progress, cancel=cancel
        )
        atomic.fsync_path(out)
        return out

    def predicted_versions(self, volume_id: int) -> list[int]:
        """The versions with a prediction store (complete or not) of the volume."""
        return sorted(
            n
            for n in (
                _version_number(p.name, ".zarr")
                for p in (self._ledger.folder / "predictions" / str(volume_id)).glob("v*.zarr")
            )
            if n is not None
        )

    def remove_files_except(self, keep: set[int | None]) -> None:
        """Remove checkpoints and predictions of versions not in ``keep`` (and temporaries)."""
        root = self._ledger.folder
        for item in (root / "models").glob("*"):
            number = _version_number(item.name, ".safetensors")
            if item.name.startswith(atomic.TEMP_MARK) or (
                number is not None and number not in keep
            ):
                _remove_path(item)
        for folder in (root / "predictions").glob("*"):
            for item in folder.glob("*"):
                number = _version_number(item.name, ".zarr")
                if item.name.startswith(atomic.TEMP_MARK) or (
                    number is not None and number not in keep
                ):
                    _remove_path(item)


def insert_initial_version(
    db: sqlite3.Connection, checkpoint_meta: dict[str, Any], created: str
) -> None:
    """Version 0 of a new project: its ``models/v0.safetensors`` with the checkpoint's own
    metrics and training manifest hash."""
    db.execute(
        "INSERT INTO model_versions VALUES (0, ?, NULL, ?, 'ready', ?, ?, NULL)",
        (
            "models/v0.safetensors",
            created,
            json.dumps(checkpoint_meta.get("metrics") or {}),
            (checkpoint_meta.get("training") or {}).get("manifest_hash"),
        ),
    )


#: Per-patch evidence kept in a version's metrics but not shown side by side.
_BULKY_METRICS = ("validation_counts", "base_validation_counts", "guard")


def _score(metrics: dict[str, Any], key: str) -> tuple[float | None, int]:
    value = metrics.get(key)
    if not isinstance(value, int | float):
        return None, 0
    return float(value), int(metrics.get("validation_patches") or 0)


def parse_version(version: int | str) -> int:
    text = str(version).strip().lower().removeprefix("v")
    if not text.isdigit():
        raise ValueError(f"a model version is a number like 3 or v3, got {version!r}")
    return int(text)


def _version_number(name: str, suffix: str) -> int | None:
    if name.startswith("v") and name.endswith(suffix) and name[1 : -len(suffix)].isdigit():
        return int(name[1 : -len(suffix)])
    return None


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

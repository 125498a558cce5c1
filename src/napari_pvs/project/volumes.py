"""The project's volumes: added by reference (never copied), each with a zarr label store.

A label store holds ``labels`` (uint8 0/1, :data:`UNREVIEWED` = 255 = not reviewed) and
``reviewed`` (bool) in :data:`LABEL_CHUNK`-voxel chunks, exactly the volume's shape.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from napari_pvs import atomic
from napari_pvs.project.layout import label_store_path
from napari_pvs.project.ledger import Ledger
from napari_pvs.project.records import VolumeRecord, now

UNREVIEWED = 255
LABEL_CHUNK = 32


class Volumes:
    """The ``volumes`` table and the label stores."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def label_store_path(self, volume_id: int) -> Path:
        return label_store_path(self._ledger.folder, volume_id)

    def create_label_store(self, volume_id: int, shape: Sequence[int]) -> Path:
        import zarr

        store = self.label_store_path(volume_id)
        store.parent.mkdir(parents=True, exist_ok=True)
        chunks = tuple(min(LABEL_CHUNK, int(s)) for s in shape)
        with atomic.atomic_output(store, overwrite=True) as tmp:
            group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            group.attrs["napari_pvs"] = {"volume_id": volume_id, "unreviewed": UNREVIEWED}
            group.create_array(
                "labels", shape=tuple(shape), chunks=chunks, dtype="uint8", fill_value=UNREVIEWED
            )
            group.create_array(
                "reviewed", shape=tuple(shape), chunks=chunks, dtype="bool", fill_value=False
            )
        return store

    def resolve_path(self, stored: str) -> Path:
        path = Path(stored)
        return path if path.is_absolute() else self._ledger.folder / path

    def _record(self, row: tuple) -> VolumeRecord:
        return VolumeRecord(
            id=int(row[0]),
            name=row[1],
            path=self.resolve_path(row[2]),
            fingerprint=row[3],
            modality=row[4],
            shape=tuple(json.loads(row[5])),
            spacing=tuple(json.loads(row[6])),
            added=row[7],
        )

    def rows(self, include_removed: bool = False) -> list[VolumeRecord]:
        where = "" if include_removed else "WHERE removed IS NULL"
        rows = self._ledger.query(
            "SELECT id, name, path, fingerprint, modality, shape, spacing, added FROM volumes "
            f"{where} ORDER BY id"
        )
        return [self._record(r) for r in rows]

    def add_volume(
        self, path: str | os.PathLike, *, modality: str | None = None, name: str | None = None
    ) -> VolumeRecord:
        """Add a volume (NIfTI, zarr, OME-Zarr) by reference; its label store starts unreviewed.

        A volume inside the project folder is stored by relative path (the project can move);
        others by absolute path. Adding the same file twice is refused.
        """
        from napari_pvs.io import open_volume

        self._ledger.require_writable()
        path = Path(path).expanduser().absolute()
        volume = open_volume(path, modality=modality)
        for existing in self.rows():
            if existing.path.resolve() == path.resolve():
                raise ValueError(
                    f"{path} is already in the project as volume {existing.id} ({existing.name!r})"
                )
        base = name or _volume_stem(path)
        taken = {v.name for v in self.rows(include_removed=True)}
        if name is not None and name in taken:
            raise ValueError(f"a volume named {name!r} is already in the project; pick another")
        unique = base
        for i in itertools.count(2):
            if unique not in taken:
                break
            unique = f"{base}-{i}"
        try:
            stored = str(path.resolve().relative_to(self._ledger.folder.resolve()))
        except ValueError:
            stored = str(path.resolve())
        with self._ledger.transaction() as db:
            cursor = db.execute(
                "INSERT INTO volumes(name, path, fingerprint, modality, shape, spacing, added) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    unique,
                    stored,
                    fingerprint(path),
                    volume.modality,
                    json.dumps([int(s) for s in volume.shape]),
                    json.dumps([float(s) for s in volume.spacing]),
                    now(),
                ),
            )
            volume_id = int(cursor.lastrowid)
            self._ledger.event(
                "add-volume", {"volume": volume_id, "name": unique, "path": stored}, db
            )
        # After the row commits: a crash before the store exists is repaired on open.
        self.create_label_store(volume_id, volume.shape)
        return self.volume(volume_id)

    def set_modality(self, ref: int | str | VolumeRecord, modality: str) -> VolumeRecord:
        """Record the volume's contrast (``T1``/``T2``/``unknown``): what its next predictions
        tell the model; predictions already made keep the one they were made with."""
        from napari_pvs.io import normalize_modality

        record = self.volume(ref)
        value = normalize_modality(modality)
        with self._ledger.transaction() as db:
            db.execute("UPDATE volumes SET modality = ? WHERE id = ?", (value, record.id))
            self._ledger.event(
                "set-modality", {"volume": record.id, "from": record.modality, "to": value}, db
            )
        return self.volume(record.id)

    def mark_removed(self, record: VolumeRecord, db: sqlite3.Connection) -> None:
        """Take a volume out, in the caller's transaction (rows and labels are kept)."""
        db.execute("UPDATE volumes SET removed = ? WHERE id = ?", (now(), record.id))
        self._ledger.event("remove-volume", {"volume": record.id, "name": record.name}, db)

    def volumes(self) -> list[VolumeRecord]:
        return self.rows()

    def volume(self, ref: int | str | VolumeRecord) -> VolumeRecord:
        """A live volume by id or name; ValueError for an unknown or removed one."""
        if isinstance(ref, VolumeRecord):
            ref = ref.id
        column = "id" if isinstance(ref, int | np.integer) or str(ref).isdigit() else "name"
        value = int(ref) if column == "id" else str(ref)
        rows = self._ledger.query(
            "SELECT id, name, path, fingerprint, modality, shape, spacing, added, removed "
            f"FROM volumes WHERE {column} = ? ORDER BY id DESC",
            (value,),
        )
        live = [r for r in rows if r[8] is None]
        if live:
            return self._record(live[0][:8])
        if rows:
            raise ValueError(
                f"volume {ref!r} was removed from the project on {rows[0][8]}; add it again "
                "(napari-pvs project add) to work on it"
            )
        names = ", ".join(f"{v.id} ({v.name})" for v in self.rows()) or "none"
        raise ValueError(f"no volume {ref!r} in the project; volumes: {names}")

    def open_volume(self, ref: int | str):
        """The volume as an ``io.Volume``; a clear error if its file moved or changed."""
        from napari_pvs.io import open_volume

        record = self.volume(ref)
        if not record.path.exists():
            raise FileNotFoundError(
                f"volume {record.name!r} was at {record.path}, which no longer exists; put the "
                "file back there"
            )
        volume = open_volume(record.path, modality=record.modality)
        if tuple(volume.shape) != record.shape:
            raise ValueError(
                f"volume {record.name!r} at {record.path} now has shape {volume.shape}, not "
                f"{record.shape} as when it was added; its labels no longer line up"
            )
        return volume

    def check_volume(self, ref: int | str) -> bool:
        """True when the volume's file still has the fingerprint it had when added."""
        record = self.volume(ref)
        return record.path.exists() and fingerprint(record.path) == record.fingerprint

    def labels(self, ref: int | str):
        """The volume's label store (read-only zarr group: ``labels``, ``reviewed``)."""
        import zarr

        record = self.volume(ref)
        return zarr.open_group(str(self.label_store_path(record.id)), mode="r")


def _volume_stem(path: Path) -> str:
    name = path.name.rstrip("/")
    for suffix in (".nii.gz", ".ome.zarr", ".zarr", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def fingerprint(path: str | os.PathLike, budget_bytes: int = 64 * 2**20) -> str:
    """A cheap content fingerprint of a volume file or store: changes when the data change.

    SHA-256 over every file's relative name and size, plus the first and last MiB of each file
    (zarr metadata files always; chunk files sampled evenly until ``budget_bytes`` are read), so
    a multi-GB store costs a directory walk and at most 64 MiB of reading.
    """
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    meta = {p for p in files if p.name in ("zarr.json", ".zarray", ".zattrs", ".zgroup")}
    data = [p for p in files if p not in meta]
    per_file = 2 * 2**20
    keep = max(1, budget_bytes // per_file)
    sampled = set(data if len(data) <= keep else data[:: max(1, len(data) // keep)][:keep])
    for item in files:
        size = item.stat().st_size
        rel = item.relative_to(path).as_posix() if path.is_dir() else item.name
        digest.update(f"{rel}\0{size}\0".encode())
        if item in sampled or item in meta:
            with open(item, "rb") as handle:
                digest.update(handle.read(2**20))
                if size > 2**20:
                    handle.seek(max(2**20, size - 2**20))
                    digest.update(handle.read(2**20))
    return digest.hexdigest()

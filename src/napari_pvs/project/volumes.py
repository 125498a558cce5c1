"""The project's volumes: added by reference (never copied), each with a zarr label store.

A label store holds ``labels`` (uint8 0/1, :data:`UNREVIEWED` = 255 = not reviewed) and
``reviewed`` (bool) in :data:`LABEL_CHUNK`-voxel chunks, exactly the volume's shape.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from napari_pvs import atomic
from napari_pvs.io.damage import DamagedFileError, damaged_file_error
from napari_pvs.project.layout import label_store_path
from napari_pvs.project.ledger import Ledger
from napari_pvs.project.records import VolumeRecord, now
from napari_pvs.project.refs import find_volume

UNREVIEWED = 255
LABEL_CHUNK = 32
#: The ``meta`` key prefix of each volume's last verified file stamp (:func:`stat_stamp`).
STAMP_KEY = "volume-stamp."


#: The ``meta`` key prefix marking a volume's label store damaged (its labels read-only).
DAMAGE_KEY = "labels-damaged."


class VolumeChanged(ValueError):
    """A volume's file no longer holds the data it held when it was added."""


class LabelsDamaged(DamagedFileError):
    """A volume's label store has a damaged part: its labels are read-only until repaired."""


class Volumes:
    """The ``volumes`` table and the label stores."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._verified: dict[int, str] = {}  # volume id -> stamp checked in this session

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
        from napari_pvs.limits import check_volume_shape

        self._ledger.require_writable()
        path = Path(path).expanduser().absolute()
        volume = open_volume(path, modality=modality)
        check_volume_shape(volume.shape, path)
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
        stamp = stat_stamp(path)
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
            self._ledger.set_meta(db, f"{STAMP_KEY}{volume_id}", stamp)
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

    def archive_labels(self, record: VolumeRecord) -> Path:
        """Move a removed volume's label store to ``archive/<id>-<name>/labels.zarr`` (one
        rename inside the project; a kill before it leaves the store in place, also kept)."""
        archive = self._ledger.folder / "archive" / f"{record.id}-{record.name}"
        archive.mkdir(parents=True, exist_ok=True)
        summary = {"id": record.id, "name": record.name, "path": str(record.path),
                   "shape": list(record.shape), "removed": now()}  # fmt: skip
        atomic.write_json(archive / "volume.json", summary, overwrite=True)
        store = self.label_store_path(record.id)
        if store.is_dir():
            os.replace(store, archive / "labels.zarr")
            atomic.fsync_folder(archive)
            atomic.fsync_folder(store.parent)
        return archive

    def volumes(self) -> list[VolumeRecord]:
        return self.rows()

    def volume(self, ref: int | str | VolumeRecord) -> VolumeRecord:
        """A live volume by id (an int), or by what a user writes (``#2``, a name, the path it
        was added with: :func:`napari_pvs.project.refs.find_volume`); ValueError for an unknown
        or removed one."""
        if isinstance(ref, VolumeRecord):
            ref = ref.id
        if not isinstance(ref, int | np.integer):
            return find_volume(self, str(ref))
        rows = self._ledger.query(
            "SELECT id, name, path, fingerprint, modality, shape, spacing, added, removed "
            "FROM volumes WHERE id = ? ORDER BY id DESC",
            (int(ref),),
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

    def require_unchanged(self, record: VolumeRecord) -> None:
        """Stop with a sentence when the volume's file moved or its data changed since *Add*.

        Cheap: the file's size and modification time (a store's folders and metadata files)
        are compared with the last verified stamp; only when they differ is the content
        :func:`fingerprint` (header and a sample of chunks) recomputed and compared with the
        one taken at *Add*. A touched but identical file is accepted and its stamp refreshed.
        A ledger row whose fingerprint is not one napari-pvs computes (a hand-made or foreign
        ledger) cannot be compared: its current stamp is adopted.
        """
        if not record.path.exists():
            raise FileNotFoundError(
                f"volume {record.name!r} was at {record.path}, which no longer exists; put the "
                "file back there (or remove the volume: napari-pvs project remove)"
            )
        stamp = stat_stamp(record.path)
        if stamp in (self._verified.get(record.id), self._ledger.meta(STAMP_KEY + str(record.id))):
            self._verified[record.id] = stamp
            return
        if _is_fingerprint(record.fingerprint) and fingerprint(record.path) != record.fingerprint:
            raise VolumeChanged(
                f"volume {record.name!r} (#{record.id}) at {record.path} changed since it was "
                "added: its labels and predictions no longer match its voxels; put the "
                "original file back at that path, or add the new file as a new volume "
                "(napari-pvs project add) and remove this one (napari-pvs project remove)"
            )
        self._verified[record.id] = stamp
        if not self._ledger.readonly:
            with contextlib.suppress(sqlite3.Error, OSError), self._ledger.transaction() as db:
                self._ledger.set_meta(db, STAMP_KEY + str(record.id), stamp)

    def open_volume(self, ref: int | str):
        """The volume as an ``io.Volume``; a clear error if its file moved or changed."""
        from napari_pvs.io import open_volume

        record = self.volume(ref)
        self.require_unchanged(record)
        volume = open_volume(record.path, modality=record.modality)
        if tuple(volume.shape) != record.shape:
            raise ValueError(
                f"volume {record.name!r} at {record.path} now has shape {volume.shape}, not "
                f"{record.shape} as when it was added; its labels no longer line up"
            )
        return volume

    def check_volume(self, ref: int | str) -> bool:
        """True when the volume's file is where it was and holds what it held when added."""
        try:
            self.require_unchanged(self.volume(ref))
        except (FileNotFoundError, VolumeChanged):
            return False
        return True

    # -- damage containment: one damaged label store blocks only its own volume -------------
    def damaged_label_chunks(
        self, volume_id: int, start: Sequence[int] | None = None, stop: Sequence[int] | None = None
    ) -> list[tuple[str, tuple[int, ...], Path, str]]:
        """The chunk files of a label store (within the box, if given) that cannot be read:
        ``(array, chunk index, file, reason)`` each. Reads each chunk once (a repair's cost)."""
        import zarr

        store = self.label_store_path(volume_id)
        group = zarr.open_group(str(store), mode="r")
        found = []
        for name in ("labels", "reviewed"):
            array = group[name]
            chunks, shape = array.chunks, array.shape
            low = start or (0, 0, 0)
            high = stop or shape
            ranges = [
                range(a // c, (b - 1) // c + 1) for a, b, c in zip(low, high, chunks, strict=True)
            ]
            for index in itertools.product(*ranges):
                key = store / name / array.metadata.encode_chunk_key(index)
                if not key.is_file():
                    continue
                region = tuple(
                    slice(i * c, min((i + 1) * c, s))
                    for i, c, s in zip(index, chunks, shape, strict=True)
                )
                try:
                    array[region]
                except Exception as exc:
                    damaged = damaged_file_error(key, exc)
                    if damaged is None:
                        raise
                    found.append((name, index, key, str(exc)[:120]))
        return found

    def mark_labels_damaged(self, volume_id: int, start=None, stop=None) -> LabelsDamaged:
        """Record the volume's labels as damaged (read-only) and return the sentence to raise."""
        damaged = self.damaged_label_chunks(volume_id, start, stop) or self.damaged_label_chunks(
            volume_id
        )
        files = [str(key) for _, _, key, _ in damaged] or [str(self.label_store_path(volume_id))]
        with self._ledger.transaction() as db:
            self._ledger.set_meta(db, f"{DAMAGE_KEY}{volume_id}", {"files": files})
            self._ledger.event("labels-damaged", {"volume": volume_id, "files": files}, db)
        return self.labels_damaged_error(volume_id)

    def labels_damaged_error(self, volume_id: int) -> LabelsDamaged | None:
        """The sentence for a volume whose labels are marked damaged, or None."""
        damage = self._ledger.meta(f"{DAMAGE_KEY}{volume_id}")
        if not damage:
            return None
        name = self.rows(include_removed=True)
        name = next((v.name for v in name if v.id == volume_id), str(volume_id))
        files = damage.get("files") or ["?"]
        more = f" and {len(files) - 1} more" if len(files) > 1 else ""
        return LabelsDamaged(
            f"the labels of volume {name!r} (#{volume_id}) are damaged ({files[0]}{more} cannot "
            f"be read); they are read-only until you run 'napari-pvs project repair "
            f"{self._ledger.folder}', which moves the damaged parts aside and keeps every "
            "intact annotation; the other volumes are not affected"
        )

    def require_labels_writable(self, record: VolumeRecord) -> None:
        error = self.labels_damaged_error(record.id)
        if error is not None:
            raise error

    def record_labels_repaired(self, volume_id: int, detail: dict) -> None:
        """The volume's labels are writable again (one transaction with its event)."""
        with self._ledger.transaction() as db:
            db.execute("DELETE FROM meta WHERE key = ?", (f"{DAMAGE_KEY}{volume_id}",))
            self._ledger.event("labels-repaired", {"volume": volume_id, **detail}, db)

    @property
    def folder(self) -> Path:
        """The project folder."""
        return self._ledger.folder

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


def _is_fingerprint(text: str) -> bool:
    """True for a digest :func:`fingerprint` makes (64 hexadecimal digits)."""
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


_METADATA_NAMES = ("zarr.json", ".zarray", ".zattrs", ".zgroup")


def stat_stamp(path: str | os.PathLike) -> str:
    """Size and modification time of a volume file, or of a store's folders and metadata files
    two levels deep (no chunk is listed one by one): changes whenever the file is rewritten."""
    path = Path(path)
    info = path.stat()
    parts = [f"{info.st_size}:{info.st_mtime_ns}"]
    if path.is_dir():
        level = [path]
        for _ in range(2):
            below = []
            for folder in level:
                with os.scandir(folder) as entries:
                    for entry in sorted(entries, key=lambda e: e.name):
                        if entry.is_dir() or entry.name in _METADATA_NAMES:
                            stat = entry.stat()
                            name = os.path.relpath(entry.path, path)
                            parts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
                            if entry.is_dir():
                                below.append(Path(entry.path))
            level = below
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


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

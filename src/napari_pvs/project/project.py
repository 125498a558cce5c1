"""The annotation project: a folder holding a durable label ledger, label stores and models.

A project is what a researcher copies, backs up and reopens years later (layout and contract:
``docs/project.md``). ``ledger.sqlite`` (WAL, ``synchronous=FULL``) records volumes, the patches
shown, every accepted annotation (who, when, which model version it corrected, seconds spent,
empty or not, train or validation), model versions, rounds, settings and an append-only event
log. Each volume has a zarr label store: ``labels`` (0/1, 255 = not reviewed) and ``reviewed``.

Accepting an annotation is durable the moment :meth:`Project.accept` returns: the patch is first
written to a journal file (``journal/<token>.npy``, fsynced) and an intent row commits; then the
label and ``reviewed`` chunks are written and fsynced; then the annotation row commits and the
intent row goes, in one transaction. A crash before the intent row loses an unacknowledged
accept and nothing else; a crash after it is finished on the next open by writing the journalled
patch again (the label write is idempotent). Chunk files are replaced by rename, so a torn write
never damages the labels of neighbouring annotations in the same chunk.

No Qt, no napari: the CLI and the napari widgets are thin adapters over this module.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import getpass
import hashlib
import io as _io
import itertools
import json
import os
import shutil
import socket
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from napari_pvs import atomic
from napari_pvs.progress import CancelToken, ProgressCallback

#: The ledger schema this code writes; older ledgers are migrated on open (see MIGRATIONS).
SCHEMA_VERSION = 2
MARKER = "napari-pvs-project.json"
MARKER_FORMAT = "napari-pvs-project"
LEDGER = "ledger.sqlite"
LOCK = "lock"
UNREVIEWED = 255
LABEL_CHUNK = 32
SPLITS = ("train", "validation")
PATCH_STATUSES = ("new", "reviewed", "skipped")
#: A round whose validation Dice gains less than this did not improve (stopping hint).
STOP_MIN_GAIN = 0.005

#: Project settings with their defaults (``settings()`` merges stored values over these).
DEFAULT_SETTINGS: dict[str, Any] = {
    "strategy": "stratified",  # queue strategy (napari_pvs.ranking.STRATEGIES)
    "n": 20,  # patches per queue
    "patch": 32,  # patch edge in voxels
    "predict_tta": 1,  # test-time mirrorings for project predictions (1: one pass, fast)
    "predict_mc": 8,  # MC-dropout samples: uncertainty maps for every strategy (bald too)
    "device": "auto",
    "brush_size": 1,  # the napari Review step's brush, in voxels
    "stop_patience": 2,  # rounds without validation gain before the stopping hint
}


class ProjectError(ValueError):
    """Not a project, a corrupt or too-new ledger: names the path; the data are never touched."""


class ProjectLocked(ProjectError):
    """Another live process holds the project for writing."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


# ---------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class VolumeRecord:
    id: int
    name: str
    path: Path
    modality: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    fingerprint: str
    added: str


@dataclass(frozen=True)
class Annotation:
    id: int
    volume_id: int
    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    annotator: str
    created: str
    model_version: int | None
    seconds: float | None
    empty: bool
    patch_id: int | None
    split: str
    pvs_voxels: int | None


@dataclass(frozen=True)
class PatchRecord:
    id: int
    volume_id: int
    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    strategy: str
    score: float
    predicted_pvs: int
    model_version: int | None
    round: int | None
    rank: int
    status: str
    shown: str


@dataclass(frozen=True)
class ModelVersion:
    version: int
    checkpoint: Path
    parent: int | None
    created: str
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    manifest_hash: str | None = None
    round: int | None = None


@dataclass(frozen=True)
class RoundRecord:
    id: int
    started: str
    finished: str | None
    status: str
    base_version: int | None
    new_version: int | None
    config: dict[str, Any]
    snapshot_annotation_ids: list[int]
    message: str | None


# ---------------------------------------------------------------------------------------------
# Schema and migrations

_BOX = "z0 INTEGER NOT NULL, y0 INTEGER NOT NULL, x0 INTEGER NOT NULL, " \
       "z1 INTEGER NOT NULL, y1 INTEGER NOT NULL, x1 INTEGER NOT NULL"  # fmt: skip

#: Schema 1, the first shipped ledger (kept as tests/fixtures/ledger_v1.sql too).
SCHEMA_1 = f"""
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE volumes(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, path TEXT NOT NULL,
  fingerprint TEXT NOT NULL, modality TEXT NOT NULL, shape TEXT NOT NULL, spacing TEXT NOT NULL,
  added TEXT NOT NULL, removed TEXT);
CREATE TABLE model_versions(version INTEGER PRIMARY KEY, checkpoint TEXT NOT NULL,
  parent INTEGER, created TEXT NOT NULL, status TEXT NOT NULL, metrics TEXT NOT NULL,
  manifest_hash TEXT, round INTEGER);
CREATE TABLE rounds(id INTEGER PRIMARY KEY AUTOINCREMENT, started TEXT NOT NULL, finished TEXT,
  status TEXT NOT NULL, base_version INTEGER, new_version INTEGER, config TEXT NOT NULL,
  snapshot_annotation_ids TEXT NOT NULL, message TEXT);
CREATE TABLE patches(id INTEGER PRIMARY KEY AUTOINCREMENT,
  volume_id INTEGER NOT NULL REFERENCES volumes(id), {_BOX}, strategy TEXT NOT NULL,
  score REAL NOT NULL, predicted_pvs INTEGER NOT NULL, model_version INTEGER, round INTEGER,
  rank INTEGER NOT NULL, status TEXT NOT NULL, shown TEXT NOT NULL);
CREATE TABLE annotations(id INTEGER PRIMARY KEY AUTOINCREMENT,
  volume_id INTEGER NOT NULL REFERENCES volumes(id), {_BOX}, annotator TEXT NOT NULL,
  created TEXT NOT NULL, model_version INTEGER, seconds REAL, empty INTEGER NOT NULL,
  patch_id INTEGER, split TEXT NOT NULL);
CREATE TABLE events(id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, kind TEXT NOT NULL,
  detail TEXT NOT NULL);
"""

#: Schema 1 -> 2: the PVS voxel count and a content digest of every annotation (retried
#: accepts are recognised), the accept journal (intent rows that make a crash between the
#: label write and the commit repairable), and an event log that refuses updates and deletes.
MIGRATION_2 = f"""
ALTER TABLE annotations ADD COLUMN pvs_voxels INTEGER;
ALTER TABLE annotations ADD COLUMN digest TEXT;
CREATE TABLE pending_accepts(token TEXT PRIMARY KEY,
  volume_id INTEGER NOT NULL REFERENCES volumes(id), {_BOX}, annotator TEXT NOT NULL,
  created TEXT NOT NULL, model_version INTEGER, seconds REAL, patch_id INTEGER,
  split TEXT NOT NULL, digest TEXT NOT NULL);
CREATE TRIGGER events_append_only_update BEFORE UPDATE ON events
  BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE TRIGGER events_append_only_delete BEFORE DELETE ON events
  BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
CREATE INDEX annotations_volume ON annotations(volume_id);
CREATE INDEX patches_volume ON patches(volume_id, status);
"""


def _migrate_2(project: Project, db: sqlite3.Connection) -> None:
    for statement in _statements(MIGRATION_2):
        db.execute(statement)
    # Old annotations get their PVS voxel count from the label store as it stands now.
    rows = db.execute("SELECT id, volume_id, z0, y0, x0, z1, y1, x1 FROM annotations").fetchall()
    for row in rows:
        store = project.path / "volumes" / str(row[1]) / "labels.zarr"
        if not store.is_dir():
            continue
        import zarr

        labels = zarr.open_group(str(store), mode="r")["labels"]
        patch = np.asarray(labels[row[2] : row[5], row[3] : row[6], row[4] : row[7]])
        db.execute(
            "UPDATE annotations SET pvs_voxels = ? WHERE id = ?", (int((patch == 1).sum()), row[0])
        )


#: version -> function bringing a ledger from version - 1 to version (in one transaction).
MIGRATIONS = {2: _migrate_2}


def _statements(script: str) -> list[str]:
    """Split a DDL script into statements (trigger bodies keep their inner semicolons)."""
    out, current = [], []
    for line in script.strip().splitlines():
        current.append(line)
        text = "\n".join(current).strip()
        if text.endswith(";") and sqlite3.complete_statement(text):
            out.append(text)
            current = []
    return out


# ---------------------------------------------------------------------------------------------
# Small helpers


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _box(start: Sequence[int], stop: Sequence[int]) -> tuple[slice, slice, slice]:
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))  # type: ignore[return-value]


def _overlap(a0, a1, b0, b1) -> bool:
    return all(x0 < y1 and y0 < x1 for x0, x1, y0, y1 in zip(a0, a1, b0, b1, strict=True))


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


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a reused pid from the original)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


# ---------------------------------------------------------------------------------------------
# The lock


class _Lock:
    """An exclusive write lock: ``flock`` on ``PROJECT/lock`` + holder JSON (host, pid, since).

    The kernel drops an ``flock`` when its process dies, so a lock file whose ``flock`` can be
    taken belongs to a dead process: a stale lock, taken over (and reported).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.stale: dict[str, Any] | None = None

    def acquire(self) -> None:
        for _attempt in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise ProjectError(
                        f"cannot lock {self.path} ({exc.strerror}); the project's file system "
                        "must support file locks"
                    ) from exc
                holder = self.read()
                raise ProjectLocked(
                    f"project {self.path.parent} is open for writing by "
                    f"{holder.get('user', '?')}@{holder.get('host', '?')} (pid "
                    f"{holder.get('pid', '?')}) since {holder.get('since', '?')}; close it there "
                    "first, or open it read-only",
                    holder,
                ) from None
            # The file we locked must still be the one at the path (a closing holder unlinks it).
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read_json_fd(fd)
            if previous:
                self.stale = previous
            pid = os.getpid()
            holder = {
                "host": socket.gethostname(),
                "pid": pid,
                "user": getpass.getuser(),
                "since": _now(),
                "process_start": _process_start_time(pid),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            os.fsync(fd)
            self.fd = fd
            return
        raise ProjectError(f"could not take the lock {self.path}: it kept changing; try again")

    def read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _read_json_fd(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 65536, 0)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {"unreadable": True}


# ---------------------------------------------------------------------------------------------
# The project


class Project:
    """An open annotation project (see the module docstring and ``docs/project.md``).

    Open it with :meth:`create` or :meth:`open`; use it as a context manager or call
    :meth:`close`. Methods are thread-safe (one connection behind a lock), so a GUI may call
    them from worker threads.
    """

    def __init__(self, path: Path, db: sqlite3.Connection, lock: _Lock | None) -> None:
        self.path = path
        self._db = db
        self._lock = lock
        self._mutex = threading.RLock()
        self.readonly = lock is None
        self._closed = False
        self._round_handles: list[Any] = []  # running rounds.RoundHandle objects

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
        from napari_pvs.models.checkpoint import default_checkpoint_path, read_checkpoint

        folder = Path(folder).expanduser().absolute()
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            what = "a napari-pvs project" if (folder / MARKER).exists() else "files"
            raise FileExistsError(
                f"{folder} already holds {what}; choose a new or empty folder "
                "(open an existing project with Project.open / napari-pvs project status)"
            )
        if not 0 <= float(validation_fraction) <= 0.5:
            raise ValueError(
                f"validation_fraction must be between 0 and 0.5, got {validation_fraction}"
            )
        if int(validation_max) < 0:
            raise ValueError(f"validation_max must be >= 0, got {validation_max}")
        source = default_checkpoint_path() if str(model) == "default" else Path(model)
        _, meta = read_checkpoint(source)  # refuses a missing, corrupt or tampered checkpoint
        created = _now()
        with atomic.atomic_output(folder, overwrite=folder.exists()) as tmp:
            tmp.mkdir()
            for sub in ("volumes", "predictions", "models", "rounds", "exports", "journal"):
                (tmp / sub).mkdir()
            with atomic.atomic_output(tmp / "models" / "v0.safetensors") as ckpt:
                shutil.copyfile(source, ckpt)
            db = sqlite3.connect(str(tmp / LEDGER), isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.execute("BEGIN")
                for statement in _statements(SCHEMA_1) + _statements(MIGRATION_2):
                    db.execute(statement)
                meta_rows = {
                    "schema_version": SCHEMA_VERSION,
                    "created": created,
                    "seed": int(seed),
                    "validation_fraction": float(validation_fraction),
                    "validation_max": int(validation_max),
                    "current_version": 0,
                    "initial_model": str(model),
                }
                db.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [(k, json.dumps(v)) for k, v in meta_rows.items()],
                )
                db.execute(
                    "INSERT INTO model_versions VALUES (0, ?, NULL, ?, 'ready', ?, ?, NULL)",
                    (
                        "models/v0.safetensors",
                        created,
                        json.dumps(meta.get("metrics") or {}),
                        (meta.get("training") or {}).get("manifest_hash"),
                    ),
                )
                db.execute(
                    "INSERT INTO events(time, kind, detail) VALUES (?, 'create', ?)",
                    (created, json.dumps({"model": str(model), "seed": int(seed)})),
                )
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                db.execute("COMMIT")
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                db.close()
            atomic.write_text(
                tmp / MARKER, json.dumps({"format": MARKER_FORMAT, "created": created}, indent=1)
            )
        return cls.open(folder)

    @classmethod
    def open(cls, folder: str | os.PathLike, *, readonly: bool = False) -> Project:
        """Open an existing project; migrate an older ledger; repair an interrupted accept.

        Raises :class:`ProjectError` when ``folder`` is not a project or its ledger is damaged
        or newer than this napari-pvs, :class:`ProjectLocked` when another live process holds
        it for writing. A read-only project needs no lock and changes nothing.
        """
        folder = Path(folder).expanduser().absolute()
        if not folder.is_dir():
            raise FileNotFoundError(f"project folder {folder} does not exist")
        marker = folder / MARKER
        try:
            ok = json.loads(marker.read_text()).get("format") == MARKER_FORMAT
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise ProjectError(
                f"{folder} is not a napari-pvs project (no valid {MARKER}); create one with "
                "'napari-pvs project init'"
            )
        ledger = folder / LEDGER
        if not ledger.is_file():
            raise ProjectError(
                f"the ledger {ledger} is missing; restore it from a backup (napari-pvs never "
                "recreates a ledger over a project's data)"
            )
        lock = None
        if not readonly:
            lock = _Lock(folder / LOCK)
            lock.acquire()
        try:
            mode = "ro" if readonly else "rw"
            db = sqlite3.connect(
                f"file:{quote(str(ledger))}?mode={mode}",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
                timeout=30,
            )
            try:
                if not readonly:
                    db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                check = db.execute("PRAGMA quick_check").fetchone()[0]
                if check != "ok":
                    raise sqlite3.DatabaseError(check)
                version = int(db.execute("PRAGMA user_version").fetchone()[0])
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
            except sqlite3.DatabaseError as exc:
                db.close()
                raise ProjectError(
                    f"the ledger {ledger} is damaged ({exc}); restore it from a backup — it "
                    "was left exactly as found"
                ) from exc
            if "meta" not in tables or version < 1:
                db.close()
                raise ProjectError(f"{ledger} is not a napari-pvs ledger (no schema version)")
            if version > SCHEMA_VERSION:
                db.close()
                raise ProjectError(
                    f"{ledger} has schema version {version}, newer than this napari-pvs reads "
                    f"({SCHEMA_VERSION}); upgrade napari-pvs"
                )
            project = cls(folder, db, lock)
            if version < SCHEMA_VERSION:
                if readonly:
                    db.close()
                    raise ProjectError(
                        f"{ledger} has schema version {version} and must be migrated to "
                        f"{SCHEMA_VERSION}; open the project once for writing"
                    )
                project._migrate(version)
            if not readonly:
                if lock.stale:
                    project._event("stale-lock-taken-over", lock.stale)
                project._repair()
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return project

    def close(self) -> None:
        """Close the ledger and release the write lock; a round still running is cancelled
        (recorded as such) first."""
        for handle in list(self._round_handles):
            if handle.running:
                handle.stop()
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(sqlite3.Error):
                if not self.readonly:
                    self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._db.close()
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> Project:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Project({str(self.path)!r}{', readonly' if self.readonly else ''})"

    # -- ledger plumbing ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on any error)."""
        self._require_writable()
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._mutex:
            if self._closed:
                raise ProjectError(f"project {self.path} is closed; open it again")
            return self._db.execute(sql, params).fetchall()

    def _require_writable(self) -> None:
        if self._closed:
            raise ProjectError(f"project {self.path} is closed; open it again")
        if self.readonly:
            raise ProjectError(
                f"project {self.path} is open read-only; open it for writing to change it"
            )

    def _event(self, kind: str, detail: dict[str, Any], db: sqlite3.Connection | None = None):
        row = (_now(), kind, json.dumps(detail, default=str))
        if db is not None:
            db.execute("INSERT INTO events(time, kind, detail) VALUES (?, ?, ?)", row)
        else:
            with self._transaction() as tx:
                tx.execute("INSERT INTO events(time, kind, detail) VALUES (?, ?, ?)", row)

    def _meta(self, key: str, default: Any = None) -> Any:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default

    @staticmethod
    def _set_meta(db: sqlite3.Connection, key: str, value: Any) -> None:
        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    @property
    def schema_version(self) -> int:
        return int(self._query("PRAGMA user_version")[0][0])

    def _migrate(self, version: int) -> None:
        """Bring the ledger up to SCHEMA_VERSION, one step per transaction, after a backup."""
        backup = self.path / f"ledger.v{version}-backup.sqlite"
        if not backup.exists():
            with atomic.atomic_output(backup) as tmp:
                target = sqlite3.connect(str(tmp))
                with self._mutex:
                    self._db.backup(target)
                target.close()
        for step in range(version + 1, SCHEMA_VERSION + 1):
            with self._transaction() as db:
                MIGRATIONS[step](self, db)
                db.execute(f"PRAGMA user_version = {step}")
                self._set_meta(db, "schema_version", step)
                self._event("migrate", {"from": step - 1, "to": step, "backup": backup.name}, db)

    # -- repair on open -----------------------------------------------------------------------
    def _repair(self) -> None:
        """Finish what a killed process left half done; never touches acknowledged data."""
        journal = self.path / "journal"
        journal.mkdir(exist_ok=True)
        # 1. Accepts whose intent committed: write the journalled labels again, then commit.
        pending = self._query("SELECT token FROM pending_accepts ORDER BY rowid")
        for (token,) in pending:
            with contextlib.suppress(ProjectError):  # a lost journal is logged (accept-lost)
                self._finish_pending(token, repaired=True)
        # 2. Journal files without an intent row: their accept never got acknowledged.
        for item in journal.iterdir():
            item.unlink()
        # 3. Label stores: each live volume has one (created if missing and never annotated).
        for volume in self._volume_rows(include_removed=True):
            store = self._label_store_path(volume.id)
            if not store.is_dir():
                annotated = self._query(
                    "SELECT COUNT(*) FROM annotations WHERE volume_id = ?", (volume.id,)
                )[0][0]
                if annotated:
                    raise ProjectError(
                        f"the label store {store} of volume {volume.name!r} is missing but the "
                        f"ledger records {annotated} annotations in it; restore it from a backup"
                    )
                self._create_label_store(volume.id, volume.shape)
            for partial in store.rglob("*.partial"):
                partial.unlink()  # zarr's temporary chunk files of a killed write
        # 4. Rounds whose process died: failed; their unacknowledged files go.
        for (round_id,) in self._query("SELECT id FROM rounds WHERE status = 'running'"):
            self._finish_round(
                round_id,
                "failed",
                "interrupted: the process running this round ended before it finished; the "
                "previous version stays current",
            )
        self._remove_orphans()

    def _remove_orphans(self) -> None:
        """Checkpoints and predictions of versions the ledger does not hold as ready."""
        ready = {v.version for v in self.versions() if v.status == "ready"}
        running = {r.new_version for r in self.rounds() if r.status == "running"}
        keep = ready | running
        for item in (self.path / "models").glob("*"):
            number = _version_number(item.name, ".safetensors")
            if item.name.startswith(atomic.TEMP_MARK) or (
                number is not None and number not in keep
            ):
                _remove_path(item)
        for folder in (self.path / "predictions").glob("*"):
            for item in folder.glob("*"):
                number = _version_number(item.name, ".zarr")
                if item.name.startswith(atomic.TEMP_MARK) or (
                    number is not None and number not in keep
                ):
                    _remove_path(item)

    # -- volumes ------------------------------------------------------------------------------
    def _label_store_path(self, volume_id: int) -> Path:
        return self.path / "volumes" / str(volume_id) / "labels.zarr"

    def _create_label_store(self, volume_id: int, shape: Sequence[int]) -> Path:
        import zarr

        store = self._label_store_path(volume_id)
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

    def _resolve_volume_path(self, stored: str) -> Path:
        path = Path(stored)
        return path if path.is_absolute() else self.path / path

    def _record(self, row: tuple) -> VolumeRecord:
        return VolumeRecord(
            id=int(row[0]),
            name=row[1],
            path=self._resolve_volume_path(row[2]),
            fingerprint=row[3],
            modality=row[4],
            shape=tuple(json.loads(row[5])),
            spacing=tuple(json.loads(row[6])),
            added=row[7],
        )

    def _volume_rows(self, include_removed: bool = False) -> list[VolumeRecord]:
        where = "" if include_removed else "WHERE removed IS NULL"
        rows = self._query(
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

        self._require_writable()
        path = Path(path).expanduser().absolute()
        volume = open_volume(path, modality=modality)
        for existing in self._volume_rows():
            if existing.path.resolve() == path.resolve():
                raise ValueError(
                    f"{path} is already in the project as volume {existing.id} ({existing.name!r})"
                )
        base = name or _volume_stem(path)
        taken = {v.name for v in self._volume_rows(include_removed=True)}
        if name is not None and name in taken:
            raise ValueError(f"a volume named {name!r} is already in the project; pick another")
        unique = base
        for i in itertools.count(2):
            if unique not in taken:
                break
            unique = f"{base}-{i}"
        try:
            stored = str(path.resolve().relative_to(self.path.resolve()))
        except ValueError:
            stored = str(path.resolve())
        with self._transaction() as db:
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
                    _now(),
                ),
            )
            volume_id = int(cursor.lastrowid)
            self._event("add-volume", {"volume": volume_id, "name": unique, "path": stored}, db)
        # After the row commits: a crash before the store exists is repaired on open.
        self._create_label_store(volume_id, volume.shape)
        return self.volume(volume_id)

    def remove_volume(self, ref: int | str) -> None:
        """Take a volume out of the project (rows and labels are kept; it can be added again)."""
        record = self.volume(ref)
        with self._transaction() as db:
            db.execute("UPDATE volumes SET removed = ? WHERE id = ?", (_now(), record.id))
            db.execute(
                "UPDATE patches SET status = 'skipped' WHERE volume_id = ? AND status = 'new'",
                (record.id,),
            )
            self._event("remove-volume", {"volume": record.id, "name": record.name}, db)

    def volumes(self) -> list[VolumeRecord]:
        return self._volume_rows()

    def volume(self, ref: int | str | VolumeRecord) -> VolumeRecord:
        """A live volume by id or name; ValueError for an unknown or removed one."""
        if isinstance(ref, VolumeRecord):
            ref = ref.id
        column = "id" if isinstance(ref, int | np.integer) or str(ref).isdigit() else "name"
        value = int(ref) if column == "id" else str(ref)
        rows = self._query(
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
        names = ", ".join(f"{v.id} ({v.name})" for v in self._volume_rows()) or "none"
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
        return zarr.open_group(str(self._label_store_path(record.id)), mode="r")

    # -- annotations --------------------------------------------------------------------------
    def _split_for(self, volume_id: int, start, stop) -> str:
        """Train or validation, fixed at accept time by a seeded rule (see docs/project.md)."""
        rows = self._query(
            "SELECT split, z0, y0, x0, z1, y1, x1 FROM annotations WHERE volume_id = ?",
            (volume_id,),
        )
        overlapping = {r[0] for r in rows if _overlap(start, stop, r[1:4], r[4:7])}
        if "validation" in overlapping:
            return "validation"
        if "train" in overlapping:
            return "train"
        fraction = float(self._meta("validation_fraction", 0.25))
        limit = int(self._meta("validation_max", 8))
        if fraction <= 0 or limit <= 0:
            return "train"
        counts = dict(self._query("SELECT split, COUNT(*) FROM annotations GROUP BY split"))
        n_validation = int(counts.get("validation", 0))
        if n_validation >= limit:
            return "train"
        block = max(2, round(1 / fraction))
        k = sum(int(v) for v in counts.values())
        seed = int(self._meta("seed", 0))
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
        self._require_writable()
        record = self.volume(ref)
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
        if patch_id is not None:
            rows = self._query("SELECT volume_id FROM patches WHERE id = ?", (int(patch_id),))
            if not rows or rows[0][0] != record.id:
                raise ValueError(f"patch {patch_id} is not a queued patch of {record.name!r}")
        if model_version is None:
            model_version = self.current_version().version
        elif not self._query("SELECT 1 FROM model_versions WHERE version = ?", (model_version,)):
            raise ValueError(f"there is no model version {model_version} in the project")
        digest = _labels_digest(patch)
        with self._mutex:
            same = self._latest_identical(record.id, start, stop, digest)
            if same is not None:
                return same
            token = uuid.uuid4().hex
            buffer = _io.BytesIO()
            np.save(buffer, patch, allow_pickle=False)
            atomic.write_bytes(self.path / "journal" / f"{token}.npy", buffer.getvalue())
            with self._transaction() as db:
                db.execute(
                    f"INSERT INTO pending_accepts VALUES ({', '.join('?' * 15)})",
                    (
                        token,
                        record.id,
                        *start,
                        *stop,
                        str(annotator),
                        _now(),
                        model_version,
                        None if seconds is None else float(seconds),
                        None if patch_id is None else int(patch_id),
                        self._split_for(record.id, start, stop),
                        digest,
                    ),
                )
            return self._finish_pending(token, repaired=False)

    def _latest_identical(self, volume_id, start, stop, digest) -> Annotation | None:
        rows = self._query(
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
        row = self._query(
            "SELECT volume_id, z0, y0, x0, z1, y1, x1, annotator, created, model_version, "
            "seconds, patch_id, split, digest FROM pending_accepts WHERE token = ?",
            (token,),
        )[0]
        volume_id, start, stop = int(row[0]), tuple(row[1:4]), tuple(row[4:7])
        journal = self.path / "journal" / f"{token}.npy"
        try:
            patch = np.load(journal, allow_pickle=False)
            ok = patch.shape == tuple(b - a for a, b in zip(start, stop, strict=True))
            ok = ok and _labels_digest(patch) == row[13]
        except (OSError, ValueError):
            ok = False
        if not ok:  # the journal is written before its intent row, so this means tampering
            with self._transaction() as db:
                db.execute("DELETE FROM pending_accepts WHERE token = ?", (token,))
                self._event("accept-lost", {"token": token, "volume": volume_id}, db)
            raise ProjectError(
                f"the journal file {journal} of an interrupted accept is missing or damaged; "
                "that patch was not saved: accept it again"
            )
        self._write_labels(volume_id, start, stop, patch)
        with self._transaction() as db:
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
                db.execute("UPDATE patches SET status = 'reviewed' WHERE id = ?", (row[11],))
            db.execute("DELETE FROM pending_accepts WHERE token = ?", (token,))
            self._event(
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
        """Write labels + reviewed for the box, then fsync every chunk file and folder touched."""
        import zarr

        store = self._label_store_path(volume_id)
        group = zarr.open_group(str(store), mode="r+")
        box = _box(start, stop)
        group["labels"][box] = patch
        group["reviewed"][box] = np.ones(patch.shape, dtype=bool)
        for name in ("labels", "reviewed"):
            array = group[name]
            chunks = array.chunks
            ranges = [
                range(a // c, (b - 1) // c + 1) for a, b, c in zip(start, stop, chunks, strict=True)
            ]
            folders = set()
            for index in itertools.product(*ranges):
                key = store / name / array.metadata.encode_chunk_key(index)
                if key.exists():
                    atomic.fsync_path(key)
                folder = key.parent
                while folder != store:
                    folders.add(folder)
                    folder = folder.parent
            for folder in sorted(folders, key=lambda p: -len(p.parts)):
                atomic.fsync_folder(folder)

    def annotation(self, annotation_id: int) -> Annotation:
        rows = self._annotation_rows("WHERE id = ?", (int(annotation_id),))
        if not rows:
            raise ValueError(f"there is no annotation {annotation_id}")
        return rows[0]

    def _annotation_rows(self, where: str, params: Sequence[Any]) -> list[Annotation]:
        rows = self._query(
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
            params.append(self.volume(ref).id)
        if split is not None:
            if split not in SPLITS:
                raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
            clauses.append("split = ?")
            params.append(split)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        return self._annotation_rows(where, params)

    def skip(self, patch_id: int, *, annotator: str = "") -> None:
        """Mark a queued patch skipped (it will not be ranked again)."""
        rows = self._query("SELECT status FROM patches WHERE id = ?", (int(patch_id),))
        if not rows:
            raise ValueError(f"there is no queued patch {patch_id}")
        with self._transaction() as db:
            db.execute("UPDATE patches SET status = 'skipped' WHERE id = ?", (int(patch_id),))
            self._event("skip", {"patch": int(patch_id), "annotator": annotator}, db)

    # -- the queue ----------------------------------------------------------------------------
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
        record = self.volume(ref)
        shown = _now()

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
            self._event(
                "queue",
                {"volume": record.id, "patches": len(ids), "model_version": model_version,
                 "round": round, "strategy": ranked[0].strategy if ranked else None},
                tx,
            )  # fmt: skip
            return ids

        if db is not None:
            write(db)
        else:
            with self._transaction() as tx:
                write(tx)
        return self.queue(record.id, status="new")

    def queue(self, ref: int | str | None = None, status: str | None = None) -> list[PatchRecord]:
        """Queued patches (of one volume, of one status), by volume then rank."""
        clauses, params = [], []
        if ref is not None:
            clauses.append("volume_id = ?")
            params.append(self.volume(ref).id)
        if status is not None:
            if status not in PATCH_STATUSES:
                raise ValueError(f"status must be one of {PATCH_STATUSES}, got {status!r}")
            clauses.append("status = ?")
            params.append(status)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = self._query(
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

    # -- model versions -----------------------------------------------------------------------
    def _version_record(self, row: tuple) -> ModelVersion:
        return ModelVersion(
            version=int(row[0]),
            checkpoint=self.path / row[1],
            parent=row[2],
            created=row[3],
            status=row[4],
            metrics=json.loads(row[5] or "{}"),
            manifest_hash=row[6],
            round=row[7],
        )

    def versions(self) -> list[ModelVersion]:
        rows = self._query(
            "SELECT version, checkpoint, parent, created, status, metrics, manifest_hash, round "
            "FROM model_versions ORDER BY version"
        )
        return [self._version_record(r) for r in rows]

    def version(self, version: int | str) -> ModelVersion:
        number = _parse_version(version)
        for record in self.versions():
            if record.version == number:
                return record
        known = ", ".join(f"v{v.version}" for v in self.versions())
        raise ValueError(f"there is no model version v{number}; versions: {known}")

    def current_version(self) -> ModelVersion:
        return self.version(int(self._meta("current_version", 0)))

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
        with self._transaction() as db:
            self._set_meta(db, "current_version", record.version)
            self._event("rollback", {"from": previous, "to": record.version}, db)

    def compare(self, versions: Iterable[int | str] | None = None) -> list[dict[str, Any]]:
        """Versions' metrics side by side (one dict per version)."""
        chosen = self.versions() if versions is None else [self.version(v) for v in versions]
        current = self.current_version().version
        return [
            {
                "version": v.version,
                "parent": v.parent,
                "round": v.round,
                "status": v.status,
                "current": v.version == current,
                "created": v.created,
                **v.metrics,
            }
            for v in chosen
        ]

    # -- predictions and ranking --------------------------------------------------------------
    def prediction_path(self, ref: int | str, version: int | str | None = None) -> Path:
        record = self.volume(ref)
        number = self.current_version().version if version is None else _parse_version(version)
        return self.path / "predictions" / str(record.id) / f"v{number}.zarr"

    def predictor_options(self, **overrides) -> dict[str, Any]:
        """Predictor settings every project prediction uses (settings, then ``overrides``)."""
        settings = self.settings()
        options = {
            "tta": int(settings["predict_tta"]),
            "mc_samples": int(settings["predict_mc"]),
            "device": settings["device"],
        }
        options.update({k: v for k, v in overrides.items() if v is not None})
        return options

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
        self._require_writable()
        record = self.volume(ref)
        number = self.current_version().version if version is None else _parse_version(version)
        out = self.prediction_path(record.id, number)
        if self.has_prediction(record.id, number):
            return out  # (before torch is imported: showing a stored prediction needs none)
        from napari_pvs.inference import Predictor
        out.parent.mkdir(parents=True, exist_ok=True)
        options = self.predictor_options(**predictor_options)
        if model is None:
            model, _ = self.load_model(number, device="cpu")
        predictor = Predictor(model, modality=record.modality, **options)
        predictor.predict(self.open_volume(record.id), out, progress=progress, cancel=cancel)
        atomic.fsync_path(out)
        return out

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
        from napari_pvs.ranking import rank_patches

        record = self.volume(ref)
        settings = self.settings()
        number = self.current_version().version if version is None else _parse_version(version)
        path = self.predict(record.id, version=number, progress=progress, cancel=cancel)
        ranked = rank_patches(
            path,
            n=int(n or settings["n"]),
            patch=int(patch or settings["patch"]),
            strategy=strategy or settings["strategy"],
            exclude=self.labels(record.id)["labels"],
            unlabelled_value=UNREVIEWED,
            exclude_boxes=self.excluded_boxes(record.id),
            seed=seed,
            image=self.open_volume(record.id),
        )
        return self.record_queue(record.id, ranked, model_version=number)

    # -- rounds (rows only; the work is napari_pvs.rounds) -------------------------------------
    def rounds(self) -> list[RoundRecord]:
        rows = self._query(
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

    def _begin_round(self, config: dict[str, Any]) -> RoundRecord:
        """Freeze the round's annotation set and allocate its version number (one transaction).

        Refused while another round is running.
        """
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM rounds WHERE status = 'running'").fetchone():
                raise ValueError("a round is already running in this project; wait or cancel it")
            ids = [r[0] for r in db.execute("SELECT id FROM annotations ORDER BY id")]
            newest = db.execute(
                "SELECT MAX(m) FROM (SELECT MAX(version) AS m FROM model_versions "
                "UNION ALL SELECT MAX(new_version) FROM rounds)"
            ).fetchone()[0]
            base = int(json.loads(
                db.execute("SELECT value FROM meta WHERE key = 'current_version'").fetchone()[0]
            ))  # fmt: skip
            cursor = db.execute(
                "INSERT INTO rounds(started, status, base_version, new_version, config, "
                "snapshot_annotation_ids) VALUES (?, 'running', ?, ?, ?, ?)",
                (_now(), base, int(newest or 0) + 1, json.dumps(config), json.dumps(ids)),
            )
            round_id = int(cursor.lastrowid)
            self._event(
                "round-start",
                {"round": round_id, "base_version": base, "annotations": len(ids)},
                db,
            )
        return self.round(round_id)

    def _commit_round(
        self,
        round_id: int,
        *,
        metrics: dict[str, Any],
        manifest_hash: str,
        queues: dict[int, list[Any]],
        strategy: str | None = None,
    ) -> ModelVersion:
        """Make the round's checkpoint a ready version, current, with its new queues."""
        from napari_pvs.models.checkpoint import read_checkpoint

        info = self.round(round_id)
        number = int(info.new_version)
        checkpoint = self.path / "models" / f"v{number}.safetensors"
        read_checkpoint(checkpoint)  # verified before it can become current
        atomic.fsync_path(checkpoint)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO model_versions VALUES (?, ?, ?, ?, 'ready', ?, ?, ?)",
                (
                    number,
                    f"models/v{number}.safetensors",
                    info.base_version,
                    _now(),
                    json.dumps(metrics, default=float),
                    manifest_hash,
                    round_id,
                ),
            )
            self._set_meta(db, "current_version", number)
            for volume_id, ranked in queues.items():
                self.record_queue(volume_id, ranked, model_version=number, round=round_id, db=db)
            db.execute(
                "UPDATE rounds SET status = 'done', finished = ?, message = ? WHERE id = ?",
                (_now(), f"v{number} is current", round_id),
            )
            self._event(
                "round-done", {"round": round_id, "version": number, "metrics": metrics}, db
            )
        return self.version(number)

    def _finish_round(self, round_id: int, status: str, message: str) -> None:
        """Mark a round failed or cancelled; the current version stays as it was."""
        with self._transaction() as db:
            db.execute(
                "UPDATE rounds SET status = ?, finished = ?, message = ? WHERE id = ? "
                "AND status = 'running'",
                (status, _now(), message, int(round_id)),
            )
            self._event(f"round-{status}", {"round": int(round_id), "message": message}, db)
        self._remove_orphans()

    def stop_hint(self, patience: int | None = None) -> str | None:
        """A sentence when the last ``patience`` rounds did not improve validation Dice.

        Each round scores its base and its new model on the same validation patches (the set
        may grow between rounds), so its gain is ``validation_dice - base_validation_dice``;
        a gain under :data:`STOP_MIN_GAIN` is no improvement. None while rounds still pay.
        """
        patience = int(patience or self.settings()["stop_patience"])
        gains = []
        for version in self.versions():
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

    # -- settings, events, status -------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        stored = {
            key.removeprefix("setting."): json.loads(value)
            for key, value in self._query("SELECT key, value FROM meta WHERE key LIKE 'setting.%'")
        }
        return {**DEFAULT_SETTINGS, **stored}

    def update_settings(self, **values: Any) -> dict[str, Any]:
        """Persist settings (known ones are checked; others are kept for the GUI as given)."""
        from napari_pvs.models import FLIP_COUNTS
        from napari_pvs.ranking import STRATEGIES

        checks = {
            "strategy": lambda v: v in STRATEGIES,
            "n": lambda v: isinstance(v, int) and v >= 1,
            "patch": lambda v: isinstance(v, int) and v >= 8,
            "predict_tta": lambda v: v in FLIP_COUNTS,
            "predict_mc": lambda v: isinstance(v, int) and v >= 0,
            "device": lambda v: isinstance(v, str) and bool(v),
            "brush_size": lambda v: isinstance(v, int) and v >= 1,
            "stop_patience": lambda v: isinstance(v, int) and v >= 1,
        }
        for key, value in values.items():
            if key in checks and not checks[key](value):
                raise ValueError(f"setting {key}={value!r} is not valid")
            json.dumps(value)
        with self._transaction() as db:
            for key, value in values.items():
                self._set_meta(db, f"setting.{key}", value)
            self._event("settings", values, db)
        return self.settings()

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if kind is None:
            rows = self._query("SELECT id, time, kind, detail FROM events ORDER BY id")
        else:
            rows = self._query(
                "SELECT id, time, kind, detail FROM events WHERE kind = ? ORDER BY id", (kind,)
            )
        return [{"id": r[0], "time": r[1], "kind": r[2], **json.loads(r[3])} for r in rows]

    def status(self) -> dict[str, Any]:
        """Volumes, reviewed patches, versions with metrics, the current one, rounds."""
        volumes = []
        for v in self.volumes():
            annotations = self.annotations(v.id)
            queue = self.queue(v.id)
            volumes.append(
                {
                    "id": v.id,
                    "name": v.name,
                    "path": str(v.path),
                    "shape": list(v.shape),
                    "modality": v.modality,
                    "annotations": len(annotations),
                    "validation": sum(a.split == "validation" for a in annotations),
                    "pvs_voxels": sum(a.pvs_voxels or 0 for a in annotations),
                    "queue_new": sum(p.status == "new" for p in queue),
                    "skipped": sum(p.status == "skipped" for p in queue),
                    "predicted_versions": sorted(
                        n
                        for n in (
                            _version_number(p.name, ".zarr")
                            for p in (self.path / "predictions" / str(v.id)).glob("v*.zarr")
                        )
                        if n is not None
                    ),
                }
            )
        return {
            "path": str(self.path),
            "schema_version": self.schema_version,
            "volumes": volumes,
            "versions": self.compare(),
            "current_version": self.current_version().version,
            "rounds": [
                {
                    "id": r.id,
                    "status": r.status,
                    "base_version": r.base_version,
                    "new_version": r.new_version,
                    "annotations": len(r.snapshot_annotation_ids),
                    "message": r.message,
                }
                for r in self.rounds()
            ],
            "stop_hint": self.stop_hint(),
        }

    # -- the PVS burden -----------------------------------------------------------------------
    def region_map(self, ref: int | str):
        """The volume's region map (OME-Zarr ``labels/regions``, e.g. a phantom's), or None."""
        from napari_pvs.io import open_labels

        volume = self.open_volume(ref)
        if "regions" in getattr(volume, "label_names", ()):
            return open_labels(self.volume(ref).path, "regions").data
        return None

    def burden(
        self,
        ref: int | str | None = None,
        version: int | str | None = None,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> list[dict[str, Any]]:
        """PVS count and volume (mm³) per region per volume, from a version's segmentation.

        Clusters are 26-connected; a cluster counts in the region holding most of its voxels.
        Regions come from the volume's region map when it has one (names from
        ``phantom.REGION_NAMES``), and a ``whole`` row always sums the volume. Predicts first
        where the version has no prediction yet.
        """
        import zarr

        from napari_pvs.metrics import label_clusters
        from napari_pvs.phantom import REGION_NAMES

        records = [self.volume(ref)] if ref is not None else self.volumes()
        number = self.current_version().version if version is None else _parse_version(version)
        rows = []
        for record in records:
            path = (
                self.prediction_path(record.id, number)
                if self.readonly
                else self.predict(record.id, version=number, progress=progress, cancel=cancel)
            )
            if not self.has_prediction(record.id, number):
                raise ValueError(
                    f"volume {record.name!r} has no prediction of v{number}; open the project "
                    "for writing to predict it"
                )
            mask = np.asarray(zarr.open_group(str(path), mode="r")["segmentation"][:]) > 0
            clusters, n = label_clusters(mask)
            voxel_mm3 = float(np.prod(record.spacing))
            sizes = np.bincount(clusters.ravel(), minlength=n + 1)
            base = {"volume": record.name, "volume_id": record.id, "model_version": number}
            rows.append(
                {**base, "region": "whole", "region_id": 0, "count": int(n),
                 "volume_mm3": round(float(sizes[1:].sum()) * voxel_mm3, 3)}
            )  # fmt: skip
            regions = self.region_map(record.id)
            if regions is not None and n:
                regions = np.asarray(regions).astype(np.int64)
                table = np.bincount(
                    clusters[mask].astype(np.int64) * (int(regions.max()) + 1) + regions[mask],
                    minlength=(n + 1) * (int(regions.max()) + 1),
                ).reshape(n + 1, -1)
                home = table.argmax(axis=1)[1:]
                for region_id in sorted(set(int(r) for r in np.unique(regions)) - {0}):
                    inside = home == region_id
                    rows.append(
                        {**base, "region": REGION_NAMES.get(region_id, f"region {region_id}"),
                         "region_id": region_id, "count": int(inside.sum()),
                         "volume_mm3": round(float(sizes[1:][inside].sum()) * voxel_mm3, 3)}
                    )  # fmt: skip
        return rows

    # -- export -------------------------------------------------------------------------------
    def export(
        self,
        out: str | os.PathLike | None = None,
        *,
        format: str = "nifti",
        overwrite: bool = False,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> dict[str, Any]:
        """Write every volume's labels and current segmentation, a PVS burden table and the
        annotation provenance into ``out`` (default ``exports/v<N>``), built under a temporary
        name and renamed.

        ``format`` ``nifti``: ``<name>_labels.nii.gz`` (0/1, 255 = not reviewed),
        ``<name>_pvs.nii.gz`` (the current model's segmentation) and ``<name>_corrected.nii.gz``
        (that segmentation with every reviewed patch replaced by its accepted labels: the
        researcher's best PVS map) with the volume's affine; ``ome-zarr``: ``<name>.ome.zarr``,
        the image with ``labels/annotations``, ``labels/pvs`` and ``labels/corrected``. Always
        ``burden.csv`` and ``annotations.csv``. Returns ``{"folder", "files", "burden"}``.
        """
        import csv

        import zarr

        from napari_pvs.io import save_nifti, save_ome_zarr

        if format not in ("nifti", "ome-zarr"):
            raise ValueError(f"format must be 'nifti' or 'ome-zarr', got {format!r}")
        number = self.current_version().version
        out = Path(out) if out is not None else self.path / "exports" / f"v{number}"
        if out.parent == self.path / "exports":
            out.parent.mkdir(exist_ok=True)
        inputs = [v.path for v in self.volumes()] + [self.path / LEDGER]
        atomic.check_output(out, inputs=inputs, overwrite=overwrite)
        rows = self.burden(version=number, progress=progress, cancel=cancel)
        files = []
        with atomic.atomic_output(out, inputs=inputs, overwrite=overwrite) as tmp:
            tmp.mkdir()
            for record in self.volumes():
                volume = self.open_volume(record.id)
                labels = self.labels(record.id)["labels"][:]
                segmentation = zarr.open_group(
                    str(self.prediction_path(record.id, number)), mode="r"
                )["segmentation"][:]
                corrected = corrected_segmentation(labels, segmentation)
                if format == "nifti":
                    names = [f"{record.name}_{kind}.nii.gz" for kind in EXPORT_KINDS]
                    for name, data in zip(names, (labels, segmentation, corrected), strict=True):
                        save_nifti(tmp / name, data, volume.affine)
                else:
                    names = [f"{record.name}.ome.zarr"]
                    save_ome_zarr(
                        tmp / names[0],
                        volume.data,
                        volume.spacing,
                        labels={
                            "annotations": labels,
                            "pvs": segmentation,
                            "corrected": corrected,
                        },
                        modality=volume.modality,
                        axes=volume.axes,
                        affine=volume.affine,
                        cancel=cancel,
                    )
                files += names
            columns = ["volume", "volume_id", "model_version", "region", "region_id", "count",
                       "volume_mm3"]  # fmt: skip
            with open(tmp / "burden.csv", "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
            names = {v.id: v.name for v in self._volume_rows(include_removed=True)}
            with open(tmp / "annotations.csv", "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(
                    ["id", "volume", "z0", "y0", "x0", "z1", "y1", "x1", "annotator", "created",
                     "model_version", "seconds", "empty", "split", "pvs_voxels"]
                )  # fmt: skip
                for a in self.annotations():
                    writer.writerow(
                        [a.id, names.get(a.volume_id), *a.start, *a.stop, a.annotator, a.created,
                         a.model_version, a.seconds, int(a.empty), a.split, a.pvs_voxels]
                    )  # fmt: skip
            files += ["burden.csv", "annotations.csv"]
        self._event("export", {"folder": str(out), "format": format, "version": number})
        return {"folder": out, "files": [out / f for f in files], "burden": rows}


# ---------------------------------------------------------------------------------------------


#: The label images an export writes per volume: accepted labels, model, both merged.
EXPORT_KINDS = ("labels", "pvs", "corrected")


def corrected_segmentation(labels: np.ndarray, segmentation: np.ndarray) -> np.ndarray:
    """The model's segmentation where nothing was reviewed, the accepted labels where it was
    (0/1 everywhere: a reviewed voxel the annotator cleared is background, not the model's)."""
    reviewed = labels != UNREVIEWED
    return np.where(reviewed, labels, segmentation > 0).astype(np.uint8)


def _parse_version(version: int | str) -> int:
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

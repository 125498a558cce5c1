"""The ledger: ``ledger.sqlite`` (WAL, ``synchronous=FULL``) opened, checked and migrated.

One connection behind a re-entrant lock, shared by every part of the project: write
transactions, reads, the ``meta`` table and the append-only event log. Each part runs SQL only
on its own tables and goes through the owning part for the others.
"""

from __future__ import annotations

import contextlib
import errno
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from napari_pvs import atomic
from napari_pvs.project.layout import LEDGER, LOCK, MARKER, MARKER_FORMAT
from napari_pvs.project.lock import WriteLock
from napari_pvs.project.records import ProjectError, now
from napari_pvs.project.schema import (
    MIGRATION_SCRIPTS,
    MIGRATIONS,
    SCHEMA_1,
    SCHEMA_VERSION,
    statements,
)


class Ledger:
    """The open ledger of the project in ``folder`` (read-only when it holds no write lock)."""

    def __init__(self, folder: Path, db: sqlite3.Connection, lock: WriteLock | None) -> None:
        self.folder = folder
        self._db = db
        self._lock = lock
        self.mutex = threading.RLock()
        self.readonly = lock is None
        self.closed = False

    @classmethod
    def open(cls, folder: Path, *, readonly: bool = False) -> Ledger:
        """Check the folder is a project, take the write lock, open and check the ledger, and
        migrate an older one (see :meth:`Project.open <napari_pvs.project.Project.open>`)."""
        ledger = _check_project_folder(folder)
        lock = None
        if not readonly:
            lock = WriteLock(folder / LOCK)
            lock.acquire()
        try:
            db, version = _connect(ledger, readonly)
            opened = cls(folder, db, lock)
            if version < SCHEMA_VERSION:
                if readonly:
                    db.close()
                    raise ProjectError(
                        f"{ledger} has schema version {version} and must be migrated to "
                        f"{SCHEMA_VERSION}; open the project once for writing"
                    )
                opened.migrate(version)
            if not readonly and lock.stale:
                opened.event("stale-lock-taken-over", lock.stale)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return opened

    def close(self) -> None:
        """Close the connection and release the write lock (once)."""
        with self.mutex:
            if self.closed:
                return
            self.closed = True
            with contextlib.suppress(sqlite3.Error):
                if not self.readonly:
                    self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._db.close()
            self.release_lock()

    def release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()

    # -- transactions and reads ---------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on any error)."""
        self.require_writable()
        with self.mutex, self._disk_errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _disk_errors(self) -> Iterator[None]:
        """SQLite's 'readonly database' / 'disk is full' as one sentence naming the ledger
        file (never reported as damage)."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            message = atomic.os_error_message(exc, self.folder / LEDGER)
            if message is None:
                raise
            code = errno.ENOSPC if "full" in str(exc).lower() else errno.EROFS
            raise atomic.OutputError(code, message) from exc

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self.mutex:
            if self.closed:
                raise ProjectError(f"project {self.folder} is closed; open it again")
            return self._db.execute(sql, params).fetchall()

    def require_writable(self) -> None:
        if self.closed:
            raise ProjectError(f"project {self.folder} is closed; open it again")
        if self.readonly:
            raise ProjectError(
                f"project {self.folder} is open read-only; open it for writing to change it"
            )

    @property
    def schema_version(self) -> int:
        return int(self.query("PRAGMA user_version")[0][0])

    # -- events and meta ----------------------------------------------------------------------
    def event(self, kind: str, detail: dict[str, Any], db: sqlite3.Connection | None = None):
        """Append to the event log, in the transaction ``db`` or in one of its own."""
        row = (now(), kind, json.dumps(detail, default=str))
        if db is not None:
            db.execute("INSERT INTO events(time, kind, detail) VALUES (?, ?, ?)", row)
        else:
            with self.transaction() as tx:
                tx.execute("INSERT INTO events(time, kind, detail) VALUES (?, ?, ?)", row)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if kind is None:
            rows = self.query("SELECT id, time, kind, detail FROM events ORDER BY id")
        else:
            rows = self.query(
                "SELECT id, time, kind, detail FROM events WHERE kind = ? ORDER BY id", (kind,)
            )
        return [{"id": r[0], "time": r[1], "kind": r[2], **json.loads(r[3])} for r in rows]

    def last_event_id(self) -> int:
        """The newest event's id: every change to the ledger or the labels appends one, so a
        different value means something changed since it was read."""
        return int(self.query("SELECT MAX(id) FROM events")[0][0] or 0)

    def meta(self, key: str, default: Any = None) -> Any:
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def meta_with_prefix(self, prefix: str) -> dict[str, Any]:
        """The meta values whose key starts with ``prefix``, by the rest of the key."""
        return {
            key.removeprefix(prefix): json.loads(value)
            for key, value in self.query(
                "SELECT key, value FROM meta WHERE key LIKE ?", (f"{prefix}%",)
            )
        }

    @staticmethod
    def set_meta(db: sqlite3.Connection, key: str, value: Any) -> None:
        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    # -- migrations ---------------------------------------------------------------------------
    def migrate(self, version: int) -> None:
        """Bring the ledger up to SCHEMA_VERSION, one step per transaction, after a backup."""
        backup = self.folder / f"ledger.v{version}-backup.sqlite"
        if not backup.exists():
            with atomic.atomic_output(backup) as tmp:
                target = sqlite3.connect(str(tmp))
                with self.mutex:
                    self._db.backup(target)
                target.close()
        for step in range(version + 1, SCHEMA_VERSION + 1):
            with self.transaction() as db:
                MIGRATIONS[step](self.folder, db)
                db.execute(f"PRAGMA user_version = {step}")
                self.set_meta(db, "schema_version", step)
                self.event("migrate", {"from": step - 1, "to": step, "backup": backup.name}, db)


def create_ledger(
    path: Path,
    meta: dict[str, Any],
    *,
    created: str,
    detail: dict[str, Any],
    initial_rows: Callable[[sqlite3.Connection], None],
) -> None:
    """Write a new ledger: the schema, ``meta``, what ``initial_rows`` inserts and the
    ``create`` event (with ``detail``), in one transaction."""
    db = sqlite3.connect(str(path), isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN")
        for statement in [
            s for script in (SCHEMA_1, *MIGRATION_SCRIPTS) for s in statements(script)
        ]:
            db.execute(statement)
        db.executemany(
            "INSERT INTO meta VALUES (?, ?)",
            [(k, json.dumps(v)) for k, v in meta.items()],
        )
        initial_rows(db)
        db.execute(
            "INSERT INTO events(time, kind, detail) VALUES (?, 'create', ?)",
            (created, json.dumps(detail)),
        )
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


def _check_project_folder(folder: Path) -> Path:
    """The ledger path of the project ``folder``, or the error saying why it is none."""
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
    return ledger


def _connect(ledger: Path, readonly: bool) -> tuple[sqlite3.Connection, int]:
    """The checked connection and its schema version; a damaged, foreign or too-new ledger is
    refused (and left exactly as found)."""
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
    return db, version

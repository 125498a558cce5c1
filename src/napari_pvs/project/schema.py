"""The ledger's SQLite schema and the migrations that bring older ledgers up to it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from napari_pvs.project.layout import label_store_path

#: The ledger schema this code writes; older ledgers are migrated on open (see MIGRATIONS).
SCHEMA_VERSION = 3

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


def _migrate_2(folder: Path, db: sqlite3.Connection) -> None:
    for statement in statements(MIGRATION_2):
        db.execute(statement)
    # Old annotations get their PVS voxel count from the label store as it stands now.
    rows = db.execute("SELECT id, volume_id, z0, y0, x0, z1, y1, x1 FROM annotations").fetchall()
    for row in rows:
        store = label_store_path(folder, row[1])
        if not store.is_dir():
            continue
        import zarr

        labels = zarr.open_group(str(store), mode="r")["labels"]
        patch = np.asarray(labels[row[2] : row[5], row[3] : row[6], row[4] : row[7]])
        db.execute(
            "UPDATE annotations SET pvs_voxels = ? WHERE id = ?", (int((patch == 1).sum()), row[0])
        )


#: Schema 2 -> 3: yes/no review of predicted clusters. ``candidates`` (each cluster a version's
#: prediction proposed, with its box and its voxels as a bit mask over the box), ``answers``
#: (each yes/no/skip, with the bit mask of the label voxels it wrote, so undo restores exactly
#: those) and ``pending_answers`` (the answer journal: intent rows holding the voxels and the
#: value to write, finished on the next open after a crash).
MIGRATION_3 = f"""
CREATE TABLE candidates(id INTEGER PRIMARY KEY AUTOINCREMENT,
  volume_id INTEGER NOT NULL REFERENCES volumes(id), model_version INTEGER NOT NULL, {_BOX},
  seed_z INTEGER NOT NULL, seed_y INTEGER NOT NULL, seed_x INTEGER NOT NULL,
  centre_z REAL NOT NULL, centre_y REAL NOT NULL, centre_x REAL NOT NULL,
  voxels INTEGER NOT NULL, volume_mm3 REAL NOT NULL, mean_probability REAL NOT NULL,
  uncertainty REAL NOT NULL, score REAL NOT NULL, rank INTEGER NOT NULL, status TEXT NOT NULL,
  created TEXT NOT NULL, mask BLOB NOT NULL, annotation_id INTEGER);
CREATE TABLE answers(id INTEGER PRIMARY KEY AUTOINCREMENT,
  candidate_id INTEGER NOT NULL REFERENCES candidates(id),
  volume_id INTEGER NOT NULL REFERENCES volumes(id), answer TEXT NOT NULL,
  annotator TEXT NOT NULL, created TEXT NOT NULL, model_version INTEGER, seconds REAL,
  split TEXT NOT NULL, {_BOX}, voxels_written INTEGER NOT NULL, written BLOB NOT NULL,
  undone TEXT, undone_by TEXT);
CREATE TABLE pending_answers(token TEXT PRIMARY KEY, kind TEXT NOT NULL,
  candidate_id INTEGER NOT NULL REFERENCES candidates(id), answer_id INTEGER,
  answer TEXT NOT NULL, annotator TEXT NOT NULL, created TEXT NOT NULL, seconds REAL,
  split TEXT NOT NULL, value INTEGER NOT NULL, reviewed INTEGER NOT NULL, mask BLOB NOT NULL);
CREATE INDEX candidates_volume ON candidates(volume_id, status, rank);
CREATE INDEX answers_candidate ON answers(candidate_id);
CREATE INDEX answers_volume ON answers(volume_id);
"""


def _migrate_3(folder: Path, db: sqlite3.Connection) -> None:
    for statement in statements(MIGRATION_3):
        db.execute(statement)


#: version -> function bringing a ledger from version - 1 to version (in one transaction).
MIGRATIONS = {2: _migrate_2, 3: _migrate_3}

#: Every statement after schema 1, in order: what a new ledger runs after ``SCHEMA_1``.
MIGRATION_SCRIPTS = (MIGRATION_2, MIGRATION_3)


def statements(script: str) -> list[str]:
    """Split a DDL script into statements (trigger bodies keep their inner semicolons)."""
    out, current = [], []
    for line in script.strip().splitlines():
        current.append(line)
        text = "\n".join(current).strip()
        if text.endswith(";") and sqlite3.complete_statement(text):
            out.append(text)
            current = []
    return out

"""The annotation project: ledger round trip, migration, durability under SIGKILL, the lock,
refused annotations, validation assignment and the queue."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_pvs.io import save_ome_zarr
from napari_pvs.phantom import make_phantom
from napari_pvs.project import (
    SCHEMA_1,
    SCHEMA_VERSION,
    UNREVIEWED,
    Project,
    ProjectError,
    ProjectLocked,
)
from napari_pvs.project.schema import statements
from tiny_models import tiny_checkpoint

SHAPE = (32, 48, 40)
FIXTURES = Path(__file__).parent / "fixtures"
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(SHAPE, spacing=(1.0, 1.0, 1.0), modality="T2", seed=3, severity=1.0)


def build_assets(root: Path, phantom) -> dict[str, Path]:
    """A tiny phantom volume (OME-Zarr with labels/pvs and labels/regions) and a tiny model."""
    volume = root / "vol.zarr"
    save_ome_zarr(
        volume,
        phantom.image,
        phantom.spacing,
        labels={"pvs": phantom.pvs, "regions": phantom.regions},
        modality="T2",
        levels=1,
        chunks=32,
    )
    return {"volume": volume, "model": tiny_checkpoint(root / "tiny.safetensors")}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, phantom):
    return build_assets(tmp_path_factory.mktemp("assets"), phantom)


@pytest.fixture
def project(tmp_path, assets):
    with Project.create(tmp_path / "proj", model=assets["model"], seed=5) as proj:
        proj.add_volume(assets["volume"])
        yield proj


def store_digest(path: Path) -> str:
    """A digest of every file under a folder (names and bytes)."""
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(item.relative_to(path)).encode())
        digest.update(item.read_bytes())
    return digest.hexdigest()


def run_child(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


# ---------------------------------------------------------------------------------------------


def test_ledger_round_trip(tmp_path, assets, phantom):
    folder = tmp_path / "proj"
    with Project.create(folder, model=assets["model"], seed=5) as proj:
        volume = proj.add_volume(assets["volume"])
        assert volume.shape == SHAPE and volume.modality == "T2"
        pvs = phantom.pvs[8:24, 24:40, 16:32]
        first = proj.accept(
            volume.id, (8, 24, 16), (24, 40, 32), pvs, annotator="ada", seconds=41.5
        )
        empty = proj.accept(
            "vol", (0, 0, 0), (16, 16, 16), np.zeros((16, 16, 16), np.uint8), annotator="bo"
        )
        proj.update_settings(strategy="entropy", brush_size=2, my_gui_option=[1, 2])
    with Project.open(folder, readonly=True) as proj:
        assert proj.schema_version == SCHEMA_VERSION
        (record,) = proj.volumes()
        assert record.path == assets["volume"] and record.fingerprint == volume.fingerprint
        a, b = proj.annotations()
        assert (a.id, a.start, a.stop, a.annotator, a.seconds) == (
            first.id, (8, 24, 16), (24, 40, 32), "ada", 41.5
        )  # fmt: skip
        assert a.pvs_voxels == int(pvs.sum()) > 0 and not a.empty and a.model_version == 0
        assert b.empty and b.pvs_voxels == 0 and b.id == empty.id and b.annotator == "bo"
        store = proj.labels(record.id)
        labels, reviewed = store["labels"][:], store["reviewed"][:]
        expected = np.full(SHAPE, UNREVIEWED, np.uint8)
        expected[8:24, 24:40, 16:32] = pvs
        expected[0:16, 0:16, 0:16] = 0
        np.testing.assert_array_equal(labels, expected)
        np.testing.assert_array_equal(reviewed, expected != UNREVIEWED)
        settings = proj.settings()
        assert settings["strategy"] == "entropy" and settings["brush_size"] == 2
        assert settings["my_gui_option"] == [1, 2] and settings["patch"] == 32
        kinds = [e["kind"] for e in proj.events()]
        assert kinds == ["create", "add-volume", "accept", "accept", "settings"]
        assert proj.current_version().version == 0
        with pytest.raises(ProjectError, match="read-only"):
            proj.accept(1, (0, 0, 0), (1, 1, 1), np.zeros((1, 1, 1)))


def test_event_log_is_append_only(project):
    project.update_settings(n=5)
    with (
        pytest.raises(sqlite3.IntegrityError, match="append-only"),
        project._transaction() as db,
    ):
        db.execute("DELETE FROM events")
    assert len(project.events()) == 3


def test_create_refuses_existing_folder_and_bad_model(tmp_path, assets):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "data.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already holds files"):
        Project.create(tmp_path / "full", model=assets["model"])
    assert (tmp_path / "full" / "data.txt").read_text() == "mine"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        Project.create(tmp_path / "new", model=bad)
    assert not (tmp_path / "new").exists()


def test_migration_from_schema_1_fixture(tmp_path, assets, phantom):
    """A ledger of the first schema opens migrated, rows intact, with a backup beside it."""
    folder = tmp_path / "old"
    (folder / "models").mkdir(parents=True)
    (folder / "data").mkdir()
    (folder / "napari-pvs-project.json").write_text(
        json.dumps({"format": "napari-pvs-project", "created": "2025-03-01T09:00:00Z"})
    )
    fixture = (FIXTURES / "ledger_v1.sql").read_text()
    db = sqlite3.connect(folder / "ledger.sqlite")
    db.executescript(fixture)
    db.close()
    tiny_checkpoint(folder / "models" / "v0.safetensors")
    save_ome_zarr(folder / "data" / "vol.zarr", phantom.image, (1.0, 1.0, 1.0), modality="T2")
    store = zarr.open_group(str(folder / "volumes" / "1" / "labels.zarr"), mode="w")
    labels = store.create_array("labels", shape=SHAPE, chunks=(32,) * 3, dtype="uint8",
                                fill_value=255)  # fmt: skip
    reviewed = store.create_array("reviewed", shape=SHAPE, chunks=(32,) * 3, dtype="bool")
    marked = np.zeros((16, 16, 16), np.uint8)
    marked[2:6, 3, 3] = 1
    labels[0:16, 0:16, 0:16] = marked
    labels[16:32, 0:16, 0:16] = 0
    reviewed[0:32, 0:16, 0:16] = True
    before = sqlite3.connect(folder / "ledger.sqlite").execute("SELECT * FROM annotations")

    old_rows = before.fetchall()
    with pytest.raises(ProjectError, match="must be migrated"):
        Project.open(folder, readonly=True)
    with Project.open(folder) as proj:
        assert proj.schema_version == SCHEMA_VERSION == 3
        first, second = proj.annotations()
        assert [first.id, second.id] == [1, 2]
        assert (first.annotator, first.seconds, first.split, first.patch_id) == (
            "ada", 41.5, "train", 1
        )  # fmt: skip
        assert second.split == "validation" and second.empty
        assert first.pvs_voxels == 4
        assert second.pvs_voxels == 0
        assert proj.volume(1).path == folder / "data" / "vol.zarr"  # stored relative
        assert [p.status for p in proj.queue()] == ["new", "reviewed"]
        assert proj.settings()["strategy"] == "entropy"
        kinds = [e["kind"] for e in proj.events()]
        assert kinds == ["create", "add-volume", "accept", "migrate", "migrate"]
        # The migrated ledger works as a new one: accept and the append-only log.
        proj.accept(1, (0, 32, 0), (8, 40, 8), np.ones((8, 8, 8), np.uint8))
        assert proj.annotations()[-1].pvs_voxels == 512
    backup = sqlite3.connect(folder / "ledger.v1-backup.sqlite")
    assert backup.execute("PRAGMA user_version").fetchone()[0] == 1
    assert backup.execute("SELECT * FROM annotations").fetchall() == old_rows


def test_shipped_schema_1_is_the_fixture():
    """SCHEMA_1 + migration is what create writes; SCHEMA_1 must equal the fixture's schema."""

    def tables(statements):
        db = sqlite3.connect(":memory:")
        for statement in statements:
            db.execute(statement)
        return {
            name: db.execute(f"PRAGMA table_info({name})").fetchall()
            for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }

    fixture = [
        s for s in statements((FIXTURES / "ledger_v1.sql").read_text()) if "CREATE TABLE" in s
    ]
    assert tables(statements(SCHEMA_1)) == tables(fixture)


def test_damaged_or_foreign_ledger_is_reported_never_recreated(tmp_path, assets):
    with pytest.raises(ProjectError, match="not a napari-pvs project"):
        Project.open(tmp_path)
    folder = tmp_path / "proj"
    Project.create(folder, model=assets["model"]).close()
    ledger = folder / "ledger.sqlite"
    garbage = b"SQLite format 3\x00" + bytes(range(256)) * 64
    ledger.write_bytes(garbage)
    with pytest.raises(ProjectError, match=str(ledger)):
        Project.open(folder)
    assert ledger.read_bytes() == garbage
    assert not (folder / "lock").exists()  # a failed open leaves no lock behind
    ledger.unlink()
    with pytest.raises(ProjectError, match="missing; restore it"):
        Project.open(folder)
    assert not ledger.exists()


def test_newer_schema_is_refused(tmp_path, assets):
    folder = tmp_path / "proj"
    Project.create(folder, model=assets["model"]).close()
    db = sqlite3.connect(folder / "ledger.sqlite")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(ProjectError, match="newer than this napari-pvs"):
        Project.open(folder)


@pytest.mark.parametrize(
    ("start", "stop", "labels", "message"),
    [
        ((0, 0, 0), (4, 4, 4), np.full((4, 4, 4), 2), "found 2"),
        ((0, 0, 0), (4, 4, 4), np.full((4, 4, 4), 255), "found 255"),
        ((0, 0, 0), (4, 4, 4), np.full((4, 4, 4), 0.5), "found 0.5"),
        ((0, 0, 0), (4, 4, 4), np.zeros((4, 4, 5)), "box is"),
        ((30, 0, 0), (34, 4, 4), np.zeros((4, 4, 4)), "not inside volume"),
        ((-1, 0, 0), (3, 4, 4), np.zeros((4, 4, 4)), "not inside volume"),
        ((0, 0, 0), (4, 4, 4), np.array([["a"]]), "numeric"),
    ],
)
def test_bad_annotations_refused_with_nothing_written(project, start, stop, labels, message):
    store = project.path / "volumes" / "1" / "labels.zarr"
    before = store_digest(store)
    events = len(project.events())
    with pytest.raises(ValueError, match=message):
        project.accept(1, start, stop, labels)
    assert store_digest(store) == before
    assert project.annotations() == [] and len(project.events()) == events
    assert not any((project.path / "journal").iterdir())
    assert project._query("SELECT COUNT(*) FROM pending_accepts")[0][0] == 0


def test_removed_volume_refused(project):
    project.remove_volume(1)
    with pytest.raises(ValueError, match="was removed from the project"):
        project.accept(1, (0, 0, 0), (2, 2, 2), np.zeros((2, 2, 2)))
    assert project.annotations() == [] and project.volumes() == []


def test_accept_is_idempotent(project):
    patch = np.zeros((8, 8, 8), np.uint8)
    patch[2:4, 2:4, 2:6] = 1
    first = project.accept(1, (0, 0, 0), (8, 8, 8), patch)
    again = project.accept(1, (0, 0, 0), (8, 8, 8), patch)
    assert again == first and len(project.annotations()) == 1
    changed = project.accept(1, (0, 0, 0), (8, 8, 8), 1 - patch)
    assert changed.id != first.id and len(project.annotations()) == 2


CHILD_ACCEPT = """
import os, sys, numpy as np
from napari_pvs.project import Project
from napari_pvs.project.annotations import Annotations
project = Project.open(sys.argv[1])
mode = sys.argv[2]
if mode != "after-return":
    original = Annotations._write_labels
    def write(self, *args):
        if mode == "after-labels":
            original(self, *args)
        else:  # half the box written, then killed
            volume_id, start, stop, patch = args
            half = (start[0] + (stop[0] - start[0]) // 2, *stop[1:])
            original(self, volume_id, start, half, patch[: half[0] - start[0]])
        os.kill(os.getpid(), 9)
    Annotations._write_labels = write
patch = np.zeros((16, 16, 16), np.uint8)
patch[4:12, 8, 8] = 1
annotation = project.accept(1, (8, 16, 16), (24, 32, 32), patch, annotator="kill")
print("ACK", annotation.id, flush=True)
os.kill(os.getpid(), 9)
"""


@pytest.mark.parametrize("mode", ["after-return", "after-labels", "mid-labels"])
def test_sigkill_loses_no_acknowledged_annotation(project, mode):
    """Killed right after accept returns: all there. Killed between the label write (whole or
    half) and the commit: repaired on reopen from the journal."""
    folder = project.path
    project.accept(1, (0, 0, 0), (8, 8, 8), np.ones((8, 8, 8), np.uint8))
    project.close()
    result = run_child(CHILD_ACCEPT, str(folder), mode)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert ("ACK" in result.stdout) == (mode == "after-return")
    with Project.open(folder) as proj:
        annotations = proj.annotations()
        assert [a.annotator for a in annotations] == ["", "kill"]
        labels = proj.labels(1)["labels"]
        expected = np.zeros((16, 16, 16), np.uint8)
        expected[4:12, 8, 8] = 1
        np.testing.assert_array_equal(labels[8:24, 16:32, 16:32], expected)
        np.testing.assert_array_equal(labels[0:8, 0:8, 0:8], 1)
        assert proj.labels(1)["reviewed"][8:24, 16:32, 16:32].all()
        kinds = [e["kind"] for e in proj.events()]
        assert kinds.count("accept-repaired") == (mode != "after-return")
        assert not any((folder / "journal").iterdir())
        assert proj._query("SELECT COUNT(*) FROM pending_accepts")[0][0] == 0
        assert proj._query("PRAGMA integrity_check")[0][0] == "ok"


CHILD_HOLD = """
import sys, time
from napari_pvs.project import Project
project = Project.open(sys.argv[1])
print("READY", flush=True)
time.sleep(120)
"""


def test_lock_contention_and_stale_lock(project):
    folder = project.path
    project.close()
    env = {**os.environ, "PYTHONPATH": SRC}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_HOLD, str(folder)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "READY"
        with pytest.raises(ProjectLocked) as caught:
            Project.open(folder)
        holder = caught.value.holder
        assert holder["pid"] == child.pid and holder["host"] and holder["since"]
        assert f"pid {child.pid}" in str(caught.value)
        with Project.open(folder, readonly=True) as reader:  # readers need no lock
            assert reader.volumes()[0].name == "vol"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with Project.open(folder) as proj:  # the dead holder's lock is stale: taken over
        (event,) = proj.events("stale-lock-taken-over")
        assert event["pid"] == child.pid
        assert json.loads((folder / "lock").read_text())["pid"] == os.getpid()
    assert not (folder / "lock").exists()  # a clean close removes it


def test_same_process_second_writer_is_refused(project):
    with pytest.raises(ProjectLocked, match=f"pid {os.getpid()}"):
        Project.open(project.path)


def test_validation_split_is_seeded_fixed_and_never_overlaps_training(tmp_path, assets):
    boxes = [((z, y, x), (z + 8, y + 8, x + 8)) for z in (0, 16) for y in (0, 16) for x in (0, 16)]
    splits = []
    for name in ("a", "b"):
        with Project.create(tmp_path / name, model=assets["model"], seed=11) as proj:
            proj.add_volume(assets["volume"])
            splits.append([proj.accept(1, a, b, np.zeros((8, 8, 8))).split for a, b in boxes])
            # one validation patch per block of 4 (validation_fraction 0.25)
            assert splits[-1][:4].count("validation") == 1
            assert splits[-1][4:].count("validation") == 1
            validation = proj.annotations(split="validation")[0]
            train = proj.annotations(split="train")[0]
            inside_val = tuple(v + 2 for v in validation.start)
            inside_train = tuple(v + 2 for v in train.start)
            ones = np.ones((8, 8, 8))
            assert proj.accept(1, inside_val, tuple(v + 8 for v in inside_val), ones).split == (
                "validation"
            )
            assert (
                proj.accept(1, inside_train, tuple(v + 8 for v in inside_train), ones).split
                == "train"
            )
            # the first splits never change
            assert [a.split for a in proj.annotations()][:8] == splits[-1]
    assert splits[0] == splits[1]
    with Project.create(tmp_path / "capped", model=assets["model"], validation_max=1) as proj:
        proj.add_volume(assets["volume"])
        capped = [proj.accept(1, a, b, np.zeros((8, 8, 8))).split for a, b in boxes]
        assert capped.count("validation") == 1


def test_rank_excludes_reviewed_and_skipped_patches(project):
    queue = project.rank(1, n=4, patch=16, strategy="entropy")
    assert 1 <= len(queue) <= 4 and all(p.status == "new" for p in queue)
    assert project.has_prediction(1)
    first = queue[0]
    size = tuple(b - a for a, b in zip(first.start, first.stop, strict=True))
    project.accept(1, first.start, first.stop, np.zeros(size), patch_id=first.id)
    if len(queue) > 1:
        project.skip(queue[1].id)
    statuses = {p.id: p.status for p in project.queue(1)}
    assert statuses[first.id] == "reviewed"
    again = project.rank(1, n=4, patch=16, strategy="entropy")
    taken = [(p.start, p.stop) for p in project.queue(1) if p.status != "new"]
    for patch in again:
        for start, stop in taken:
            assert not all(
                a < d and c < b for a, b, c, d in zip(patch.start, patch.stop, start, stop,
                                                      strict=True)
            )  # fmt: skip
    assert {p.status for p in project.queue(1, status="new")} == {"new"}


def test_burden_counts_clusters_per_region(project):
    from napari_pvs.metrics import label_clusters

    rows = project.burden()
    segmentation = zarr.open_group(str(project.prediction_path(1)), mode="r")["segmentation"][:]
    clusters, n = label_clusters(segmentation > 0)
    whole = rows[0]
    assert (whole["region"], whole["count"]) == ("whole", n)
    assert whole["volume_mm3"] == pytest.approx(float((segmentation > 0).sum()))  # 1 mm voxels
    regions = np.asarray(project.region_map(1))
    for row in rows[1:]:  # reference: each cluster counts where most of its voxels are
        ids = [
            c for c in range(1, n + 1)
            if np.bincount(regions[clusters == c], minlength=5).argmax() == row["region_id"]
        ]  # fmt: skip
        assert row["count"] == len(ids)
        assert row["volume_mm3"] == pytest.approx(float(np.isin(clusters, ids).sum()))
    assert {r["region"] for r in rows[1:]} >= {"white_matter", "basal_ganglia"}

"""Yes/no answers on candidates in a project: refresh from a hand-made prediction, partial
labels (yes 1 / no 0 on the cluster, 255 elsewhere), exact undo, held-out share, stale
candidates after a new version, durability under SIGKILL and the CLI round trip."""

from __future__ import annotations

import shutil
import signal

import numpy as np
import pytest
import zarr

from napari_pvs.io import ATTRS_KEY
from napari_pvs.project import UNREVIEWED, Project, ProjectError
from test_project import SHAPE, build_assets, run_child

A = [(4, 4, 4), (5, 4, 4), (6, 4, 4), (6, 5, 5)]  # p 0.9
B = [(20, 30, 30), (21, 30, 30), (22, 30, 30), (22, 31, 30)]  # p 0.6
C = [(10, 20, 10), (10, 21, 10), (10, 22, 10), (10, 23, 10)]  # p 0.55, inside a reviewed patch
D = [(26, y, 30) for y in range(40, 46)]  # p 0.7
C_PATCH = ((8, 16, 8), (16, 24, 16))
D_PATCH = ((24, 40, 28), (32, 44, 36))  # holds D's first four voxels


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from napari_pvs.phantom import make_phantom

    phantom = make_phantom(SHAPE, spacing=(1.0, 1.0, 1.0), modality="T2", seed=3, severity=1.0)
    return build_assets(tmp_path_factory.mktemp("assets"), phantom)


@pytest.fixture
def project(tmp_path, assets):
    with Project.create(tmp_path / "proj", model=assets["model"], seed=5) as proj:
        proj.add_volume(assets["volume"])
        yield proj


def write_prediction(project, version: int, clusters) -> None:
    """A complete prediction store of volume 1 holding ``clusters`` [(voxels, probability)]."""
    segmentation = np.zeros(SHAPE, np.uint8)
    probability = np.full(SHAPE, 0.02, np.float32)
    for voxels, p in clusters:
        for index in voxels:
            segmentation[index] = 1
            probability[index] = p
    path = project.prediction_path(1, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(path), mode="w")
    for name, data in (("segmentation", segmentation), ("probability", probability)):
        group.create_array(name, shape=SHAPE, chunks=(16, 16, 16), dtype=data.dtype)[:] = data
    group.attrs[ATTRS_KEY] = {"complete": True}


def labels_of(project) -> tuple[np.ndarray, np.ndarray]:
    store = project.labels(1)
    return np.asarray(store["labels"][:]), np.asarray(store["reviewed"][:])


def seeds(candidates) -> dict[tuple, object]:
    return {tuple(c.seed): c for c in candidates}


def prepared(project):
    """C's patch reviewed, the v0 prediction written, candidates found: B, D, A."""
    size = tuple(b - a for a, b in zip(*C_PATCH, strict=True))
    project.accept(1, *C_PATCH, np.zeros(size, np.uint8), annotator="ann")
    write_prediction(project, 0, [(A, 0.9), (B, 0.6), (C, 0.55), (D, 0.7)])
    return project.refresh_candidates(1)


def test_refresh_needs_a_prediction_and_leaves_out_reviewed_clusters(project):
    with pytest.raises(ProjectError, match="no complete prediction by the current version v0"):
        project.refresh_candidates(1)
    found = prepared(project)
    assert [tuple(c.seed) for c in found] == [B[0], D[0], A[0]]  # most uncertain first
    assert [c.rank for c in found] == [1, 2, 3]
    assert all(c.status == "open" and c.model_version == 0 for c in found)
    b = found[0]
    assert (b.bbox_start, b.bbox_stop, b.voxels, b.volume_mm3) == ([20, 30, 30], [23, 32, 31],
                                                                   4, 4.0)  # fmt: skip
    assert b.mean_probability == pytest.approx(0.6)
    mask = project.candidate_mask(b.id)
    assert mask.shape == (3, 2, 1) and mask.sum() == 4
    assert project.candidates_current(1)
    assert project.refresh_candidates(1) == found  # idempotent for the same version
    assert project.candidates(1, n=1) == found[:1]
    assert project.candidate(found[2].id) == found[2]
    with pytest.raises(ValueError, match="there is no candidate 99"):
        project.candidate(99)


def test_answers_write_partial_labels_and_undo_restores_exactly(project):
    b, d, a = prepared(project)
    size = tuple(y - x for x, y in zip(*D_PATCH, strict=True))
    project.accept(1, *D_PATCH, np.zeros(size, np.uint8), annotator="ann")
    before_labels, before_reviewed = labels_of(project)

    yes = project.answer(a.id, "yes", annotator="ann", seconds=1.5)
    no = project.answer(b.id, "no", annotator="bob")
    partial = project.answer(d.id, "yes", annotator="ann")
    labels, reviewed = labels_of(project)
    expected = before_labels.copy()
    for voxel in A:
        expected[voxel] = 1
    for voxel in B:
        expected[voxel] = 0
    for voxel in D[4:]:  # D's first four voxels were reviewed background: left alone
        expected[voxel] = 1
    np.testing.assert_array_equal(labels, expected)  # the rest of every box stays 255
    np.testing.assert_array_equal(reviewed, before_reviewed | (expected != before_labels))
    assert (yes.answer, yes.voxels_written, yes.seconds, yes.model_version) == ("yes", 4, 1.5, 0)
    assert (no.annotator, no.voxels_written, partial.voxels_written) == ("bob", 4, 2)
    assert project.answer_mask(partial.id).sum() == 2
    assert np.array_equal(project.answer_mask(yes.id), project.candidate_mask(a.id))
    assert [c.status for c in map(project.candidate, (a.id, b.id, d.id))] == ["yes", "no", "yes"]
    counts = project.status()["answers"]
    assert {k: counts[k] for k in ("total", "yes", "no", "skipped")} == {
        "total": 3, "yes": 2, "no": 1, "skipped": 0}  # fmt: skip
    assert project.status()["volumes"][0]["answers"] == 3

    # Refused, with nothing written: answered again, a bad answer, no annotator.
    with pytest.raises(ValueError, match="already answered 'yes'; undo that answer first"):
        project.answer(a.id, "no", annotator="ann")
    with pytest.raises(ValueError, match="answer must be one of yes, no, skip"):
        project.answer(a.id, "maybe", annotator="ann")
    with pytest.raises(ValueError, match="needs the annotator's name"):
        project.answer(a.id, "yes", annotator="  ")
    assert len(project.answers()) == 3

    undone = project.undo_answer(annotator="ann")  # the latest: D's
    assert undone.id == partial.id and undone.undone is not None
    assert project.candidate(d.id).status == "open"
    assert [r.id for r in project.answers()] == [yes.id, no.id]
    assert [r.id for r in project.answers(include_undone=True)] == [yes.id, no.id, partial.id]
    project.undo_answer(yes.id, annotator="ann")
    project.undo_answer(annotator="ann")
    assert project.undo_answer(annotator="ann") is None
    labels, reviewed = labels_of(project)
    np.testing.assert_array_equal(labels, before_labels)
    np.testing.assert_array_equal(reviewed, before_reviewed)
    with pytest.raises(ValueError, match="already undone"):
        project.undo_answer(yes.id, annotator="ann")
    assert project.status()["answers"]["total"] == 0
    kinds = [e["kind"] for e in project.events() if e["kind"].startswith("answer")]
    assert kinds == ["answer"] * 3 + ["answer-undo"] * 3


def test_undo_keeps_what_a_later_accepted_patch_wrote(project):
    _b, _d, a = prepared(project)
    project.answer(a.id, "yes", annotator="ann")
    patch = np.zeros((4, 4, 4), np.uint8)
    patch[1, 0, 0] = 1
    project.accept(1, (4, 4, 4), (8, 8, 8), patch, annotator="ann")  # holds A's voxels but one
    project.undo_answer(annotator="ann")
    labels, _ = labels_of(project)
    assert labels[4, 4, 4] == 0 and labels[5, 4, 4] == 1 and labels[6, 4, 4] == 0
    assert labels[6, 5, 5] == 0  # in the patch (it is 4..8 on every axis)
    assert project.candidate(a.id).status == "open"


def test_skip_asks_again_after_the_open_ones(project):
    b, d, a = prepared(project)
    skip = project.answer(b.id, "skip", annotator="ann")
    assert (skip.voxels_written, skip.split) == (0, "train")
    assert [c.id for c in project.candidates(1, status=("open", "skipped"))] == [d.id, a.id, b.id]
    assert project.candidate(b.id).status == "skipped"
    labels, _ = labels_of(project)
    assert all(labels[v] == UNREVIEWED for v in B)
    again = project.answer(b.id, "yes", annotator="ann")
    assert again.voxels_written == 4 and project.candidate(b.id).status == "yes"
    assert project.status()["answers"]["skipped"] == 1  # the skip is part of the history
    project.undo_answer(skip.id, annotator="ann")  # the earlier skip: the yes stands
    assert project.candidate(b.id).status == "yes"
    project.undo_answer(annotator="ann")
    assert project.candidate(b.id).status == "open"


def test_one_answer_in_five_is_held_out_and_keeps_its_split(project):
    singles = [([(2 * i + 1, 2, 2)], 0.5 + 0.01 * i) for i in range(10)]
    write_prediction(project, 0, singles)
    found = project.refresh_candidates(1)
    assert len(found) == 10
    splits = [project.answer(c.id, "no", annotator="ann").split for c in found]
    assert splits.count("held-out") == 2
    assert splits[:5].count("held-out") == 1 and splits[5:].count("held-out") == 1
    held = project.answers(split="held-out")
    assert len(held) == 2 and project.status()["answers"]["held_out"] == 2
    last = project.undo_answer(annotator="ann")
    assert project.answer(last.candidate_id, "no", annotator="ann").split == last.split
    with pytest.raises(ValueError, match="split must be one of"):
        project.answers(split="validation")


def fake_round(project) -> int:
    record = project._begin_round({})
    target = project.path / "models" / f"v{record.new_version}.safetensors"
    shutil.copyfile(project.checkpoint_path(0), target)
    project._commit_round(record.id, metrics={"validation_dice": 0.5}, manifest_hash="x",
                          queues={})  # fmt: skip
    return record.new_version


def test_candidates_go_stale_when_a_new_version_predicts(project):
    b, d, a = prepared(project)
    yes = project.answer(a.id, "yes", annotator="ann")
    project.answer(d.id, "skip", annotator="ann")
    assert fake_round(project) == 1
    assert not project.candidates_current(1)
    with pytest.raises(ProjectError, match="current version v1"):
        project.refresh_candidates(1)
    E = [(28, 10, 10), (29, 11, 11)]
    write_prediction(project, 1, [(A, 0.95), (B, 0.8), (E, 0.5)])
    found = project.refresh_candidates(1)
    assert [tuple(c.seed) for c in found] == [E[0], B[0]]  # A is answered: its voxels labelled
    assert all(c.model_version == 1 and c.id > d.id for c in found)
    statuses = {c.id: c.status for c in project.candidates(1, status=None)}
    assert [statuses[c.id] for c in (b, d, a)] == ["stale", "stale", "yes"]
    with pytest.raises(ValueError, match="is stale"):
        project.answer(b.id, "no", annotator="ann")
    assert project.candidates_current(1)
    # Undoing A's answer (a v0 candidate) leaves it stale; the next refresh asks its v1 cluster.
    project.undo_answer(yes.id, annotator="ann")
    assert project.candidate(a.id).status == "stale"
    found = project.refresh_candidates(1)
    assert [tuple(c.seed) for c in found] == [E[0], B[0], A[0]]
    # The same version again: ids kept; an open one now touching a reviewed patch goes stale.
    project.accept(1, (28, 8, 8), (32, 16, 16), np.zeros((4, 8, 8), np.uint8), annotator="ann")
    again = project.refresh_candidates(1)
    assert [c.id for c in again] == [found[1].id, found[2].id]
    assert project.candidate(found[0].id).status == "stale"


def test_edited_candidate_is_not_asked(project):
    b, d, a = prepared(project)
    annotation = project.accept(1, (16, 24, 24), (28, 36, 36), np.zeros((12, 12, 12), np.uint8),
                                annotator="ann")  # fmt: skip
    edited = project.mark_candidate_edited(b.id, annotation.id)
    assert (edited.status, edited.annotation_id) == ("edited", annotation.id)
    with pytest.raises(ValueError, match="was edited as reviewed patch"):
        project.answer(b.id, "yes", annotator="ann")
    project.answer(a.id, "no", annotator="ann")
    with pytest.raises(ValueError, match="only an open or skipped candidate can be edited"):
        project.mark_candidate_edited(a.id, annotation.id)
    assert [c.id for c in project.candidates(1)] == [d.id]
    project.remove_volume(1)  # its open candidates are no longer asked
    assert project.candidates() == [] and project.candidate(d.id).status == "stale"


CHILD_ANSWER = """
import os, sys
from napari_pvs.project import Project
from napari_pvs.project import answers as module
project = Project.open(sys.argv[1])
mode = sys.argv[2]
original = module.write_label_box
def write(*args):
    if mode == "before-labels":
        os.kill(os.getpid(), 9)
    if mode == "mid-labels":  # the labels written, not yet the reviewed mask, then killed
        import zarr
        from napari_pvs.project.label_writes import box_slices
        store, start, stop, labels, reviewed = args
        zarr.open_group(str(store), mode="r+")["labels"][box_slices(start, stop)] = labels
        os.kill(os.getpid(), 9)
    original(*args)
    if mode.endswith("after-labels"):
        os.kill(os.getpid(), 9)
module.write_label_box = write
if mode == "before-intent":
    module.Answers._split_for = lambda self, answer: os.kill(os.getpid(), 9)
if mode.startswith("undo"):
    project.undo_answer(annotator="kill")
else:
    project.answer(int(sys.argv[3]), "yes", annotator="kill")
print("ACK", flush=True)
os.kill(os.getpid(), 9)
"""


@pytest.mark.parametrize(
    "mode",
    ["after-return", "after-labels", "mid-labels", "before-labels", "before-intent",
     "undo-after-labels", "undo-after-return"],
)  # fmt: skip
def test_sigkill_loses_no_acknowledged_answer(project, mode):
    """Killed right after answer() returns: all there. Killed after the intent row (labels
    written, half written or not at all): finished on reopen. Killed before the intent row:
    dropped, nothing written. The same for an undo."""
    b, _d, a = prepared(project)
    project.answer(b.id, "no", annotator="ann")
    if mode.startswith("undo"):
        project.answer(a.id, "yes", annotator="ann")
    before_labels, before_reviewed = labels_of(project)
    folder = project.path
    project.close()
    result = run_child(CHILD_ANSWER, str(folder), mode, str(a.id))
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert ("ACK" in result.stdout) == mode.endswith("after-return")
    done = mode != "before-intent"
    with Project.open(folder) as proj:
        labels, reviewed = labels_of(proj)
        answered = done and not mode.startswith("undo")
        expected, expected_reviewed = before_labels.copy(), before_reviewed.copy()
        for voxel in A:
            expected[voxel] = 1 if answered else UNREVIEWED
            expected_reviewed[voxel] = answered
        np.testing.assert_array_equal(labels, expected)
        np.testing.assert_array_equal(reviewed, expected_reviewed)
        assert all(labels[v] == 0 for v in B)  # the acknowledged answer before is intact
        live = {r.candidate_id: r.annotator for r in proj.answers()}
        if answered:
            assert live == {b.id: "ann", a.id: "kill"}
        else:
            assert live == {b.id: "ann"}
        assert proj.candidate(a.id).status == ("yes" if answered else "open")
        kinds = [e["kind"] for e in proj.events()]
        repaired = done and not mode.endswith("after-return")
        assert any(k.endswith("-repaired") for k in kinds) == repaired
        assert proj._query("SELECT COUNT(*) FROM pending_answers")[0][0] == 0
        assert proj._query("PRAGMA integrity_check")[0][0] == "ok"


def test_cli_round_trip(project, tmp_path, capsys):
    from napari_pvs.cli import main

    b, d, a = prepared(project)
    folder = str(project.path)
    project.close()
    assert main(["project", "candidates", folder, "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "vol: 3 open, 0 skipped candidate(s) (v0)" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [b.id, d.id]
    assert rows[0][1:] == ["1", "21", "30", "30", "4", "4.00", "0.60", "0.971", "open"]
    assert main(["project", "answer", folder, str(b.id), "yes", "--annotator", "cli"]) == 0
    assert f"answered candidate {b.id} yes" in capsys.readouterr().out
    assert main(["project", "answer", folder, str(b.id), "no", "--annotator", "cli"]) == 2
    assert "already answered" in capsys.readouterr().err
    assert main(["project", "answer", folder, str(d.id), "yes", "--annotator", ""]) == 2
    assert "annotator is empty" in capsys.readouterr().err
    assert main(["project", "status", folder]) == 0
    out = capsys.readouterr().out
    assert "answers: 1 (yes 1, no 0, skipped 0; held out" in out
    assert "reviewed patches: 1;" in out

    bad = tmp_path / "bad.csv"
    bad.write_text(f"candidate,answer,annotator\n{d.id},no,x\n{a.id},perhaps,y\n")
    assert main(["project", "answer", folder, "--from", str(bad)]) == 2
    assert "bad.csv line 3: answer must be one of yes, no, skip, got 'perhaps'" in (
        capsys.readouterr().err
    )
    bad.write_text(f"candidate,answer\n{d.id},no\n{b.id},no\n")
    assert main(["project", "answer", folder, "--from", str(bad)]) == 2
    assert f"bad.csv line 3: candidate {b.id} is 'yes', not open" in capsys.readouterr().err
    good = tmp_path / "answers.csv"
    good.write_text(f"candidate,answer,annotator\n{d.id},no,x\n{a.id},skip,\n")
    assert main(["project", "answer", folder, "--from", str(good), "--annotator", "dflt"]) == 0
    assert "answered 2 candidate(s)" in capsys.readouterr().out
    with Project.open(folder) as proj:
        assert [(r.candidate_id, r.answer, r.annotator) for r in proj.answers()] == [
            (b.id, "yes", "cli"), (d.id, "no", "x"), (a.id, "skip", "dflt")]  # fmt: skip
    assert main(["project", "answer", folder, "--undo"]) == 0
    assert f"skip on candidate {a.id}" in capsys.readouterr().out
    assert main(["project", "answer", folder, "--undo", "1"]) == 0
    assert main(["project", "answer", folder, str(a.id), "yes", "--undo"]) == 2
    assert "give one of" in capsys.readouterr().err
    assert main(["project", "status", folder, "--json"]) == 0
    import json

    status = json.loads(capsys.readouterr().out)
    assert status["answers"]["total"] == 1 and status["answers"]["no"] == 1
    assert main(["project", "candidates", folder, "--refresh", "--order", "region"]) == 0
    assert "open" in capsys.readouterr().out  # the phantom volume has a region map


def test_a_patch_accepted_during_refresh_is_not_asked(project, monkeypatch):
    """Refresh computes without the project's lock; labels written meanwhile make it compute
    again (holding the lock), so a cluster reviewed during the refresh is no candidate."""
    import napari_pvs.candidates as module

    write_prediction(project, 0, [(A, 0.9), (B, 0.6)])
    original = module.find_candidates
    calls = []

    def find_while_accepting(*args, **kwargs):
        found = original(*args, **kwargs)
        if not calls:  # another thread accepts A's patch just after the first pass read labels
            assert len(found) == 2
            project.accept(1, (4, 4, 4), (8, 8, 8), np.zeros((4, 4, 4), np.uint8))
        calls.append(1)
        return found

    monkeypatch.setattr(module, "find_candidates", find_while_accepting)
    found = project.refresh_candidates(1)
    assert len(calls) == 2
    assert [tuple(c.seed) for c in found] == [B[0]]


def test_a_schema_2_ledger_is_migrated_with_its_rows(project):
    """A ledger from before candidates (schema 2) gets the three tables, after a backup."""
    import sqlite3

    project.accept(1, (0, 0, 0), (8, 8, 8), np.ones((8, 8, 8), np.uint8), annotator="old")
    folder = project.path
    project.close()
    db = sqlite3.connect(folder / "ledger.sqlite")
    for table in ("pending_answers", "answers", "candidates"):
        db.execute(f"DROP TABLE {table}")
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()
    with Project.open(folder) as proj:
        assert proj.schema_version == 3
        assert [a.annotator for a in proj.annotations()] == ["old"]
        assert proj.events("migrate")[-1]["from"] == 2
        write_prediction(proj, 0, [(B, 0.6)])
        (b,) = proj.refresh_candidates(1)
        assert proj.answer(b.id, "yes", annotator="new").voxels_written == 4
    backup = sqlite3.connect(folder / "ledger.v2-backup.sqlite")
    assert backup.execute("PRAGMA user_version").fetchone()[0] == 2
    assert "candidates" not in {r[0] for r in backup.execute("SELECT name FROM sqlite_master")}

"""Rounds: frozen snapshots, validation never trained on, the worker process (done, cancelled,
killed), rollback, the stopping hint, and the project CLI end to end on a tiny phantom."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from napari_pvs import training
from napari_pvs.models.checkpoint import read_checkpoint
from napari_pvs.phantom import make_phantom
from napari_pvs.project import Project
from napari_pvs.ranking import RankedPatch
from napari_pvs.rounds import RoundConfig, load_snapshot, run_round, start_round
from test_project import SHAPE, SRC, build_assets

TINY = dict(steps=3, batch_size=2, patch=16, device="cpu")
#: Eight non-overlapping 16^3 boxes (two rows of four along x, then y).
BOXES = [
    ((z, y, x), (z + 16, y + 16, x + 8)) for z in (0, 16) for y in (16,) for x in range(0, 32, 8)
]


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(SHAPE, spacing=(1.0, 1.0, 1.0), modality="T2", seed=3, severity=1.0)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, phantom):
    return build_assets(tmp_path_factory.mktemp("assets"), phantom)


def truth(phantom, start, stop):
    return phantom.pvs[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))]


@pytest.fixture
def project(tmp_path, assets, phantom):
    """A project with eight accepted patches (two of them validation) and a 16^3 queue."""
    with Project.create(tmp_path / "proj", model=assets["model"], seed=5) as proj:
        proj.add_volume(assets["volume"])
        proj.update_settings(patch=16, n=3, predict_mc=2)
        for start, stop in BOXES:
            proj.accept(1, start, stop, truth(phantom, start, stop))
        assert [a.split for a in proj.annotations()].count("validation") == 2
        yield proj


def test_no_training_annotations_refused(tmp_path, assets):
    with Project.create(tmp_path / "p", model=assets["model"]) as proj:
        proj.add_volume(assets["volume"])
        with pytest.raises(ValueError, match="no accepted training annotations"):
            run_round(proj, RoundConfig(**TINY))
        assert proj.rounds() == []


def test_validation_voxels_never_enter_training(project, phantom, monkeypatch):
    """A validation box overlapping a training box: its voxels are 255 in the training crop,
    and fit gets exactly the training annotations to train on and the validation ones to
    validate on."""
    annotations = project.annotations()
    k = next(i for i, a in enumerate(annotations) if a.split == "validation")
    j = k + 1 if k % 4 < 3 else k - 1  # a training neighbour in the same row
    val, train = annotations[k], annotations[j]
    lo, hi = sorted([val.start[2] + 4, train.start[2] + 4])
    bridge = project.accept(1, (val.start[0], 16, lo), (val.start[0] + 16, 32, hi + 1),
                            np.ones((16, 16, hi + 1 - lo)))  # fmt: skip
    assert bridge.split == "validation"
    seen = {}
    real_fit = training.fit

    def spy(model, volumes, config=None, out=None, **kwargs):
        seen["train"] = list(volumes)
        seen["validation"] = list(kwargs["validation"])
        return real_fit(model, volumes, config, out, **kwargs)

    monkeypatch.setattr(training, "fit", spy)
    outcome = run_round(project, RoundConfig(**TINY))
    assert outcome.status == "done", outcome.message
    train_ids = {a.id for a in project.annotations(split="train")}
    val_ids = {a.id for a in project.annotations(split="validation")}
    assert {int(v.name[1:]) for v in seen["train"]} == train_ids
    assert {int(v.name[1:]) for v in seen["validation"]} == val_ids
    snapshot = zarr.open_group(str(project.path / "rounds" / "r1" / "snapshot.zarr"), mode="r")
    val_boxes = [(a.start, a.stop) for a in project.annotations(split="validation")]
    for item in seen["train"]:
        crop_start = dict(snapshot[item.name].attrs)["napari_pvs"]["crop_start"]
        labelled = np.argwhere(np.asarray(item.labels) != 255) + np.asarray(crop_start)
        for start, stop in val_boxes:
            inside = np.all((labelled >= start) & (labelled < stop), axis=1)
            assert not inside.any(), f"{item.name} trains on validation voxels"
    # the neighbour's crop lost exactly the overlap, kept the rest of its box
    crop = dict(snapshot[f"a{train.id}"].attrs)["napari_pvs"]["crop_start"]
    labels = snapshot[f"a{train.id}"]["labels"][:]
    box = tuple(slice(a - c, b - c) for a, b, c in zip(train.start, train.stop, crop, strict=True))
    kept = (labels[box] != 255).sum()
    overlap = 16 * 16 * (min(train.stop[2], hi + 1) - max(train.start[2], lo))
    assert kept == 16 * 16 * 8 - overlap
    assert outcome.metrics["validation_patches"] == len(val_ids)
    assert outcome.metrics["base_validation_dice"] is not None


@pytest.mark.slow
def test_round_in_worker_uses_its_frozen_snapshot(project, phantom):
    ids_at_start = [a.id for a in project.annotations()]
    handle = start_round(project, RoundConfig(**TINY))
    late = project.accept(1, (0, 32, 0), (16, 48, 16), truth(phantom, (0, 32, 0), (16, 48, 16)))
    outcome = handle.wait(timeout=300)
    assert outcome.status == "done", outcome.message
    assert outcome.version == 1 == project.current_version().version
    record = project.round(outcome.round)
    assert record.snapshot_annotation_ids == ids_at_start and late.id not in ids_at_start
    _, meta = read_checkpoint(project.checkpoint_path())
    used = meta["training"]["annotations"] + meta["training"]["validation_annotations"]
    assert late.id not in used and set(used) == set(ids_at_start)
    train, validation = load_snapshot(project.path / "rounds" / "r1" / "snapshot.zarr")
    assert len(train) + len(validation) == len(ids_at_start)
    kinds = [e["kind"] for e in handle.events]
    assert kinds[0] == "stage" and "step" in kinds and kinds[-1] == "done"
    assert handle.events[-1]["version"] == 1
    assert project.has_prediction(1, 1)
    assert not (project.path / "rounds" / "r1" / "train").exists()
    for patch in project.queue(1, status="new"):  # the late accept is not queued again
        assert patch.model_version == 1 and patch.round == 1
        assert not all(
            a < d and c < b
            for a, b, c, d in zip(patch.start, patch.stop, late.start, late.stop, strict=True)
        )
    # the next round takes the late annotation
    outcome = run_round(project, RoundConfig(**TINY))
    assert late.id in project.round(outcome.round).snapshot_annotation_ids
    assert project.current_version().version == 2 and project.version(2).parent == 1


def _wait_for_step(handle, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e["kind"] == "step" for e in handle.poll()):
            return
        time.sleep(0.05)
    raise AssertionError(f"no training step within {timeout} s: {handle.events}")


@pytest.mark.slow
def test_cancelled_round_leaves_previous_version_current(project):
    """Closing the project cancels its running round (handle.cancel, then the wait)."""
    handle = start_round(project, RoundConfig(**{**TINY, "steps": 100_000}))
    _wait_for_step(handle)
    project.close()
    outcome = handle.outcome
    assert outcome.status == "cancelled" and outcome.version == 0
    assert "v0 stays current" in outcome.message
    assert handle.events[-1]["kind"] == "cancelled" and not handle.process.is_alive()
    with Project.open(project.path) as proj:
        assert proj.current_version().version == 0
        assert proj.round(outcome.round).status == "cancelled"
        assert sorted(p.name for p in (proj.path / "models").iterdir()) == ["v0.safetensors"]


@pytest.mark.slow
def test_killed_worker_marks_round_failed(project):
    handle = start_round(project, RoundConfig(**{**TINY, "steps": 100_000}))
    _wait_for_step(handle)
    os.kill(handle.pid, signal.SIGKILL)
    outcome = handle.wait(timeout=60)
    assert outcome.status == "failed" and "SIGKILL" in outcome.message
    assert project.current_version().version == 0
    record = project.round(outcome.round)
    assert record.status == "failed" and "SIGKILL" in record.message
    assert not (project.path / "models" / "v1.safetensors").exists()
    # the project carries on: the next round gets a fresh version number
    assert run_round(project, RoundConfig(**TINY)).version == 2


CHILD_ROUND = """
import os, sys
from napari_pvs.project import Project
from napari_pvs.rounds import RoundConfig, run_round
project = Project.open(sys.argv[1])
def die(event):
    if event["kind"] == "step":
        os.kill(os.getpid(), 9)
run_round(project, RoundConfig(steps=100000, patch=16, device="cpu"), on_event=die)
"""


CHILD_TORCH_FREE_ROUND = """
import sys
from napari_pvs.project import Project
from napari_pvs.rounds import RoundConfig, start_round
with Project.open(sys.argv[1]) as project:
    outcome = start_round(project, RoundConfig(steps=3, patch=16, device="cpu")).wait(300)
    print(outcome.status, outcome.version, project.current_version().version)
print('torch' in sys.modules, 'torch_geometric' in sys.modules)
"""


def test_a_round_in_its_worker_imports_no_torch_in_the_project_process(project):
    """napari's process starts and commits the round; only the worker needs torch (its import
    and the model's build held napari's GUI thread for seconds): the new checkpoint is committed
    by the digest of what the worker wrote and read back in full."""
    folder = project.path
    project.close()
    env = {**os.environ, "PYTHONPATH": SRC}
    result = subprocess.run([sys.executable, "-c", CHILD_TORCH_FREE_ROUND, str(folder)], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["done", "1", "1", "False", "False"], result.stdout
    with Project.open(folder) as proj:
        read_checkpoint(proj.checkpoint_path(1))  # what became current reads in full
    # the worker runs as batch work at nice 0: a nicer worker lost to every other program
    log = (folder / "rounds" / "r1" / "worker.log").read_text()
    expected = "batch scheduling" if hasattr(os, "SCHED_BATCH") else "default scheduling"
    assert f"round worker: {expected}" in log and ", nice 0" in log, log


def test_a_checkpoint_changed_after_its_worker_verified_it_is_not_committed(project):
    from napari_pvs.models.checkpoint_checks import file_sha256
    from napari_pvs.rounds import abandon_round, commit_round, execute_round, prepare_round

    plan = prepare_round(project, RoundConfig(**TINY))
    result = execute_round(plan)
    checkpoint = project.path / "models" / "v1.safetensors"
    assert result["checkpoint_sha256"] == file_sha256(checkpoint)
    data = bytearray(checkpoint.read_bytes())
    data[-5] ^= 0xFF  # a weight byte: the header still parses
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="changed after the round's worker verified it"):
        commit_round(project, plan, result)
    with pytest.raises(ValueError):  # without the digest, the full read refuses it too
        commit_round(project, plan, {**result, "checkpoint_sha256": None})
    abandon_round(project, plan, "failed", "failed at commit")
    assert project.current_version().version == 0
    assert [v.version for v in project.versions()] == [0]


@pytest.mark.slow
def test_process_killed_mid_round_is_repaired_on_reopen(project):
    folder = project.path
    project.close()
    env = {**os.environ, "PYTHONPATH": SRC}
    result = subprocess.run([sys.executable, "-c", CHILD_ROUND, str(folder)], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == -signal.SIGKILL, result.stderr
    with Project.open(folder) as proj:
        (record,) = proj.rounds()
        assert record.status == "interrupted" and "interrupted" in record.message
        assert proj.current_version().version == 0
        assert [v.version for v in proj.versions()] == [0]
        assert not (folder / "models" / "v1.safetensors").exists()


def test_rollback_changes_current_only(project):
    assert run_round(project, RoundConfig(**TINY)).status == "done"
    v0, _ = project.versions()
    files = sorted(p.name for p in (project.path / "models").iterdir())
    project.rollback("v0")
    assert project.current_version().version == 0
    assert sorted(p.name for p in (project.path / "models").iterdir()) == files
    model, _ = project.load_model()
    reference, _ = read_checkpoint(v0.checkpoint)
    for name, tensor in model.state_dict().items():
        assert np.array_equal(tensor.numpy(), reference[name].numpy())
    project.rollback(1)
    assert project.current_version().version == 1
    assert [e["to"] for e in project.events("rollback")] == [0, 1]
    with pytest.raises(ValueError, match="no model version v7"):
        project.rollback(7)
    rows = project.compare([0, 1])
    assert [r["current"] for r in rows] == [False, True] and "validation_dice" in rows[1]


def test_stop_hint_after_rounds_without_gain(project):
    """The hint fires when the last N rounds each gained less than STOP_MIN_GAIN."""

    def fake_round(base: float, new: float) -> None:
        record = project._begin_round({})
        shutil.copyfile(project.checkpoint_path(0), project.path / "models" /
                        f"v{record.new_version}.safetensors")  # fmt: skip
        project._commit_round(
            record.id,
            metrics={"validation_dice": new, "base_validation_dice": base},
            manifest_hash="x",
            queues={1: [RankedPatch(1, 0.5, [0, 0, 0], [16, 16, 16], [8, 8, 8], [8, 8, 8], 0,
                                    0, "entropy")]},
        )  # fmt: skip

    fake_round(0.30, 0.50)
    assert project.stop_hint() is None
    fake_round(0.50, 0.502)
    assert project.stop_hint() is None  # one flat round of the default 2
    fake_round(0.502, 0.501)
    hint = project.stop_hint()
    assert hint is not None and "not improved for 2 rounds" in hint
    assert project.stop_hint(patience=3) is None
    assert [p.round for p in project.queue(1, status="new")] == [3]


def test_cli_end_to_end(tmp_path, assets, phantom, capsys):
    from napari_pvs.cli import main
    from napari_pvs.io import save_nifti

    folder = str(tmp_path / "proj")
    assert main(["project", "init", folder, "--model", str(assets["model"]), "--seed", "5"]) == 0
    assert main(["project", "init", folder]) == 2
    assert "already holds a napari-pvs project" in capsys.readouterr().err
    assert main(["project", "add", folder, str(assets["volume"])]) == 0
    assert main(["project", "queue", folder, "--n", "2", "--patch", "16",
                 "--strategy", "entropy"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "patches to review (v0)" in out
    for index, (start, stop) in enumerate(BOXES[:5]):
        patch = tmp_path / f"patch{index}.npy"
        np.save(patch, truth(phantom, start, stop))
        args = ["project", "accept", folder, "vol", "--box", *map(str, start + stop),
                "--labels", str(patch), "--annotator", "cli"]  # fmt: skip
        assert main(args) == 0
    nifti = tmp_path / "patch.nii.gz"
    save_nifti(nifti, np.zeros((8, 8, 8), np.uint8), np.eye(4))
    assert main(["project", "accept", folder, "#1", "--box", "0", "0", "0", "8", "8", "8",
                 "--labels", str(nifti)]) == 0  # fmt: skip
    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((8, 8, 8), 3, np.uint8))
    assert main(["project", "accept", folder, "#1", "--box", "0", "0", "0", "8", "8", "8",
                 "--labels", str(bad)]) == 2  # fmt: skip
    assert "may only be 0 (no PVS) and 1 (PVS); found 3" in capsys.readouterr().err
    assert main(["round", folder, "--steps", "3", "--patch", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "round 1: done: v1 is current" in out
    assert main(["project", "versions", folder]) == 0
    assert "* v1" in capsys.readouterr().out
    assert main(["project", "rollback", folder, "v0"]) == 0
    assert "current version: v0 (was v1)" in capsys.readouterr().out
    assert main(["project", "status", folder]) == 0
    status = capsys.readouterr().out
    assert "round 1: done" in status and "* v0" in status
    export = tmp_path / "export"
    assert main(["project", "export", folder, "--out", str(export)]) == 0
    assert sorted(p.name for p in export.iterdir()) == [
        ".napari-pvs-export.json", "annotations.csv", "burden.csv", "vol_corrected.nii.gz",
        "vol_labels.nii.gz", "vol_pvs.nii.gz"
    ]  # fmt: skip
    with open(export / "burden.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["region"] == "whole" and rows[0]["model_version"] == "0"
    assert {r["region"] for r in rows} >= {"white_matter", "basal_ganglia"}
    from napari_pvs.io import open_labels

    labels = np.asarray(open_labels(export / "vol_labels.nii.gz").data)
    start, stop = BOXES[0]
    box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    np.testing.assert_array_equal(labels[box], truth(phantom, start, stop))
    assert (labels == 255).any()
    # corrected: the accepted labels inside reviewed patches, the model's segmentation elsewhere
    model = np.asarray(open_labels(export / "vol_pvs.nii.gz").data)
    corrected = np.asarray(open_labels(export / "vol_corrected.nii.gz").data)
    reviewed = labels != 255
    np.testing.assert_array_equal(corrected[reviewed], labels[reviewed])
    np.testing.assert_array_equal(corrected[~reviewed], model[~reviewed])
    assert set(np.unique(corrected)) <= {0, 1}
    assert main(["project", "export", folder, "--out", str(export)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["project", "export", folder, "--out", str(tmp_path / "z"),
                 "--format", "ome-zarr"]) == 0  # fmt: skip
    group = zarr.open_group(str(tmp_path / "z" / "vol.ome.zarr"), mode="r")
    assert set(group["labels"].group_keys()) == {"annotations", "pvs", "corrected"}


@pytest.mark.slow
@pytest.mark.skipif(
    not hasattr(training, "distributed_context"), reason="training.fit has no torchrun support"
)
def test_round_under_torchrun_two_gloo_processes(project):
    """torchrun --nproc_per_node 2 -m napari_pvs.rounds: one round, committed once by rank 0."""
    folder = project.path
    project.close()
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", "29517", "-m", "napari_pvs.rounds", str(folder), "--steps", "2",
               "--patch", "16", "--device", "cpu"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("round 1: done: v1 is current") == 1
    with Project.open(folder) as proj:
        assert [r.status for r in proj.rounds()] == ["done"]
        assert proj.current_version().version == 1
        proj.load_model()

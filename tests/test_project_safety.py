"""Issue 20 (second pass): a project export deletes only what it wrote, a changed volume is
caught, a killed round is cleaned up, and one damaged label store blocks only its own volume.

Each test failed on the code before the fix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_pvs import io
from napari_pvs.cli import main
from napari_pvs.project import Project
from napari_pvs.project.export import EXPORT_MARKER
from tiny_models import tiny_checkpoint

SHAPE = (20, 24, 18)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def scan(path, shape=SHAPE, seed=0, spacing=1.0):
    data = np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)
    return io.save_nifti(path, data, np.diag([spacing, spacing, spacing, 1.0]), overwrite=True)


@pytest.fixture()
def project(tmp_path, checkpoint):
    """A project with volumes 'a' (#1) and 'b' (#2), one accepted patch on each."""
    folder = tmp_path / "proj"
    with Project.create(folder, model=checkpoint) as created:
        for index, name in enumerate(("a", "b")):
            record = created.add_volume(scan(tmp_path / f"{name}.nii.gz", seed=index))
            created.accept(record.id, (0, 0, 0), (8, 8, 8), np.zeros((8, 8, 8), np.uint8))
    return folder


def errors(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def tree(folder) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# ------------------------------------------------------------------------------- export


def test_export_overwrite_refuses_a_folder_of_other_files(project, tmp_path, capsys):
    out = tmp_path / "my_results"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert main(["project", "export", str(project), "--out", str(out), "--overwrite"]) == 2
    assert "not a folder napari-pvs exported" in errors(capsys)
    assert tree(out) == {"thesis.tex": b"years of work"}


@pytest.mark.parametrize("part", ["volumes", "models", "."])
def test_export_refuses_any_folder_of_the_project(project, capsys, part):
    before = tree(project / part)
    assert main(["project", "export", str(project), "--out", str(project / part),
                 "--overwrite"]) == 2  # fmt: skip
    assert "inside it or holds it" in errors(capsys)
    assert tree(project / part) == before
    with Project.open(project, readonly=True) as opened:
        assert len(opened.volumes()) == 2


def test_export_replaces_only_its_own_folder(project, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["project", "export", str(project), "--out", str(out)]) == 0
    assert (out / EXPORT_MARKER).is_file() and (out / "a_labels.nii.gz").is_file()
    assert main(["project", "export", str(project), "--out", str(out), "--overwrite"]) == 0
    (out / "notes.txt").write_text("mine")  # the user put a file of their own in it
    assert main(["project", "export", str(project), "--out", str(out), "--overwrite"]) == 2
    assert "holds other files (notes.txt)" in errors(capsys)
    assert (out / "notes.txt").read_text() == "mine"
    # the project's own exports/ area is its to write, again and again
    assert main(["project", "export", str(project)]) == 0
    assert main(["project", "export", str(project), "--overwrite"]) == 0
    assert (project / "exports" / "v0" / EXPORT_MARKER).is_file()


# ------------------------------------------------------------------------------- changed volumes


def test_a_volume_changed_after_add_is_refused_everywhere_with_a_sentence(
    project, tmp_path, capsys
):
    original = (tmp_path / "a.nii.gz").read_bytes()
    scan(tmp_path / "a.nii.gz", seed=99, spacing=3.0)  # same shape, other voxels and affine
    for command in (
        ["project", "export", str(project), "--out", str(tmp_path / "out")],
        ["project", "queue", str(project), "--volume", "a", "--n", "2", "--patch", "8"],
    ):
        assert main(command) == 2
        err = errors(capsys)
        assert "volume 'a' (#1) at" in err and "changed since it was added" in err
        assert "napari-pvs project add" in err
    assert not (tmp_path / "out").exists()
    with Project.open(project) as opened:
        with pytest.raises(ValueError, match="changed since it was added"):
            opened.accept("a", (8, 8, 8), (16, 16, 16), np.zeros((8, 8, 8), np.uint8))
        with pytest.raises(ValueError, match="changed since it was added"):
            opened.predict("a")
        assert not opened.check_volume("a") and opened.check_volume("b")
        opened.accept("b", (8, 8, 8), (16, 16, 16), np.zeros((8, 8, 8), np.uint8))  # unaffected
    (tmp_path / "a.nii.gz").write_bytes(original)  # the original back (a new mtime): fine
    with Project.open(project) as opened:
        assert opened.check_volume("a")
        assert opened.open_volume("a").shape == SHAPE


def test_a_partial_prediction_of_another_input_is_refused_never_resumed(tmp_path):
    import threading

    from napari_pvs.inference import Predictor
    from napari_pvs.progress import Cancelled
    from tiny_models import tiny_unet

    volume = np.random.default_rng(4).normal(100, 20, (48, 24, 20)).astype(np.float32)
    flipped = np.flip(volume, axis=0).copy()  # the same voxels upside down: same range
    options = dict(window=16, overlap=0.25, batch=2, chunks=12, device="cpu")
    cancel = threading.Event()

    def stop_midway(done, total, message):
        if done >= 0.5 * total:
            cancel.set()

    out = tmp_path / "pred.zarr"
    with pytest.raises(Cancelled):
        Predictor(tiny_unet(), **options).predict(volume, out, progress=stop_midway, cancel=cancel)
    with pytest.raises(ValueError, match=r"holds a prediction from a different run .*input"):
        Predictor(tiny_unet(), **options).predict(flipped, out)
    summary = Predictor(tiny_unet(), **options).predict(volume, out)  # the same input resumes
    assert summary.chunks_skipped > 0


# ------------------------------------------------------------------------------- checks first


def test_the_api_checks_names_and_sizes_like_the_cli(project, tmp_path):
    import nibabel as nib

    tiny = tmp_path / "tiny.nii"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), str(tiny))
    with Project.open(project) as opened:
        with pytest.raises(ValueError, match="fewer than one 8\\^3 patch"):
            opened.add_volume(tiny)
        with pytest.raises(ValueError, match="'bogus' is not a strategy"):
            opened.rank("a", strategy="bogus")
        with pytest.raises(ValueError, match="--n must be a whole number of at least 1, got 0"):
            opened.rank("a", n=0)
        for patch in (0, 3, 100000):
            with pytest.raises(ValueError, match="--patch must be between 8 and 18 voxels"):
                opened.rank("a", patch=patch)
        with pytest.raises(ValueError, match="'bogus' is not a strategy"):
            opened.update_settings(strategy="bogus")
        with pytest.raises(ValueError, match="setting n=0 is not valid"):
            opened.update_settings(n=0)
        assert [v.name for v in opened.volumes()] == ["a", "b"]
        assert opened.queue() == []
    assert list(project.glob("predictions/*/*.zarr")) == []  # refused before predicting


@pytest.mark.parametrize(
    "extra, said",
    [
        (["--strategy", "bogus"], "'bogus' is not a strategy"),
        (["--n", "0"], "--n must be a whole number of at least 1"),
        (["--patch", "0"], "--patch must be between 8 and 32 voxels"),
        (["--patch", "3"], "--patch must be between 8 and 32 voxels"),
        (["--patch", "100000"], "--patch must be between 8 and 32 voxels"),
        (["--steps", "0"], "--steps must be a whole number of at least 1"),
    ],
)
def test_round_refuses_bad_arguments_before_any_work(project, capsys, extra, said):
    assert main(["round", str(project), "--device", "cpu", *extra]) == 2
    assert said in errors(capsys)
    with Project.open(project, readonly=True) as opened:
        assert opened.rounds() == [] and len(opened.versions()) == 1


def test_every_reader_refuses_a_zero_size_volume(tmp_path):
    import nibabel as nib
    import zarr

    empty_nii = tmp_path / "empty.nii"
    nib.save(nib.Nifti1Image(np.zeros((0, 10, 10), np.float32), np.eye(4)), str(empty_nii))
    empty_zarr = tmp_path / "empty.zarr"
    zarr.open_array(str(empty_zarr), mode="w", shape=(10, 0, 10), chunks=(4, 4, 4), dtype="u1")
    for path in (empty_nii, empty_zarr):
        for reader in (io.open_volume, io.open_labels):
            with pytest.raises(ValueError, match="is empty"):
                reader(path)


def test_opening_a_huge_store_reads_only_metadata_and_a_bounded_sample(tmp_path):
    import time

    import zarr

    big = zarr.open_array(str(tmp_path / "big.zarr"), mode="w", shape=(4096,) * 3,
                          chunks=(128,) * 3, dtype="float32", zarr_format=2)  # fmt: skip
    big[:64, :64, :64] = 7
    started = time.monotonic()
    assert io.open_volume(tmp_path / "big.zarr").shape == (4096,) * 3
    assert time.monotonic() - started < 2
    big[4000, 4000, 4000] = np.nan  # in the last chunk, which the sample reads
    with pytest.raises(ValueError, match="NaN or infinite"):
        io.open_volume(tmp_path / "big.zarr")
    zarr.open_array(str(tmp_path / "huge.zarr"), mode="w", shape=(10**6,) * 3,
                    chunks=(64,) * 3, dtype="float32", zarr_format=2)  # fmt: skip
    started = time.monotonic()
    with pytest.raises(ValueError, match="more than this machine could hold or process"):
        io.open_volume(tmp_path / "huge.zarr")
    assert time.monotonic() - started < 2


# ------------------------------------------------------------------------------- killed round

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


def test_a_killed_round_is_interrupted_and_cleaned_at_the_next_open(project, tmp_path, capsys):
    import json
    import os
    import signal
    import subprocess
    import sys

    from napari_pvs import atomic

    with Project.open(project) as opened:  # enough training patches for a round to start
        for k in range(1, 6):
            box = (0, 8, 2 * k), (8, 16, 2 * k + 8)
            opened.accept("a", *box, np.zeros((8, 8, 8), np.uint8))
    src = str(Path(io.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": src}
    result = subprocess.run([sys.executable, "-c", CHILD_ROUND, str(project)], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert any((project / "rounds").glob("r*/train"))  # the killed round's work folder
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    stale = atomic.temp_path(project / "models" / "v9.safetensors")
    stale = stale.with_name(stale.name.replace(f"-{os.getpid()}-", f"-{dead}-"))
    stale.write_bytes(b"half a checkpoint")  # a temporary of a dead process
    live = atomic.temp_path(project / "exports" / "v0")
    live.write_bytes(b"being written")  # this (live) process's: kept
    assert main(["project", "status", str(project), "--json"]) == 0
    rounds = json.loads(capsys.readouterr().out)["rounds"]
    assert rounds[-1]["status"] == "interrupted"
    assert not any((project / "rounds").glob("r*/train")) and not stale.exists()
    assert live.exists()
    with Project.open(project) as opened:
        assert opened.current_version().version == 0
        assert opened.round(rounds[-1]["id"]).status == "interrupted"


# ------------------------------------------------------------------------------- damage


def test_a_damaged_label_chunk_blocks_only_its_volume_until_repair(project, tmp_path, capsys):
    store = project / "volumes" / "1" / "labels.zarr"
    chunk = store / "labels" / "c" / "0" / "0" / "0"
    assert chunk.is_file()
    chunk.write_bytes(b"garbage" * 8)
    labels = tmp_path / "ones.npy"
    np.save(labels, np.ones((8, 8, 8), np.uint8))
    box = ["0", "0", "8", "8", "8", "16"]
    accept = ["project", "accept", str(project)]
    assert main([*accept, "a", "--box", *box, "--labels", str(labels)]) == 2
    err = errors(capsys)
    assert str(chunk) in err and "napari-pvs project repair" in err
    assert main([*accept, "b", "--box", *box, "--labels", str(labels)]) == 0  # other volume
    assert main([*accept, "a", "--box", *box, "--labels", str(labels)]) == 2  # read-only
    assert "read-only until you run" in errors(capsys)
    with Project.open(project) as opened:  # opens; the failed accepts never commit later
        assert [a.volume_id for a in opened.annotations()] == [1, 2, 2]
    assert main(["project", "repair", str(project)]) == 0
    out = capsys.readouterr().out
    assert "moved 1 damaged part(s) aside" in out and "annotations 1 overlapped" in out
    assert (project / "damaged").is_dir() and not chunk.exists()
    assert main([*accept, "a", "--box", *box, "--labels", str(labels)]) == 0
    with Project.open(project) as opened:
        reviewed = np.asarray(opened.labels("a")["reviewed"][:])
        assert reviewed[0:8, 0:8, 8:16].all() and not reviewed[0:8, 0:8, 0:8].any()


def test_a_read_only_ledger_is_named_never_called_damaged(project, tmp_path, capsys):
    import sqlite3

    from napari_pvs import atomic

    with Project.open(project) as opened:
        original = opened._ledger._db
        opened._ledger._db = sqlite3.connect(f"file:{project / 'ledger.sqlite'}?mode=ro",
                                             uri=True, check_same_thread=False)  # fmt: skip
        try:
            with pytest.raises(atomic.OutputError) as caught:
                opened.accept("b", (8, 8, 8), (16, 16, 16), np.zeros((8, 8, 8), np.uint8))
        finally:
            opened._ledger._db.close()
            opened._ledger._db = original
    message = str(caught.value)
    assert "ledger.sqlite" in message and "read-only" in message and "damaged" not in message


def test_project_remove_archives_the_volume_labels(project, capsys):
    with Project.open(project) as opened:
        before = np.asarray(opened.labels("b")["labels"][:])
    assert main(["project", "remove", str(project), "b"]) == 0
    assert "archive" in capsys.readouterr().out
    archive = project / "archive" / "2-b"
    assert not (project / "volumes" / "2" / "labels.zarr").exists()
    import zarr

    kept = np.asarray(zarr.open_group(str(archive / "labels.zarr"), mode="r")["labels"][:])
    np.testing.assert_array_equal(kept, before)
    assert (kept[0:8, 0:8, 0:8] == 0).all()  # the reviewed patch
    with Project.open(project) as opened:  # reopens (no 'missing store' repair) and works on
        assert [v.name for v in opened.volumes()] == ["a"]
        assert [a.volume_id for a in opened.annotations()] == [1, 2]
        opened.accept("a", (8, 8, 8), (16, 16, 16), np.zeros((8, 8, 8), np.uint8))

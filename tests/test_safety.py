"""Issue 11, one test per defect: nothing a user saved is lost, nothing wrong is silent, a
damaged or hostile file is one sentence. Each test failed on the code before the fix.

Kill and hostile-checkpoint tests run in subprocesses (the latter under an address-space cap,
so a checkpoint that tries to allocate gigabytes cannot take the machine down).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import save_file

import napari_pvs
from napari_pvs import io
from napari_pvs.cli import main
from napari_pvs.inference import Predictor
from napari_pvs.models.checkpoint import (
    METADATA_KEY,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from napari_pvs.progress import Cancelled
from napari_pvs.training import TrainingVolume
from tiny_models import TinyConv, tiny_checkpoint

#: Children run the very package this test imported.
SRC = str(Path(napari_pvs.__file__).resolve().parents[1])
TESTS = str(Path(__file__).resolve().parent)
COMMON = ["--device", "cpu", "--window", "16", "--batch", "2"]
OPTIONS = {"window": 16, "batch": 2, "device": "cpu", "chunks": 12}
SHAPE = (36, 36, 36)


def volume_array(shape=(20, 24, 18), seed: int = 0) -> np.ndarray:
    volume = np.random.default_rng(seed).normal(100.0, 20.0, shape).astype(np.float32)
    volume[:, :2] = 0
    return volume


def pvs_labels(shape=(20, 24, 18)) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    labels[4:12, 8, 8] = 1
    labels[10, 4:14, 14] = 1
    return labels


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (or the file itself) by relative path -> bytes."""
    if folder.is_file():
        return {folder.name: folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def corrupt_one_chunk(store: Path) -> None:
    chunk = next(p for p in sorted((store / "0").rglob("*")) if p.is_file() and "." not in p.name)
    data = bytearray(chunk.read_bytes())
    data[4:24] = b"x" * 20
    chunk.write_bytes(bytes(data))


def child(code: str, *args: str, memory_mb: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{SRC}:{TESTS}", "OMP_WAIT_POLICY": "PASSIVE"}
    prelude = ""
    if memory_mb:
        prelude = (
            "import resource\n"
            f"resource.setrlimit(resource.RLIMIT_AS, ({memory_mb << 20}, {memory_mb << 20}))\n"
        )
    return subprocess.Popen(
        [sys.executable, "-c", prelude + textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_ready(process: subprocess.Popen) -> None:
    line = process.stdout.readline().strip()
    if line != "ready":
        process.kill()
        raise AssertionError(f"child did not get ready: {line!r}: {process.stderr.read()}")


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture()
def scan(tmp_path) -> Path:
    return io.save_nifti(tmp_path / "scan_T2w.nii.gz", volume_array(), np.diag([2, 2, 2, 1.0]))


# ============================================================================ data lost


def test_predict_onto_its_own_input_is_refused_and_the_scan_kept(scan, checkpoint, capsys):
    before = scan.read_bytes()
    for extra in ([], ["--overwrite"]):
        args = ["predict", str(scan), "--out", str(scan), "--model", str(checkpoint), *COMMON]
        assert main(args + extra) == 2
        assert "refusing to write onto an input" in capsys.readouterr().err
    assert scan.read_bytes() == before


def test_predict_does_not_replace_an_existing_nifti_without_overwrite(scan, checkpoint, capsys):
    existing = scan.parent / "seg.nii.gz"
    existing.write_bytes(b"the user's segmentation")
    args = ["predict", str(scan), "--out", str(existing), "--model", str(checkpoint), *COMMON]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert existing.read_bytes() == b"the user's segmentation"
    assert not (scan.parent / "seg.zarr").exists()  # refused before any work


def test_predict_and_frangi_with_overwrite_onto_the_input_store_keep_it(tmp_path, checkpoint):
    image = io.save_ome_zarr(
        tmp_path / "in.zarr", volume_array(), labels={"pvs": pvs_labels()}, levels=1, modality="T2"
    )
    before = snapshot(image)
    predict = ["predict", str(image), "--out", str(image), "--model", str(checkpoint), *COMMON]
    assert main([*predict, "--overwrite"]) == 2
    assert main(["frangi", str(image), "--out", str(image), "--overwrite"]) == 2
    # another image store is not a prediction store: never replaced by predict --overwrite
    other = io.save_ome_zarr(tmp_path / "other.zarr", volume_array(), levels=1)
    other_before = snapshot(other)
    predict[3] = str(other)
    assert main([*predict, "--overwrite"]) == 2
    assert snapshot(image) == before and snapshot(other) == other_before


def _train_args(image: Path, out: Path, epochs: int = 1) -> list[str]:
    return [
        "train", "--images", str(image), "--model", "unet", "--out", str(out),
        "--config", '{"channels": [4, 8], "num_res_units": 1, "feature_channels": 4}',
        "--epochs", str(epochs), "--steps-per-epoch", "2", "--patch", "16", "--device", "cpu",
    ]  # fmt: skip


@pytest.fixture()
def labelled_image(tmp_path) -> Path:
    return io.save_ome_zarr(
        tmp_path / "t2.zarr", volume_array(), labels={"pvs": pvs_labels()}, levels=1, modality="T2"
    )


def test_train_refuses_an_existing_checkpoint_and_an_unwritable_folder_before_training(
    labelled_image, checkpoint, tmp_path, monkeypatch, capsys
):
    import napari_pvs.training

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(napari_pvs.training, "fit", no_training)
    existing = tmp_path / "model.safetensors"
    shutil.copy(checkpoint, existing)
    before = existing.read_bytes()
    assert main(_train_args(labelled_image, existing)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert existing.read_bytes() == before
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    assert main(_train_args(labelled_image, blocker / "model.safetensors")) == 2
    assert "cannot write in" in capsys.readouterr().err


def test_train_overwrite_keeps_the_old_checkpoint_until_the_new_run_finishes(
    labelled_image, checkpoint, tmp_path, monkeypatch, capsys
):
    import napari_pvs.training

    out = tmp_path / "model.safetensors"
    shutil.copy(checkpoint, out)
    before = out.read_bytes()
    real_fit = napari_pvs.training.fit

    def interrupted_fit(*args, progress, **kwargs):
        def stop_in_second_epoch(done, total, message):
            if done == 3:  # epoch 0 (2 steps) is saved; stop in epoch 1
                raise KeyboardInterrupt

        return real_fit(*args, progress=stop_in_second_epoch, **kwargs)

    monkeypatch.setattr(napari_pvs.training, "fit", interrupted_fit)
    assert main([*_train_args(labelled_image, out, epochs=2), "--overwrite"]) == 130
    assert out.read_bytes() == before  # the failed overwrite left the old checkpoint whole
    monkeypatch.setattr(napari_pvs.training, "fit", real_fit)
    capsys.readouterr()
    assert main([*_train_args(labelled_image, out, epochs=2), "--overwrite"]) == 0
    assert out.read_bytes() != before
    history = read_checkpoint(tmp_path / "model.last.safetensors")[1]["training"]["resume"]
    assert [h["epoch"] for h in history["history"]] == [0, 1]  # epoch 0 resumed, not rerun
    assert sorted(p.name for p in tmp_path.glob("model*")) == [
        "model.last.safetensors",
        "model.safetensors",
    ]
    # the same command without --overwrite resumes (nothing left to do); other settings refused
    assert main(_train_args(labelled_image, out, epochs=2)) == 0
    assert main([*_train_args(labelled_image, out, epochs=2), "--lr", "0.1"]) == 2
    assert "different training run" in capsys.readouterr().err


def test_failed_convert_overwrite_keeps_the_good_store(tmp_path, capsys):
    good = io.save_nifti(tmp_path / "good.nii.gz", volume_array((24, 24, 24)), np.eye(4))
    out = tmp_path / "out.zarr"
    assert main(["convert", str(good), str(out), "--levels", "1"]) == 0
    before = snapshot(out)
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(raw[: len(raw) // 2])
    capsys.readouterr()
    assert main(["convert", str(truncated), str(out), "--overwrite", "--levels", "1"]) == 2
    assert "truncated.nii.gz is damaged" in capsys.readouterr().err
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "good.nii.gz",
        "out.zarr",
        "truncated.nii.gz",
    ]


HALF_WRITE = """
import inspect, sys, time
from pathlib import Path
import nibabel
import numpy as np
from napari_pvs import io, _writer

def half_then_hang(image, filename):  # a write cut off by a kill: half the bytes, then nothing
    Path(filename).write_bytes(b"\\x1f\\x8b" + b"h" * 500)
    print("ready", flush=True)
    time.sleep(60)

nibabel.save = half_then_hang
target, how = Path(sys.argv[1]), sys.argv[2]
labels = np.zeros((6, 6, 6), np.uint8)
def replace(function):  # the code before this issue had no overwrite flag (it replaced)
    return {"overwrite": True} if "overwrite" in inspect.signature(function).parameters else {}

if how == "save_nifti":
    io.save_nifti(target, labels, np.eye(4), **replace(io.save_nifti))
elif how == "write_labels":
    io.write_labels(target, "pvs", labels, **replace(io.write_labels))
else:
    _writer.save_labels(target, labels, {"name": "pvs", "metadata": {}})
"""


@pytest.mark.parametrize("how", ["save_nifti", "write_labels", "napari_writer"])
def test_kill_during_a_nifti_write_keeps_the_old_file(tmp_path, how):
    target = io.save_nifti(tmp_path / "labels.nii.gz", pvs_labels(), np.eye(4))
    before = target.read_bytes()
    process = child(HALF_WRITE, str(target), how)
    wait_ready(process)
    kill(process)
    assert target.read_bytes() == before
    np.testing.assert_array_equal(io.open_labels(target).data.compute(), pvs_labels())


def test_cohort_with_one_damaged_volume_writes_the_others_and_lists_it(
    tmp_path, checkpoint, capsys, monkeypatch
):
    inputs = [
        io.save_ome_zarr(tmp_path / f"sub-{i}_T2w.zarr", volume_array(seed=i), levels=1, chunks=8)
        for i in range(3)
    ]
    corrupt_one_chunk(inputs[1])
    out = tmp_path / "preds"
    from distributed import Client

    import napari_pvs.cohort

    # an in-process cluster: the same task and result handling, without worker start-up
    monkeypatch.setattr(
        napari_pvs.cohort,
        "connect",
        lambda *a, **k: Client(processes=False, n_workers=1, threads_per_worker=1),
    )
    args = ["predict", *map(str, inputs), "--out", str(out), "--model", str(checkpoint)]
    assert main([*args, *COMMON]) == 2
    err = capsys.readouterr().err
    assert "1 of 3 volume(s) failed" in err and "sub-1_T2w.zarr" in err and "is damaged" in err
    for i in (0, 2):
        group = zarr.open_group(str(out / f"sub-{i}_T2w.zarr"), mode="r")
        assert group.attrs["napari_pvs"]["complete"]


PAUSED_PREDICT = """
import sys, time
import numpy as np
from napari_pvs.inference import Predictor
from tiny_models import TinyConv

out = sys.argv[1]

def pause(done, total, message):
    if done >= 8:
        print("ready", flush=True)
        time.sleep(60)

volume = np.random.default_rng(0).normal(100, 20, (36, 36, 36)).astype(np.float32)
Predictor(TinyConv(), window=16, batch=2, device="cpu", chunks=12).predict(
    volume, out, progress=pause
)
"""


def _predict(out: Path, overwrite: bool = False, **options):
    volume = np.random.default_rng(0).normal(100, 20, SHAPE).astype(np.float32)
    return Predictor(TinyConv(), **{**OPTIONS, **options}).predict(
        volume, out, overwrite=overwrite
    )


def _arrays(store: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")
    return {name: np.asarray(array[...]) for name, array in group.arrays()}


def test_a_second_run_or_an_overwrite_during_a_run_is_refused_and_never_mixes(tmp_path):
    from napari_pvs.atomic import Locked

    out = tmp_path / "p.zarr"
    running = child(PAUSED_PREDICT, str(out))
    try:
        wait_ready(running)
        with pytest.raises(Locked, match=f"being written by process {running.pid}"):
            _predict(out)
        with pytest.raises(Locked, match=f"being written by process {running.pid}"):
            _predict(out, overwrite=True, mc_samples=2)  # was: KeyError 'entropy' in the first
    finally:
        kill(running)
    # the killed run's lock is taken over; a complete store from other settings is produced
    _predict(out, overwrite=True, mc_samples=2)
    _predict(tmp_path / "clean.zarr", mc_samples=2)
    got, clean = _arrays(out), _arrays(tmp_path / "clean.zarr")
    assert set(got) == set(clean)
    for name in clean:
        np.testing.assert_array_equal(got[name], clean[name])


def test_an_overwrite_that_stops_leaves_the_complete_store_from_other_settings(tmp_path):
    out = tmp_path / "p.zarr"
    _predict(out)
    before = snapshot(out)
    cancel = threading.Event()

    def stop_after_a_few(done, total, message):
        if done >= 6:
            cancel.set()

    volume = np.random.default_rng(0).normal(100, 20, SHAPE).astype(np.float32)
    other = Predictor(TinyConv(), **{**OPTIONS, "threshold": 0.4})
    with pytest.raises(Cancelled):
        other.predict(volume, out, overwrite=True, progress=stop_after_a_few, cancel=cancel)
    assert snapshot(out) == before  # still whole, still complete, still the old settings
    resumed = other.predict(volume, out, overwrite=True)  # resumes the staged store
    assert resumed.chunks_skipped > 0
    _predict(tmp_path / "clean.zarr", threshold=0.4)
    got, clean = _arrays(out), _arrays(tmp_path / "clean.zarr")
    for name in clean:
        np.testing.assert_array_equal(got[name], clean[name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.zarr", "p.zarr"]


# ============================================================================ wrong results


def test_evaluate_does_not_score_unlabelled_voxels(tmp_path, capsys):
    from napari_pvs.metrics import evaluate

    truth = pvs_labels()
    gt = truth.copy()
    gt[:, 12:] = 255  # half the volume not labelled ...
    gt[4:12, 8, 8] = 1  # ... (the PVS in the labelled half stays)
    pred = (gt == 1).astype(np.uint8)
    pred[2:6, 20, 4] = 1  # a prediction inside the unlabelled half is not a false positive
    result = evaluate(pred, gt)
    assert result["dice"] == 1.0 and result["cluster"]["f1"] == 1.0
    assert result["unlabelled_voxels"] == int((gt == 255).sum())
    gt_path = io.save_nifti(tmp_path / "gt.nii.gz", gt, np.eye(4))
    pred_path = io.save_nifti(tmp_path / "pred.nii.gz", pred, np.eye(4))
    out = tmp_path / "m.json"
    assert main(["evaluate", str(pred_path), str(gt_path), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["dice"] == 1.0
    assert "not scored" in capsys.readouterr().out


def test_labels_outside_0_1_255_are_refused_and_labels_without_pvs_warned(
    tmp_path, monkeypatch, capsys
):
    image = volume_array()
    coded_2 = pvs_labels() * 2
    with pytest.raises(ValueError, match=r"hold values 2 besides \[0\]"):
        TrainingVolume(image, coded_2, "T2", name="sub-01")
    with pytest.warns(io.LabelWarning, match="no PVS voxel"):
        TrainingVolume(image, np.where(pvs_labels() == 1, 255, 0).astype(np.uint8), "T2")
    gt = io.save_nifti(tmp_path / "gt.nii.gz", coded_2, np.eye(4))
    pred = io.save_nifti(tmp_path / "pred.nii.gz", pvs_labels(), np.eye(4))
    assert main(["evaluate", str(pred), str(gt), "--out", str(tmp_path / "m.json")]) == 2
    assert "hold values 2" in capsys.readouterr().err
    # train says so before training: 0/255 labels carry no PVS
    import napari_pvs.training

    monkeypatch.setattr(
        napari_pvs.training,
        "fit",
        lambda *a, **k: types.SimpleNamespace(
            best_dice=0.0, best_epoch=0, epochs_run=0, stopped_early=False
        ),
    )
    only_255 = np.where(pvs_labels() == 1, 255, 0).astype(np.uint8)
    store = io.save_ome_zarr(tmp_path / "t.zarr", image, labels={"pvs": only_255}, levels=1)
    assert main(_train_args(store, tmp_path / "m.safetensors")) == 0
    assert "napari-pvs train: warning: labels of" in capsys.readouterr().err


def test_a_checkpoint_rule_out_of_range_is_refused(tmp_path, checkpoint):
    tensors, meta = read_checkpoint(checkpoint)
    for key, value in (("min_cluster_mm3", 1e308), ("threshold", float("nan")), ("tta", "abc")):
        bad = json.loads(json.dumps(meta))
        bad["segmentation"][key] = value
        path = tmp_path / f"{key}.safetensors"
        save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(bad)})
        with pytest.raises(ValueError, match=f"{path.name}.*{key}"):
            load_checkpoint(path)


# ============================================================================ tracebacks


def test_damaged_files_are_one_sentence_naming_the_file(tmp_path, capsys):
    from napari_pvs._reader import read_paths

    cases = {}
    for version in ("0.4", "0.5"):  # blosc (zarr v2) and zstd (zarr v3) chunks
        store = io.save_ome_zarr(
            tmp_path / f"v{version}.zarr", volume_array(), levels=1, ome_version=version
        )
        corrupt_one_chunk(store)
        cases[store.name] = store
    good = io.save_nifti(tmp_path / "good.nii.gz", volume_array(), np.eye(4))
    raw = good.read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(raw[: len(raw) * 2 // 3])
    (tmp_path / "header.nii.gz").write_bytes(raw[:40])
    cases["truncated.nii.gz"] = tmp_path / "truncated.nii.gz"
    cases["header.nii.gz"] = tmp_path / "header.nii.gz"
    gt = io.save_nifti(tmp_path / "gt.nii.gz", pvs_labels(), np.eye(4))
    for name, path in cases.items():
        out = tmp_path / f"{name}.json"
        assert main(["evaluate", str(path), str(gt), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"napari-pvs evaluate: error: {path} is damaged"), err
        assert "restore it from a backup" in err and "\n" not in err
        with pytest.raises(io.DamagedFileError, match=f"{name} is damaged"):  # the same sentence
            for layer in read_paths(str(path)):
                np.asarray(layer[0].compute() if hasattr(layer[0], "compute") else layer[0][0])


def test_hostile_checkpoint_metadata_is_refused_naming_the_file(tmp_path, checkpoint):
    tensors, meta = read_checkpoint(checkpoint)
    texts = {
        "list": json.dumps([meta]),
        "deep": "[" * 200_000 + "]" * 200_000,
        "version": json.dumps({**meta, "format_version": "abc"}),
        "training": json.dumps({**meta, "training": ["x"]}),
    }
    for name, text in texts.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={METADATA_KEY: text})
        with pytest.raises(ValueError, match=f"{name}.safetensors"):
            load_checkpoint(path)


# ============================================================================ checkpoints

HOSTILE_LOAD = """
import sys
from napari_pvs.models.checkpoint import load_checkpoint
for path in sys.argv[1:]:
    try:
        load_checkpoint(path)
        print("LOADED", path)
    except ValueError as exc:
        print("REFUSED", exc)
"""


def test_a_checkpoint_declaring_a_huge_model_is_refused_before_allocating(tmp_path, checkpoint):
    tensors, meta = read_checkpoint(checkpoint)
    paths = []
    for name, channels in (("wide", [32768, 32768]), ("big", [4096, 4096, 4096])):
        hostile = json.loads(json.dumps(meta))
        hostile["model"]["config"]["channels"] = channels
        paths.append(tmp_path / f"{name}.safetensors")
        save_file(tensors, str(paths[-1]), metadata={METADATA_KEY: json.dumps(hostile)})
    process = child(HOSTILE_LOAD, *map(str, paths), memory_mb=3000)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("REFUSED") for line in lines), stdout
    assert "channels=32768 is out of bounds" in lines[0] and "wide.safetensors" in lines[0]
    assert "parameters, more than" in lines[1] and "big.safetensors" in lines[1]


def test_loading_a_checkpoint_never_loads_a_text_model(tmp_path, monkeypatch):
    from napari_pvs.models import build_model
    from napari_pvs.models import text as text_module

    torch.manual_seed(0)
    config = {"channels": [4, 8], "graph_layers": 1, "k": 4, "heads": 2}
    embeddings = np.random.default_rng(0).normal(size=(3, 8, 384)).astype(np.float32)
    model = build_model("cross_modal", prompt_embeddings=embeddings, **config)
    model.config["text_model"] = str(tmp_path / "evil-model")  # a path the file names
    path = save_checkpoint(model, tmp_path / "cm.safetensors")
    calls = []
    monkeypatch.setattr(text_module, "encode_texts", lambda *a, **k: calls.append(a))
    loaded, _ = load_checkpoint(path)  # embeddings from the file; the path is never followed
    assert torch.equal(loaded.prompt_embeddings, model.prompt_embeddings)
    tensors, meta = read_checkpoint(path)
    del tensors["prompt_embeddings"]
    stripped = {k: v for k, v in tensors.items()}
    meta["tensor_digest"] = __import__(
        "napari_pvs.models.checkpoint", fromlist=["tensor_digest"]
    ).tensor_digest(stripped)
    no_embeddings = tmp_path / "no-embeddings.safetensors"
    save_file(stripped, str(no_embeddings), metadata={METADATA_KEY: json.dumps(meta)})
    with pytest.raises(ValueError, match="holds no prompt embeddings"):
        load_checkpoint(no_embeddings)
    assert calls == []


def test_label_names_from_a_store_must_be_plain(tmp_path):
    victim = io.save_ome_zarr(
        tmp_path / "victim.zarr", volume_array(), labels={"pvs": pvs_labels()}, levels=1
    )
    store = io.save_ome_zarr(
        tmp_path / "s.zarr", volume_array(), labels={"pvs": pvs_labels()}, levels=1
    )
    labels = zarr.open_group(str(store / "labels"), mode="r+")
    labels.attrs["labels"] = ["../../victim.zarr/labels/pvs"]
    with pytest.raises(ValueError, match="not a plain name"):
        io.open_volume(store)
    with pytest.raises(ValueError, match="not a plain name"):
        io.open_labels(store, "../../victim.zarr/labels/pvs")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert io.open_labels(victim).shape == pvs_labels().shape


def _with_optimizer_state(checkpoint: Path, path: Path, state: dict[str, torch.Tensor]) -> Path:
    """``checkpoint``'s weights plus ``state`` under ``optimizer/``, with a matching digest."""
    from napari_pvs.models.checkpoint import OPTIMIZER_PREFIX, tensor_digest

    tensors, meta = read_checkpoint(checkpoint)
    tensors.update({OPTIMIZER_PREFIX + k: v for k, v in state.items()})
    meta["tensor_digest"] = tensor_digest(tensors)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    return path


def test_optimizer_tensors_are_checked_against_the_model_before_reading(tmp_path, checkpoint):
    first = next(iter(load_checkpoint(checkpoint)[0].parameters())).shape
    fitting = _with_optimizer_state(checkpoint, tmp_path / "ok.safetensors", {
        "0.step": torch.tensor(3.0), "0.exp_avg": torch.zeros(first),
    })
    load_checkpoint(fitting)  # a real resumable layout loads
    cases = {
        "shape": ({"0.exp_avg": torch.zeros(512, 512)}, "of shape (512, 512), but parameter 0"),
        "index": ({"999.exp_avg": torch.zeros(2)}, "belongs to no parameter"),
        "name": ({"exp_avg": torch.zeros(2)}, "belongs to no parameter"),
    }
    for name, (state, message) in cases.items():
        path = _with_optimizer_state(checkpoint, tmp_path / f"{name}.safetensors", state)
        with pytest.raises(ValueError, match=re.escape(message)) as error:
            load_checkpoint(path)
        assert f"{name}.safetensors" in str(error.value)


def test_a_checkpoint_declaring_gigabytes_of_optimizer_state_is_refused_in_bounded_memory(
    tmp_path, checkpoint
):
    """A sparse file whose header declares a 16 GiB optimizer tensor: refused from the header,
    under a 2 GB address-space cap (reading it would need 16 GiB)."""
    tensors, meta = read_checkpoint(checkpoint)
    header: dict = {"__metadata__": {METADATA_KEY: json.dumps(meta)}}
    offset = 0
    blobs = []
    for name, tensor in sorted(tensors.items()):
        data = tensor.numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    huge = 4 * 65536 * 65536
    header["optimizer/0.exp_avg"] = {"dtype": "F32", "shape": [65536, 65536],
                                     "data_offsets": [offset, offset + huge]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "huge-optimizer.safetensors"
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))
        handle.truncate(8 + len(text) + offset + huge)  # sparse: no disk, no memory
    process = child(HOSTILE_LOAD, str(path), memory_mb=2000)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert stdout.startswith("REFUSED") and "huge-optimizer.safetensors" in stdout, stdout
    assert "(65536, 65536)" in stdout


def test_create_retried_after_a_killed_contents_swap(tmp_path):
    """A create killed while swapping contents into an existing folder (a mount point) leaves
    swap folders inside; retrying settles them first instead of calling the folder full."""
    from napari_pvs import atomic
    from napari_pvs.atomic.names import HOST_TAG
    from napari_pvs.project import Project
    from tiny_models import tiny_checkpoint

    target = tmp_path / "mount"
    target.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    staging = target / f"{atomic.SWAP_MARK}abc123-staging-{HOST_TAG}-{dead.pid}"
    (staging / "models").mkdir(parents=True)
    (staging / "ledger.sqlite").write_bytes(b"half a ledger")
    model = tiny_checkpoint(tmp_path / "tiny.safetensors")
    with Project.create(target, model=model) as project:
        assert project.current_version().version == 0
    assert not [p for p in target.iterdir() if p.name.startswith(atomic.SWAP_MARK)]

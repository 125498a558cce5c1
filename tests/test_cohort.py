"""Cohorts on dask.distributed: one output per input, one model load per worker."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zarr

from napari_pvs.cohort import modality_warning, output_name, predict_cohort
from napari_pvs.inference import Predictor
from napari_pvs.io import open_volume, save_nifti, save_ome_zarr
from tiny_models import tiny_checkpoint

OPTIONS = {"window": 16, "batch": 2, "device": "cpu"}


@pytest.fixture()
def checkpoint(tmp_path):
    return tiny_checkpoint(tmp_path / "tiny.safetensors")


def test_cohort_on_a_two_worker_local_cluster(tmp_path, checkpoint):
    rng = np.random.default_rng(0)
    inputs = []
    for i, shape in enumerate([(20, 24, 18), (17, 30, 21), (24, 16, 20)]):
        volume = rng.normal(100, 20, shape).astype(np.float32)
        if i == 1:
            inputs.append(save_nifti(tmp_path / f"sub-{i}_T2w.nii.gz", volume, np.eye(4)))
        else:
            inputs.append(save_ome_zarr(tmp_path / f"sub-{i}.ome.zarr", volume, levels=1))
    out = tmp_path / "preds"
    seen = []
    results = predict_cohort(
        inputs, out, model=str(checkpoint), options=OPTIONS, n_workers=2,
        progress=lambda done, total, msg: seen.append((done, total)),
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["sub-0.zarr", "sub-1_T2w.zarr", "sub-2.zarr"]
    assert seen[-1] == (3, 3)
    assert [r.input for r in results] == [str(p.resolve()) for p in inputs]
    assert all(r.error is None for r in results)
    assert len({r.worker_pid for r in results}) <= 2
    assert all(r.models_loaded == 1 for r in results)  # one load per worker, reused
    # each output equals an in-process prediction of the same volume
    from napari_pvs.models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    for path, result in zip(inputs, results, strict=True):
        volume = open_volume(path)
        group = zarr.open_group(result.out, mode="r")
        assert group["probability"].shape == volume.shape
        local = tmp_path / f"local-{output_name(path)}"
        Predictor(model, modality=volume.modality, **OPTIONS).predict(volume, local)
        expected = zarr.open_group(str(local), mode="r")["probability"][...]
        # Workers run with other torch thread counts; in bfloat16 (the default on CPUs that
        # multiply it in hardware) oneDNN's reductions then round differently: equal within
        # bfloat16's resolution (2**-8), not bit for bit.
        np.testing.assert_allclose(
            group["probability"][...].astype(np.float32), expected.astype(np.float32),
            atol=2**-8,
        )


def test_unreachable_scheduler_fails_fast_with_a_clear_message(tmp_path, checkpoint):
    volume = tmp_path / "v.nii.gz"
    save_nifti(volume, np.ones((4, 4, 4), np.float32), np.eye(4))
    started = time.monotonic()
    with pytest.raises(ValueError, match="could not reach the dask scheduler"):
        predict_cohort(
            [volume], tmp_path / "out", model=str(checkpoint), scheduler="tcp://127.0.0.1:9",
            timeout=2,
        )  # fmt: skip
    assert time.monotonic() - started < 15


def test_cohort_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        predict_cohort([tmp_path / "missing.nii.gz"], tmp_path / "out")
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        save_nifti(folder / "sub.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="same output"):
        predict_cohort([a / "sub.nii.gz", b / "sub.nii.gz"], tmp_path / "out")


def test_modality_warning_uses_checkpoint_metadata():
    meta = {"training": {"modalities": ["T2"]}}
    assert "trained on T2" in modality_warning(meta, "T1")
    assert modality_warning(meta, "T2") is None
    assert modality_warning({"training": {}}, "T1") is None  # unrecorded: nothing to warn about

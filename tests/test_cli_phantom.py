"""CLI round trip: phantom -> OME-Zarr -> frangi -> evaluate, against the Python API."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_pvs import io
from napari_pvs.cli import main
from napari_pvs.metrics import evaluate
from napari_pvs.models.frangi import frangi_segment, white_matter_mask
from napari_pvs.phantom import make_phantom

ARGS = ["--shape", "32", "40", "36", "--spacing", "2", "--seed", "5", "--severity", "1"]


@pytest.fixture(scope="module")
def phantom_zarr(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ph.zarr"
    assert main(["phantom", str(out), "--modality", "T2", *ARGS]) == 0
    return out


def test_phantom_writes_image_and_labels(phantom_zarr, capsys):
    reference = make_phantom((32, 40, 36), 2.0, "T2", seed=5, severity=1.0)
    volume = io.open_volume(phantom_zarr)
    assert volume.spacing == (2.0, 2.0, 2.0)
    assert volume.modality == "T2"
    assert set(volume.label_names) == {"pvs", "regions", "confounders"}
    np.testing.assert_allclose(volume.data.compute(), reference.image, rtol=1e-6)
    for name in ("pvs", "regions", "confounders"):
        stored = io.open_labels(phantom_zarr, name).data.compute()
        assert np.array_equal(stored, getattr(reference, name))


def test_frangi_and_evaluate_match_the_python_api(phantom_zarr, tmp_path, capsys):
    seg_path = tmp_path / "seg.zarr"
    frangi_args = ["--out", str(seg_path), "--mask", str(phantom_zarr), "--threshold", "0.03"]
    rc = main(["frangi", str(phantom_zarr), *frangi_args, "--sigmas", "0.8", "1.2"])
    assert rc == 0
    reference = make_phantom((32, 40, 36), 2.0, "T2", seed=5, severity=1.0)
    expected = frangi_segment(
        reference.image.astype(np.float32),
        reference.spacing,
        "T2",
        sigmas=(0.8, 1.2),
        threshold=0.03,
        mask=white_matter_mask(reference.regions),
    )
    written = io.open_labels(seg_path).data.compute()
    assert np.array_equal(written, expected)

    metrics_path = tmp_path / "metrics.json"
    options = ["--regions", str(phantom_zarr), "--out", str(metrics_path)]
    rc = main(["evaluate", str(seg_path), str(phantom_zarr), *options])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "white_matter" in printed
    result = json.loads(metrics_path.read_text())
    direct = evaluate(expected, reference.pvs, regions=reference.regions, spacing=(2, 2, 2))
    assert result["dice"] == pytest.approx(direct["dice"])
    assert result["cluster"] == direct["cluster"]
    assert (
        result["regions"]["basal_ganglia"]["count"] == direct["regions"]["basal_ganglia"]["count"]
    )


def test_evaluate_reads_nifti_prediction(phantom_zarr, tmp_path):
    gt = io.open_labels(phantom_zarr, "pvs").data.compute()
    pred_path = io.save_nifti(tmp_path / "pred.nii.gz", gt, np.diag([2.0, 2.0, 2.0, 1.0]))
    out = tmp_path / "m.json"
    assert main(["evaluate", str(pred_path), str(phantom_zarr), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["dice"] == 1.0 and result["cluster"]["f1"] == 1.0


def test_clear_errors(phantom_zarr, tmp_path, capsys):
    small = tmp_path / "small.zarr"
    assert main(["phantom", str(small), "--shape", "16", "16", "16", "--spacing", "2"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(small), str(phantom_zarr), "--out", str(tmp_path / "x.json")]) == 2
    assert "does not match" in capsys.readouterr().err
    assert main(["phantom", str(small), *ARGS]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["phantom", str(tmp_path / "b.zarr"), "--spacing", "1", "2"]) == 2
    assert main(["frangi", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "o.zarr")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_mni_without_nilearn_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import sys

    from napari_pvs.phantom import anatomy

    anatomy._load_mni.cache_clear()
    monkeypatch.setitem(sys.modules, "nilearn", None)
    assert main(["phantom", str(tmp_path / "m.zarr"), "--anatomy", "mni"]) == 2
    assert "napari-pvs[mni]" in capsys.readouterr().err

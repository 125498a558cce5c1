"""The headless loop from the README, end to end: phantom -> predict -> rank -> evaluate."""

from __future__ import annotations

import json

import numpy as np
import zarr

from napari_pvs import io
from napari_pvs.cli import main
from napari_pvs.metrics import evaluate
from napari_pvs.ranking import rank_patches
from tiny_models import tiny_checkpoint


def test_phantom_predict_rank_evaluate(tmp_path, capsys):
    checkpoint = tiny_checkpoint(tmp_path / "tiny.safetensors", channels=(4, 8, 16))
    phantom = tmp_path / "t2.zarr"
    store = tmp_path / "t2_pvs.zarr"
    assert main(["phantom", str(phantom), "--modality", "T2", "--shape", "40", "48", "40",
                 "--spacing", "2", "--seed", "5"]) == 0
    common = ["--model", str(checkpoint), "--device", "cpu", "--window", "32", "--batch", "2"]
    assert main(["predict", str(phantom), "--out", str(store), "--mc", "2", *common]) == 0
    assert main(["rank", str(store), "--n", "2", "--patch", "16",
                 "--strategy", "stratified"]) == 0
    # decaying score noise and the stratum share reach rank_patches as given
    assert main(["rank", str(store), "--n", "3", "--patch", "16", "--strategy", "stratified",
                 "--noise", "1", "--noise-round", "1", "--foreground-share", "0.67",
                 "--seed", "4", "--overwrite"]) == 0
    expected = rank_patches(str(store), n=3, patch=16, strategy="stratified", noise=1.0,
                            noise_round=1, foreground_share=0.67, seed=4, image=str(phantom))
    saved = json.loads((tmp_path / "t2_pvs.ranking-stratified.json").read_text())["patches"]
    assert [p["bbox_start"] for p in saved] == [r.bbox_start for r in expected]
    metrics_path = tmp_path / "metrics.json"
    capsys.readouterr()
    assert main(["evaluate", str(store), str(phantom), "--regions", str(phantom),
                 "--out", str(metrics_path)]) == 0
    assert "white_matter" in capsys.readouterr().out

    # A prediction store opens as its probability (image) and its segmentation (labels).
    group = zarr.open_group(str(store), mode="r")
    probability = np.asarray(group["probability"][:])
    segmentation = np.asarray(group["segmentation"][:])
    np.testing.assert_array_equal(io.open_volume(store).data.compute(), probability)
    np.testing.assert_array_equal(io.open_labels(store).data.compute(), segmentation)
    assert io.is_prediction_store(store) and not io.is_prediction_store(phantom)

    # evaluate scored exactly the segmentation against the phantom's ground truth.
    truth = io.open_labels(phantom, "pvs").data.compute()
    regions = io.open_labels(phantom, "regions").data.compute()
    reference = evaluate(segmentation, truth, regions=regions, spacing=(2.0, 2.0, 2.0))
    written = json.loads(metrics_path.read_text())
    assert written["dice"] == reference["dice"]
    assert written["cluster"] == reference["cluster"]
    assert written["count"]["gt"] == reference["count"]["gt"] > 0

    # ...and it is the segmentation that is scored, not a re-thresholded float16 probability.
    zarr.open_group(str(store), mode="r+")["segmentation"][:] = truth
    assert main(["evaluate", str(store), str(phantom), "--out", str(metrics_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err  # metrics.json exists: kept
    assert main(["evaluate", str(store), str(phantom), "--out", str(metrics_path),
                 "--overwrite"]) == 0
    assert json.loads(metrics_path.read_text())["dice"] == 1.0

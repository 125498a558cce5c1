"""The "Segment PVS" panel driven for real under Xvfb: segmentation equals a direct
``Predictor.predict``, cancel then resume, uncertainty + ranking + navigation, a missing default
checkpoint, and ``napari-pvs gui --segment``. A tiny saved UNet stands in for the default model.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
import zarr
from qtpy.QtCore import Qt

from napari_pvs._widgets import PVSWorkflow, SegmentPanel, VolumePanel
from napari_pvs.display import DisplayLevel
from napari_pvs.inference import Predictor
from napari_pvs.metrics import label_clusters
from napari_pvs.models.checkpoint import load_checkpoint
from napari_pvs.ranking import rank_patches
from tiny_models import tiny_checkpoint

pytestmark = pytest.mark.gui

SCALE = (1.5, 1.0, 0.8)
TRANSLATE = (10.0, -5.0, 3.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", dropout=0.3)


def volume(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 20.0, shape).astype(np.float32)
    image[:, :2] = 0
    return image


@pytest.fixture
def panel(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = SegmentPanel(viewer)
    viewer.window.add_dock_widget(widget)
    return widget


def configure(panel, checkpoint, *, window=32, batch=2, mc=0, device="cpu") -> None:
    panel.model_edit.setText(str(checkpoint))
    panel.window_spin.setValue(window)
    panel.batch_spin.setValue(batch)
    panel.mc_spin.setValue(mc)
    panel.device_combo.setCurrentText(device)


def run(panel, qtbot, button=None) -> None:
    (button or panel.segment_button).click()
    qtbot.waitUntil(lambda: not panel.is_running(), timeout=30000)


def direct(checkpoint, image, out, **options) -> zarr.Group:
    model, _ = load_checkpoint(checkpoint)
    Predictor(model, device="cpu", **options).predict(image, out)
    return zarr.open_group(str(out), mode="r")


def test_segment_matches_direct_predict(panel, qtbot, checkpoint, tmp_path):
    image = volume((40, 56, 48))
    panel.viewer.add_image(
        image, name="scan", scale=SCALE, translate=TRANSLATE, metadata={"modality": "T2"}
    )
    assert panel.modality_combo.currentText() == "T2"
    assert panel.output_edit.placeholderText().endswith("scan_pvs.zarr")
    configure(panel, checkpoint)
    run(panel, qtbot)

    probability = panel.viewer.layers["scan PVS probability"]
    segmentation = panel.viewer.layers["scan PVS segmentation"]
    assert probability.data.shape == segmentation.data.shape == image.shape
    for out_layer in (probability, segmentation):
        np.testing.assert_allclose(out_layer.scale, SCALE)
        np.testing.assert_allclose(out_layer.translate, TRANSLATE)
    reference = direct(checkpoint, image, tmp_path / "direct.zarr", window=32, batch=2,
                       modality="T2")  # fmt: skip
    np.testing.assert_array_equal(
        np.asarray(probability.data), reference["probability"][...].astype(np.float32)
    )
    np.testing.assert_array_equal(np.asarray(segmentation.data), reference["segmentation"][...])
    count = label_clusters(reference["segmentation"][...] > 0)[1]
    voxels = int(reference["segmentation"][...].sum())
    assert panel.result.pvs_count == count and panel.result.pvs_voxels == voxels
    assert panel.summary_label.text().startswith(f"{count} PVS, {voxels * 1.2:.1f} mm³")
    # the layers read lazily from the store the panel wrote; a rerun resumes it (nothing to do)
    assert probability.metadata["prediction"] == str(panel.output_path())
    run(panel, qtbot)
    assert panel.result.summary.windows_run == 0
    assert [lyr.name for lyr in panel.viewer.layers].count("scan PVS probability") == 1


def test_a_large_prediction_is_shown_from_its_display_levels(
    panel, qtbot, checkpoint, tmp_path, monkeypatch
):
    """Over ``DISPLAY_EDGE`` the layers are multiscale over the store's max-pooled levels
    (finest first, same world extent); the segmentation says it is read-only and why, and
    saving it writes the full resolution."""
    from napari_pvs.inference import levels

    monkeypatch.setattr(levels, "DISPLAY_EDGE", 24)  # stands in for 512 on a small volume
    image = volume((40, 56, 48))
    panel.viewer.add_image(image, name="scan", scale=SCALE, metadata={"modality": "T2"})
    configure(panel, checkpoint)
    run(panel, qtbot)
    probability = panel.viewer.layers["scan PVS probability"]
    segmentation = panel.viewer.layers["scan PVS segmentation"]
    assert probability.multiscale and segmentation.multiscale
    assert [tuple(level.shape) for level in probability.data] == [
        (40, 56, 48), (20, 28, 24), (10, 14, 12), (5, 7, 6)
    ]  # fmt: skip  (down to half of the edge)
    assert all(isinstance(level, DisplayLevel) for level in probability.data)
    reference = zarr.open_group(str(panel.output_path()), mode="r")
    np.testing.assert_array_equal(
        np.asarray(segmentation.data[0]), reference["segmentation"][...]
    )
    full = reference["probability"][...].astype(np.float32)
    pooled = full[:40, :56, :48].reshape(20, 2, 28, 2, 24, 2).max(axis=(1, 3, 5))
    np.testing.assert_array_equal(np.asarray(probability.data[1]), pooled)
    np.testing.assert_allclose(probability.scale, SCALE)  # level 0's scale: the same extent
    assert not segmentation.editable
    assert "too large to paint in place" in panel.status_label.text()
    # the Volume panel saves the full resolution of a multiscale labels layer
    saver = VolumePanel(panel.viewer, ask=lambda *args: "Replace")
    assert saver._save(segmentation, str(tmp_path / "saved.nii.gz"))
    qtbot.waitUntil(lambda: not saver.is_busy(), timeout=30000)  # written in its worker
    saved = np.asarray(nib.load(saver.saved).dataobj)
    np.testing.assert_array_equal(saved, reference["segmentation"][...])


def test_test_time_flips_follow_the_model_rule_unless_chosen(panel, qtbot, tmp_path):
    flipped = tiny_checkpoint(tmp_path / "rule.safetensors", segmentation={"tta": 4}, seed=3)
    image = volume((40, 48, 40), seed=4)
    panel.viewer.add_image(image, name="scan", metadata={"modality": "T2"})
    configure(panel, flipped)
    assert panel.tta_combo.currentText() == "model's rule"
    run(panel, qtbot)
    reference = direct(flipped, image, tmp_path / "four.zarr", window=32, batch=2, modality="T2")
    np.testing.assert_array_equal(
        np.asarray(panel.viewer.layers["scan PVS probability"].data),
        reference["probability"][...].astype(np.float32),
    )
    assert "scan PVS entropy" in panel.viewer.layers  # 4 samples per window: uncertainty too

    panel.tta_combo.setCurrentText("none")
    panel.overwrite_check.setChecked(True)
    run(panel, qtbot)
    plain = direct(flipped, image, tmp_path / "one.zarr", window=32, batch=2, modality="T2",
                   tta=1)  # fmt: skip
    np.testing.assert_array_equal(
        np.asarray(panel.viewer.layers["scan PVS probability"].data),
        plain["probability"][...].astype(np.float32),
    )
    assert not np.array_equal(plain["probability"][...], reference["probability"][...])


def test_cancel_stops_within_a_batch_and_rerun_resumes(panel, qtbot, checkpoint, tmp_path,
                                                       monkeypatch):  # fmt: skip
    from napari_pvs._widgets import _jobs

    # every report reaches the hook below (the GUI gets at most 5 a second: too few to cancel at
    # a given window)
    monkeypatch.setattr(_jobs, "throttled", lambda report, per_second=None: report)
    image = volume((160, 48, 48), seed=1)
    panel.viewer.add_image(image, name="long")
    configure(panel, checkpoint)
    out = tmp_path / "long_pvs.zarr"
    panel.output_edit.setText(str(out))
    # cancel from the worker thread itself once 14 windows are done: deterministic
    reports = []

    def cancel_after_first_chunk(done, total, message):
        reports.append(done)
        if done >= 14:
            panel.job.cancel()

    panel.job.progress.connect(cancel_after_first_chunk, Qt.DirectConnection)
    run(panel, qtbot)
    assert "cancelled" in panel.status_label.text()
    assert panel.result is None and "long PVS probability" not in panel.viewer.layers
    assert max(reports) <= 16  # stopped within one batch (2 windows) of the request
    stored = zarr.open_group(str(out), mode="r")
    assert not stored.attrs["napari_pvs"]["complete"] and stored["_chunks_done"][...].any()
    panel.job.progress.disconnect(cancel_after_first_chunk)

    run(panel, qtbot)
    summary = panel.result.summary
    assert summary.chunks_skipped > 0 and summary.windows_run < summary.windows_total
    assert "resumed" in panel.summary_label.text()
    reference = direct(checkpoint, image, tmp_path / "direct.zarr", window=32, batch=2)
    # The resumed windows are batched differently from a fresh run's; on CPUs that multiply
    # bfloat16 in hardware the fused bfloat16 path then rounds within bfloat16's resolution
    # (2**-8), not bit for bit (a resume in the same batching is: tests/test_inference.py).
    np.testing.assert_allclose(
        np.asarray(panel.viewer.layers["long PVS probability"].data),
        reference["probability"][...].astype(np.float32),
        atol=2**-8,
    )


def test_uncertainty_ranking_and_navigation(panel, qtbot, checkpoint):
    image = volume((48, 64, 64), seed=2)
    panel.viewer.add_image(image, name="scan", scale=SCALE, translate=TRANSLATE)
    configure(panel, checkpoint, mc=2, device="cuda")
    run(panel, qtbot)
    if not torch.cuda.is_available():
        assert "falling back to CPU" in panel.summary_label.text()
    for name in ("entropy", "mutual information", "variance"):
        assert panel.viewer.layers[f"scan PVS {name}"].data.shape == image.shape

    box = panel.ranking_box
    box.strategy_combo.setCurrentText("entropy")
    box.n_spin.setValue(4)
    box.patch_spin.setValue(16)
    run(panel, qtbot, box.rank_button)
    store = panel.output_path()
    expected = rank_patches(store, n=4, patch=16, strategy="entropy")
    assert box.ranking == expected and box.table.rowCount() == len(expected) > 1
    assert box.table.item(1, 0).text() == "2"
    assert box.table.item(1, 3).text() == str(expected[1].predicted_pvs)
    assert all(path.exists() for path in box.ranking_files)

    box.table.selectRow(1)
    patch = expected[1]
    world = np.asarray(patch.centre) * SCALE + TRANSLATE
    np.testing.assert_allclose(panel.viewer.dims.point, world, atol=max(SCALE) / 2 + 1e-6)
    np.testing.assert_allclose(panel.viewer.scene.camera.center[-2:], world[-2:])  # 2D: (y, x)
    outline = panel.viewer.layers["ranked patch"]
    assert outline.nshapes == 16
    corners = np.concatenate(outline.data)
    np.testing.assert_allclose(corners.min(axis=0), np.asarray(patch.bbox_start) - [0, 0.5, 0.5])
    np.testing.assert_allclose(corners.max(axis=0), np.asarray(patch.bbox_stop) - [1, 0.5, 0.5])
    np.testing.assert_allclose(outline.scale, SCALE)

    box.strategy_combo.setCurrentText("bald")  # fine: MC samples were drawn
    run(panel, qtbot, box.rank_button)
    assert box.ranking[0].strategy == "bald"


def test_missing_default_weights_and_bad_inputs_give_clear_messages(
    panel, qtbot, tmp_path, monkeypatch
):
    from napari_pvs.models import checkpoint as checkpoints

    monkeypatch.setattr(checkpoints, "default_checkpoint_path", lambda: tmp_path / "gone.st")
    panel.ranking_box.rank_button.click()
    assert "no image layer" in panel.status_label.text() or "Segment first" in (
        panel.status_label.text()
    )
    panel.viewer.add_image(volume((24, 24, 24)), name="scan")
    panel.output_edit.setText(str(tmp_path / "scan_pvs.zarr"))
    run(panel, qtbot)  # model "default"
    text = panel.status_label.text()
    assert "bundled default checkpoint" in text and "missing" in text
    assert panel.segment_button.isEnabled() and len(panel.viewer.layers) == 1

    panel.model_edit.setText(str(tmp_path / "typo.safetensors"))
    run(panel, qtbot)
    assert "does not exist" in panel.status_label.text()
    panel.ranking_box.rank_button.click()
    assert "press Segment first" in panel.status_label.text()

    panel.viewer.add_image(np.zeros((8, 8), np.float32), name="flat")
    panel.layer_combo.setCurrentText("flat")
    assert not panel.segment()
    assert "3D volume" in panel.status_label.text()


def test_cli_gui_segment_docks_the_workflow_and_segments_the_sample(
    checkpoint, make_napari_viewer, monkeypatch, qtbot
):
    import napari

    from napari_pvs.cli import main

    monkeypatch.setattr(napari, "run", lambda *a, **k: None)
    # the fixture's viewer: isolated plugin registry, closed at teardown
    monkeypatch.setattr(napari, "Viewer", make_napari_viewer)
    assert main(["gui", "--sample", "T2", "--model", str(checkpoint), "--segment"]) == 0
    viewer = napari.current_viewer()
    widgets = list(viewer.window.dock_widgets.values())
    workflow = next(w for w in widgets if isinstance(w, PVSWorkflow))
    panel = workflow.segment_step
    assert isinstance(panel, SegmentPanel) and workflow.tabs.currentIndex() == 1
    qtbot.waitUntil(lambda: panel.result is not None, timeout=30000)
    sample = viewer.layers["PVS phantom T2w"]
    probability = viewer.layers["PVS phantom T2w PVS probability"]
    assert probability.data.shape == sample.data.shape
    np.testing.assert_allclose(probability.scale, sample.scale)
    assert main(["gui", "--segment"]) == 2
    assert main(["gui", "--sample", "T2", "--model", "/nonexistent.safetensors"]) == 2

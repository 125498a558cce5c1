"""The napari side: manifest, reader, writer, sample data and the volume panel, driven for real
under Xvfb with ``make_napari_viewer``."""

from __future__ import annotations

import subprocess
import sys

import dask.array as da
import nibabel as nib
import numpy as np
import pytest
from qtpy.QtWidgets import QFileDialog

from napari_pvs import io
from napari_pvs._reader import napari_get_reader
from napari_pvs._widgets import PVSWorkflow, VolumePanel
from napari_pvs.display import DisplayLevel

pytestmark = pytest.mark.gui

SPACING = (2.0, 0.5, 0.75)


@pytest.fixture
def ome_zarr(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(100, 1000, size=(24, 40, 32), dtype=np.uint16)
    pvs = (image > 900).astype(np.uint8)
    return io.save_ome_zarr(
        tmp_path / "sub-01_T2w.zarr", image, SPACING, labels={"pvs": pvs}, chunks=8, levels=3
    )


@pytest.fixture(params=[".nii.gz", ".nii"])
def nifti(tmp_path, request):
    data = np.random.default_rng(1).random((16, 20, 12)).astype(np.float32)
    affine = np.array([[-0.9, 0, 0, 40], [0, 1.1, 0, -20], [0, 0, 2.0, 5], [0, 0, 0, 1]])
    path = tmp_path / f"scan_T1w{request.param}"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path, data, affine


def test_manifest_validates():
    result = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "napari-pvs"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_reader_declines_unsupported_paths(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "plain_dir").mkdir()
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    assert napari_get_reader(str(tmp_path / "plain_dir")) is None
    assert napari_get_reader(str(tmp_path / "missing.nii")) is None


def test_the_workflow_opens_without_importing_torch():
    """Opening, reviewing and reporting need no torch (rounds train in a worker process): it is
    imported when the first prediction runs, so the plugin opens sooner and smaller."""
    code = "import sys, napari_pvs._widgets, napari_pvs._reader; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_reader_opens_ome_zarr_as_lazy_multiscale_with_scale(make_napari_viewer, ome_zarr):
    viewer = make_napari_viewer()
    layers = viewer.open(str(ome_zarr), plugin="napari-pvs")
    image, labels = layers
    assert image._type_string == "image" and image.multiscale
    # lazy views napari reads directly from the store (no dask graph, nothing read yet)
    assert len(image.data) == 3 and all(isinstance(lv, DisplayLevel) for lv in image.data)
    stored = io.open_volume(ome_zarr)
    for view, level in zip(image.data, stored.levels, strict=True):
        assert view.shape == level.shape and view.dtype == level.dtype
        np.testing.assert_array_equal(np.asarray(view[1]), level[1].compute())
    assert tuple(image.scale) == SPACING
    assert tuple(image.axis_labels) == ("z", "y", "x")
    low, high = image.contrast_limits
    assert 100 <= low < high <= 1000
    assert image.metadata["modality"] == "T2"
    assert image.metadata["source"] == str(ome_zarr)
    assert labels._type_string == "labels" and labels.name == "sub-01_T2w pvs"
    assert tuple(labels.scale) == SPACING and labels.multiscale
    np.testing.assert_array_equal(
        np.asarray(labels.data[0]), io.open_labels(ome_zarr).data.compute()
    )


def test_reader_opens_nifti_with_spacing_and_affine(make_napari_viewer, nifti):
    path, data, affine = nifti
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin="napari-pvs")
    assert not layer.multiscale
    if path.suffix == ".nii":  # a plane is read from the mapping itself
        assert isinstance(layer.data, DisplayLevel) and isinstance(layer.data.reader, np.memmap)
    else:  # a .nii.gz decompresses from its start for every read: dask slabs, napari's cache
        assert isinstance(layer.data, da.Array)
    assert tuple(layer.scale) == pytest.approx((0.9, 1.1, 2.0))
    np.testing.assert_allclose(layer.metadata["affine"], affine)
    assert layer.metadata["modality"] == "T1"
    np.testing.assert_array_equal(np.asarray(layer.data), data)


@pytest.mark.parametrize(
    ("key", "modality"), [("pvs_phantom_t2w", "T2"), ("pvs_phantom_t1w", "T1")]
)
def test_sample_data_loads_with_ground_truth(make_napari_viewer, key, modality):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-pvs", key)
    names = [layer.name for layer in viewer.layers]
    assert names[0] == f"PVS phantom {modality}w"
    image, truth = viewer.layers[0], viewer.layers[1]
    assert truth._type_string == "labels" and "ground truth" in truth.name
    assert truth.data.shape == image.data.shape and truth.data.max() == 1
    assert tuple(image.scale) == tuple(truth.scale)
    assert image.metadata["modality"] == modality


def test_writer_saves_labels_to_ome_zarr_and_nifti(make_napari_viewer, ome_zarr, nifti, tmp_path):
    import napari

    viewer = make_napari_viewer()
    (image_layer,) = viewer.open(str(nifti[0]), plugin="napari-pvs")
    mask = (np.asarray(image_layer.data) > 0.5).astype(np.uint8)
    labels = viewer.add_labels(mask, name="edited", metadata=dict(image_layer.metadata))
    written = napari.save_layers(str(tmp_path / "edited.nii.gz"), [labels], plugin="napari-pvs")
    saved = nib.load(written[0])
    np.testing.assert_allclose(saved.affine, nifti[2], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), mask)

    zarr_labels = viewer.add_labels(np.ones((24, 40, 32), np.uint8), name="manual", scale=SPACING)
    napari.save_layers(str(ome_zarr), [zarr_labels], plugin="napari-pvs")
    assert "manual" in io.open_volume(ome_zarr).label_names
    assert io.open_labels(ome_zarr, "manual").data.sum().compute() == 24 * 40 * 32


def test_dock_widget_added_like_napari_w(make_napari_viewer):
    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget("napari-pvs", "Volume panel")
    assert isinstance(widget, VolumePanel)
    assert dock.widget() is not None
    # napari hands the widget a (proxied) handle on this very viewer: layers show up in it
    viewer.add_image(np.zeros((4, 5, 6), np.float32), name="added")
    assert widget.volume_combo.currentText() == "added"
    assert "4 x 5 x 6" in widget.info_label.text()


@pytest.fixture
def panel(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget = VolumePanel(viewer)
    viewer.window.add_dock_widget(widget)
    return widget


def wait_for_io(panel, qtbot) -> None:
    """Open and Save read and write in the panel's worker: wait for it."""
    qtbot.waitUntil(lambda: not panel.is_busy(), timeout=30000)


def test_panel_open_info_modality_and_errors(panel, qtbot, ome_zarr, monkeypatch):
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(ome_zarr))
    panel.folder_button.click()
    assert panel.path_edit.text() == str(ome_zarr)
    panel.open_button.click()
    assert not panel.open_button.isEnabled()  # reading in the panel's worker
    wait_for_io(panel, qtbot)
    assert [layer.name for layer in panel.viewer.layers] == ["sub-01_T2w", "sub-01_T2w pvs"]
    info = panel.info_label.text()
    assert "24 x 40 x 32" in info and "2 x 0.5 x 0.75 mm" in info and "levels 3" in info
    assert panel.modality_combo.currentText() == "T2"
    panel.modality_combo.setCurrentText("T1")
    assert panel.viewer.layers["sub-01_T2w"].metadata["modality"] == "T1"

    panel.path_edit.setText(str(ome_zarr.parent / "missing.zarr"))
    panel.open_button.click()
    wait_for_io(panel, qtbot)
    assert "no such file" in panel.status_label.text()
    assert len(panel.viewer.layers) == 2


def test_panel_browse_file(panel, qtbot, nifti, monkeypatch):
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(nifti[0]), ""))
    panel.file_button.click()
    assert panel.path_edit.text() == str(nifti[0])
    panel.open_button.click()
    wait_for_io(panel, qtbot)
    assert panel.viewer.layers[0].metadata["modality"] == "T1"
    assert panel.modality_combo.currentText() == "T1"


def test_panel_converts_in_background_and_cancels(panel, qtbot, tmp_path):
    data = np.random.default_rng(3).random((96, 96, 96)).astype(np.float32)
    src = tmp_path / "big.nii"
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 1.6, 1.0])), str(src))
    panel.path_edit.setText(str(src))
    panel.chunks_spin.setValue(8)

    # cancel as soon as the first progress report reaches the GUI thread
    def cancel_on_progress(*args):
        panel.cancel_button.click()

    panel.job.progress.connect(cancel_on_progress)
    panel.convert_button.click()
    assert panel.is_converting() or "cancel" in panel.status_label.text()
    qtbot.waitUntil(
        lambda: not panel.is_converting() and panel.convert_button.isEnabled(), timeout=20000
    )
    assert "cancelled" in panel.status_label.text()
    assert not (tmp_path / "big.ome.zarr").exists()
    panel.job.progress.disconnect(cancel_on_progress)

    seen = []
    panel.job.progress.connect(lambda done, total, msg: seen.append((done, total)))
    panel.chunks_spin.setValue(32)
    panel.levels_spin.setValue(2)
    panel.convert_button.click()
    qtbot.waitUntil(lambda: "opened" in panel.status_label.text(), timeout=30000)
    assert seen and seen[-1][0] == seen[-1][1]
    converted = io.open_volume(tmp_path / "big.ome.zarr")
    assert len(converted.levels) == 2 and converted.spacing == pytest.approx((0.8, 0.8, 1.6))
    np.testing.assert_array_equal(converted.data.compute(), data)
    # "Open the result" is checked: the converted volume is now a layer
    assert panel.viewer.layers[-1].metadata["source"] == str(tmp_path / "big.ome.zarr")

    panel.path_edit.setText(str(tmp_path / "x.zarr"))
    panel.convert_button.click()
    assert "put a .nii or .nii.gz file" in panel.status_label.text()


def test_panel_saves_labels_into_ome_zarr_and_as_nifti(
    panel, qtbot, ome_zarr, tmp_path, monkeypatch
):
    panel.path_edit.setText(str(ome_zarr))
    assert panel.open_path()
    wait_for_io(panel, qtbot)
    edited = np.zeros((24, 40, 32), np.uint8)
    edited[3:7, 5:9, 2:4] = 1
    panel.viewer.add_labels(edited, name="my edits", scale=SPACING)
    panel.labels_combo.setCurrentText("my edits")
    panel.label_name_edit.setText("corrected")
    panel.save_zarr_button.click()
    wait_for_io(panel, qtbot)  # written in the panel's worker
    assert panel.saved == str(ome_zarr)
    np.testing.assert_array_equal(io.open_labels(ome_zarr, "corrected").data.compute(), edited)

    target = tmp_path / "edits.nii.gz"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), ""))
    panel.save_file_button.click()
    wait_for_io(panel, qtbot)
    saved = nib.load(str(target))
    np.testing.assert_allclose(saved.affine, np.diag([*SPACING, 1.0]))
    np.testing.assert_array_equal(np.asarray(saved.dataobj), edited)

    # a volume without an OME-Zarr on disk cannot take labels: clear message, nothing written
    panel.viewer.add_image(np.zeros((24, 40, 32), np.float32), name="in memory")
    panel.volume_combo.setCurrentText("in memory")
    panel.save_zarr_button.click()
    assert "no OME-Zarr on disk" in panel.status_label.text()


def test_cli_gui_opens_viewer_with_panel_volume_and_sample(
    ome_zarr, make_napari_viewer, monkeypatch, qtbot
):
    import napari

    from napari_pvs.cli import main

    monkeypatch.setattr(napari, "run", lambda *a, **k: None)
    # the fixture's viewer: isolated plugin registry, closed at teardown
    monkeypatch.setattr(napari, "Viewer", make_napari_viewer)
    assert main(["gui", str(ome_zarr), "--sample", "T2"]) == 0
    viewer = napari.current_viewer()
    names = [layer.name for layer in viewer.layers]
    assert names[0] == "PVS phantom T2w" and "sub-01_T2w" in names
    assert any(isinstance(w, PVSWorkflow) for w in viewer.window.dock_widgets.values())
    assert main(["gui", str(ome_zarr.parent / "missing.zarr")]) == 2


def test_reader_contrast_of_large_single_level_reads_few_chunks(tmp_path, monkeypatch):
    """Chunks outside the sample are corrupted on disk: reading any of them would fail."""
    import zarr

    from napari_pvs import _reader

    monkeypatch.setattr(_reader, "STRIDED_SAMPLE_MAX_VOXELS", 1000)
    data = np.full((40, 40, 40), 7, np.uint16)
    data[::2] = 300
    path = tmp_path / "big.zarr"
    zarr.create_array(str(path), data=data, chunks=(8, 8, 8), zarr_format=2)
    sampled = {(i, j, k) for i in (0, 2, 4) for j in (0, 2, 4) for k in (0, 2, 4)}
    corrupted = 0
    for chunk_file in path.glob("*.*.*"):
        key = tuple(int(p) for p in chunk_file.name.split("."))
        if key not in sampled:
            chunk_file.write_bytes(b"corrupt")
            corrupted += 1
    assert corrupted == 125 - 27
    (image,) = napari_get_reader(str(path))(str(path))
    assert image[1]["contrast_limits"] == pytest.approx((7.0, 300.0))
    with pytest.raises(Exception):  # noqa: B017 - proves the corrupted chunks would be noticed
        io.open_volume(path).data.compute()


@pytest.fixture
def napari_settings(tmp_path, monkeypatch):
    """napari's settings in this test's folder, so no preference reaches the user's file."""
    from napari import settings as napari_settings
    from napari.settings import NapariSettings

    fresh = NapariSettings(config_path=tmp_path / "napari-settings.yaml")
    monkeypatch.setattr(napari_settings, "_SETTINGS", fresh)
    return fresh


def _reactivate_plugin() -> None:
    """What napari does on the first use of any napari-pvs command (widget, sample, reader)."""
    from npe2 import PluginManager

    manager = PluginManager.instance()
    manager.deactivate("napari-pvs")
    manager.activate("napari-pvs")


def test_dropped_nifti_and_zarr_open_with_this_reader_once_the_plugin_is_active(
    make_napari_viewer, napari_settings, nifti, ome_zarr, tmp_path
):
    import zarr
    from napari.errors import MultipleReaderError

    path = str(nifti[0])
    plain = tmp_path / "plain.zarr"
    zarr.open_array(str(plain), mode="w", shape=(8, 10, 12), dtype="f4")[:] = 1.0
    viewer = make_napari_viewer()
    napari_settings.plugins.extension2reader = {}
    # napari's own rule: two readers and no preference, so a drop asks (builtins preselected).
    with pytest.raises(MultipleReaderError):
        viewer.open(path, plugin=None)

    _reactivate_plugin()
    for dropped in (path, str(ome_zarr), str(plain), str(ome_zarr) + "/"):
        layers = viewer.open(dropped, plugin=None)  # no plugin named, as a drop on the canvas
        assert layers and all(layer.metadata.get("napari_pvs") for layer in layers), dropped
    assert set(napari_settings.plugins.extension2reader.values()) == {"napari-pvs"}


def test_a_reader_preference_the_user_chose_is_kept(make_napari_viewer, napari_settings, nifti):
    from napari_pvs._reader import READER_PATTERNS, prefer_this_reader

    make_napari_viewer()
    napari_settings.plugins.extension2reader = {"*.nii.gz": "napari", "*.nii": "napari"}
    added = prefer_this_reader()
    assert added == [p for p in READER_PATTERNS if not p.startswith("*.nii")]
    chosen = napari_settings.plugins.extension2reader
    assert chosen["*.nii.gz"] == chosen["*.nii"] == "napari"
    assert chosen["*.zarr/"] == "napari-pvs"
    assert prefer_this_reader() == []

"""A large multiscale layer's first plane is read at an affordable level, through the real
widgets under Xvfb: the project's Show in viewer and the Segment step's result layers are
locked at the finest level whose whole plane decodes at most ``display.FIRST_PLANE_VOXELS``
(patched small here: these volumes stand in for 1024^3), nothing finer is read for the first
plane, and napari chooses levels itself again once the user zooms or turns to 3D.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_pvs import display, io
from napari_pvs._widgets import PVSWorkflow, SegmentPanel
from napari_pvs.display import DisplayLevel, plane_read_voxels, slab_cache
from test_segment_widget import configure, run, volume
from test_workflow_widget import Answers
from tiny_models import tiny_checkpoint

pytestmark = pytest.mark.gui


@pytest.fixture
def reads(monkeypatch):
    """The shape of the level behind every display read (what napari asked for)."""
    shapes: list[tuple[int, ...]] = []
    original = DisplayLevel._read

    def recorded(self, key):
        shapes.append(tuple(int(n) for n in self.reader.shape))
        return original(self, key)

    monkeypatch.setattr(DisplayLevel, "_read", recorded)
    return shapes


@pytest.fixture
def gui_thread_reads(monkeypatch):
    """Planes the GUI thread read from a store itself (their slab not in memory yet): the
    shape of the level each came from."""
    shapes: list[tuple[int, ...]] = []
    original = DisplayLevel._read

    def recorded(self, key):
        slab = self._slab_of(key)
        on_gui = threading.current_thread() is threading.main_thread()
        if on_gui and slab is not None and (id(self.reader), slab[4]) not in slab_cache._slabs:
            shapes.append(tuple(int(n) for n in self.reader.shape))
        return original(self, key)

    monkeypatch.setattr(DisplayLevel, "_read", recorded)
    return shapes


def test_show_in_viewer_reads_the_affordable_level_until_the_user_zooms(
    make_napari_viewer, qtbot, tmp_path, monkeypatch, reads, gui_thread_reads
):
    from napari_pvs.project import Project

    viewer = make_napari_viewer()
    workflow = PVSWorkflow(viewer, ask=Answers())
    viewer.window.add_dock_widget(workflow)
    image = np.random.default_rng(0).integers(0, 1000, (96, 96, 96)).astype(np.uint16)
    scan = io.save_ome_zarr(tmp_path / "big_T2w.zarr", image, (1.0,) * 3, levels=3, chunks=16)
    levels = io.open_volume(scan).display_levels()
    assert [lvl.shape for lvl in levels] == [(96,) * 3, (48,) * 3, (24,) * 3]
    # the budget fits level 1's whole plane (16 deep, 48 x 48), not level 0's
    monkeypatch.setattr(display, "FIRST_PLANE_VOXELS", plane_read_voxels(levels[1], 0))
    with Project.create(tmp_path / "project", model=tiny_checkpoint(tmp_path / "t.safetensors")):
        pass
    step = workflow.project_step
    step.folder_edit.setText(str(tmp_path / "project"))
    assert step.open_project()
    assert step.start_add_paths([scan])
    qtbot.waitUntil(lambda: not step.is_busy(), timeout=60000)
    step.volumes_box.table.selectRow(0)
    assert step.volumes_box.show_selected() is None  # not open yet: read in the step's worker
    qtbot.waitUntil(lambda: not step.is_busy(), timeout=60000)
    layer = step.volumes_box.shown
    qtbot.wait(50)  # the canvas draws: napari would pick its own level here
    assert layer.locked_data_level == 1 and layer.data_level == 1
    assert reads and (96, 96, 96) not in reads  # level 0 never read for the first plane
    assert set(reads) <= {(48, 48, 48), (24, 24, 24)}  # level 1, and the thumbnail's
    # and read before the layer was shown, off the GUI thread: napari's reads came from memory
    assert not gui_thread_reads

    viewer.scene.camera.zoom *= 4  # the user zooms in: napari chooses again
    assert layer.locked_data_level is None

    # shown again after a switch to 3D and back: released by the switch as well
    viewer.layers.remove(layer)
    step.volumes_box.show_selected()
    qtbot.waitUntil(lambda: not step.is_busy(), timeout=60000)
    layer = step.volumes_box.shown
    assert layer.locked_data_level == 1
    assert step.volumes_box.show_selected() is layer  # open: selected, nothing read again
    viewer.dims.ndisplay = 3
    assert layer.locked_data_level is None


def test_default_budget_leaves_small_volumes_to_napari(make_napari_viewer, tmp_path):
    from napari_pvs._widgets._layers import start_at_affordable_level

    viewer = make_napari_viewer()
    image = np.zeros((64, 64, 64), np.uint16)
    scan = io.save_ome_zarr(tmp_path / "small.zarr", image, (1.0,) * 3, levels=2, chunks=32)
    layer = viewer.add_image(io.open_volume(scan).display_levels(), multiscale=True)
    assert start_at_affordable_level(viewer, layer) is None  # 131 k voxels: level 0 is fine
    assert layer.locked_data_level is None


def test_segment_result_layers_start_at_the_affordable_level(
    make_napari_viewer, qtbot, tmp_path, monkeypatch, reads, gui_thread_reads
):
    from napari_pvs.inference import levels

    monkeypatch.setattr(levels, "DISPLAY_EDGE", 24)  # display levels on a small volume
    viewer = make_napari_viewer()
    panel = SegmentPanel(viewer)
    viewer.window.add_dock_widget(panel)
    viewer.add_image(volume((48, 48, 48)), name="scan", metadata={"modality": "T2"})
    configure(panel, tiny_checkpoint(tmp_path / "tiny.safetensors"))
    # level 1's whole plane (24^3 chunks: the whole level) fits; level 0's (48^3 chunks: a
    # plane decodes the whole volume) does not
    monkeypatch.setattr(display, "FIRST_PLANE_VOXELS", 24**3)
    run(panel, qtbot)
    probability = viewer.layers["scan PVS probability"]
    segmentation = viewer.layers["scan PVS segmentation"]
    assert probability.multiscale and segmentation.multiscale
    assert [lvl.shape for lvl in probability.data][:2] == [(48,) * 3, (24,) * 3]
    qtbot.wait(50)
    for layer in (probability, segmentation):
        assert layer.locked_data_level == 1 and layer.data_level == 1, layer.name
    assert (48, 48, 48) not in reads  # no full-resolution plane read for the first planes
    assert not gui_thread_reads  # each read before its layer was shown, off the GUI thread
    # a second run gives the layers new data: locked again for the new levels
    run(panel, qtbot)
    assert viewer.layers["scan PVS probability"].locked_data_level == 1
    viewer.scene.camera.zoom *= 4
    assert probability.locked_data_level is None and segmentation.locked_data_level is None


def test_replaced_labels_do_not_undo_the_previous_datas_strokes(make_napari_viewer):
    # napari's data setter keeps the undo history: Ctrl+Z wrote the previous patch's last
    # stroke (its voxels and old values) into the next patch
    from napari_pvs._widgets._layers import replace_labels

    viewer = make_napari_viewer()
    layer = viewer.add_labels(np.zeros((8, 8, 8), np.uint8))
    layer.n_edit_dimensions, layer.brush_size = 3, 3
    layer.paint((4, 4, 4), 1)
    assert np.count_nonzero(layer.data) > 0
    replace_labels(layer, np.ones((8, 8, 8), np.uint8))
    layer.undo()
    np.testing.assert_array_equal(layer.data, np.ones((8, 8, 8), np.uint8))
    layer.paint((1, 1, 1), 0)  # its own strokes undo as before
    layer.undo()
    np.testing.assert_array_equal(layer.data, np.ones((8, 8, 8), np.uint8))


@pytest.mark.parametrize("in_place", [False, True])
def test_replaced_labels_in_place_reuse_the_layers_array_without_a_data_event(
    make_napari_viewer, in_place
):
    """``in_place``: the next patch goes into the layer's own array (no ``data`` event, which
    makes napari's canvas link the labels shader again), its plane is what the layer shows,
    and the previous data's stroke is not undone into it. A caller's array is never written:
    another shape or dtype takes the setter."""
    from napari_pvs._widgets._layers import replace_labels

    viewer = make_napari_viewer()
    first = np.zeros((8, 8, 8), np.uint8)
    layer = viewer.add_labels(first)
    own = layer.data
    events = []
    layer.events.data.connect(events.append)
    layer.n_edit_dimensions, layer.brush_size = 3, 3
    layer.paint((4, 4, 4), 1)
    nxt = np.zeros((8, 8, 8), np.uint8)
    nxt[:, :4] = 1
    replace_labels(layer, nxt, in_place=in_place)
    assert (layer.data is own) is in_place and (len(events) == 0) is in_place
    np.testing.assert_array_equal(layer.data, nxt)
    plane = int(viewer.dims.point[0])
    np.testing.assert_array_equal(np.asarray(layer._slice.image.raw), nxt[plane])
    layer.undo()
    np.testing.assert_array_equal(layer.data, nxt)
    if in_place:  # the caller's array stays the caller's
        nxt[:] = 7
        assert layer.data.max() == 1
    wider = np.ones((8, 8, 9), np.uint8)
    replace_labels(layer, wider, in_place=True)
    assert layer.data is wider and layer.data.shape == (8, 8, 9)

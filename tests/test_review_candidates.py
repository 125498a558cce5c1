"""The Review step's Candidates mode driven through the real widget under Xvfb: real key presses
on the canvas (Y, N, E, S, U, Shift+N, Shift+M) change the ledger as they should (answers,
candidate statuses, the label store's 1 / 0 / 255), the counter follows, the next candidate is
shown before the save returns, a failed save puts its candidate back, the keys do nothing
outside the mode, and answering keeps the 50 ms heartbeat under the gross-freeze limit.

The project's prediction is a tiny model's, with its segmentation replaced by hand-made
clusters, so the candidates are known: six tubes of different sizes, apart from each other.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from qtpy.QtCore import Qt

from napari_pvs import io
from napari_pvs._widgets import PVSWorkflow
from napari_pvs._widgets.report import reviewed_text
from napari_pvs._widgets.review import edit_patch
from napari_pvs._widgets.review_candidate_layers import (
    CANDIDATE_LAYER,
    orthogonal_planes,
    widest_point,
)
from napari_pvs._widgets.review_candidate_queue import CandidateQueue
from napari_pvs._widgets.review_layers import PATCH_LAYER
from napari_pvs.phantom import make_phantom
from napari_pvs.project import UNREVIEWED, Project
from test_workflow_widget import FREEZE_LIMIT_S, SHAPE, SPACING, Answers, Heartbeat, wait
from tiny_models import tiny_checkpoint

pytestmark = pytest.mark.gui

#: The hand-made clusters: (first voxel, edge lengths), far enough apart never to touch.
CLUSTERS = [
    ((6, 6, 6), (5, 2, 2)),
    ((6, 30, 8), (3, 3, 3)),
    ((20, 10, 25), (2, 2, 7)),
    ((28, 36, 30), (6, 1, 1)),
    ((20, 24, 14), (4, 2, 3)),
    ((32, 8, 30), (2, 4, 2)),
]


def cluster_segmentation() -> np.ndarray:
    segmentation = np.zeros(SHAPE, np.uint8)
    for start, size in CLUSTERS:
        segmentation[tuple(slice(a, a + n) for a, n in zip(start, size, strict=True))] = 1
    return segmentation


def unpredicted_project(folder) -> Project:
    """A project (tiny model) with one phantom volume, not predicted yet."""
    checkpoint = tiny_checkpoint(folder / "tiny.safetensors")
    phantom = make_phantom(SHAPE, SPACING, "T2", seed=1, severity=1.0)
    scan = io.save_ome_zarr(folder / "sub-01_T2w.zarr", phantom.image, phantom.spacing,
                            modality="T2", levels=1, chunks=16)  # fmt: skip
    project = Project.create(folder / "project", model=checkpoint)
    project.add_volume(scan, modality="T2")
    project.update_settings(predict_mc=2, predict_tta=1, device="cpu", patch=12)
    return project


@pytest.fixture
def project(tmp_path):
    """A project with one phantom volume predicted by a tiny model, its segmentation the six
    hand-made clusters (probability 0.8 there, 0.05 elsewhere)."""
    project = unpredicted_project(tmp_path)
    volume = project.volumes()[0]
    project.predict(volume.id)
    store = zarr.open_group(str(project.prediction_path(volume.id)), mode="r+")
    segmentation = cluster_segmentation()
    store["segmentation"][...] = segmentation
    store["probability"][...] = np.where(segmentation > 0, 0.8, 0.05).astype(
        store["probability"].dtype
    )
    return project


@pytest.fixture
def workflow(make_napari_viewer, project):
    viewer = make_napari_viewer()
    widget = PVSWorkflow(viewer, ask=Answers())
    viewer.window.add_dock_widget(widget, area="right")
    widget.state.set_project(project)
    yield widget
    widget.teardown()


def key(workflow, qtbot, name, modifier=Qt.KeyboardModifier.NoModifier) -> None:
    """A real key press on the canvas (napari hands it to the active layer's keymap)."""
    qtbot.keyClick(workflow.viewer.window._qt_viewer.canvas.native, name, modifier)


def start_candidates(workflow, qtbot, left: int = len(CLUSTERS)):
    review = workflow.review_step
    review.mode_buttons["Candidates"].click()
    box = review.candidates_box
    assert review.mode() == "Candidates" and not review.queue_box.isVisibleTo(review)
    wait(qtbot, box.load_job.is_running)
    # the current version's prediction is there: its candidates are found on entering
    assert box.counter_label.text().endswith(f"· {left} left")
    box.find_button.click()  # found again: the same candidates, nothing answered
    wait(qtbot, box.load_job.is_running)
    return review, box


def stored(project, candidate) -> np.ndarray:
    """The label store over the candidate's box."""
    box = tuple(slice(a, b) for a, b in zip(candidate.bbox_start, candidate.bbox_stop,
                                            strict=True))  # fmt: skip
    return np.asarray(project.labels(candidate.volume_id)["labels"][box])


def assert_holds_exactly(layer, candidate, mask: np.ndarray) -> None:
    """The candidate layer holds ``candidate``'s cluster at its place on the volume's grid,
    and nothing else."""
    origin = np.round(np.asarray(layer.translate) / np.asarray(layer.scale)).astype(int)
    inner = tuple(slice(a - o, b - o) for a, b, o in zip(candidate.bbox_start,
                                                         candidate.bbox_stop, origin,
                                                         strict=True))  # fmt: skip
    np.testing.assert_array_equal(layer.data[inner] > 0, mask)
    assert int((layer.data > 0).sum()) == candidate.voxels


def test_candidate_canvas_reuses_the_layers_shape_inside_the_volume():
    """A cluster whose surroundings fit in the layer's block is written into a block of that
    shape, moved back inside the volume at its edge; a larger one grows the block."""
    from napari_pvs._widgets.review_candidate_layers import CandidateView, candidate_canvas

    class Shown:  # the layer's array is all candidate_canvas reads
        data = np.zeros((10, 12, 12), np.uint8)

    mask = np.zeros((6, 6, 6), bool)
    mask[1:3, 2:5, 0] = True
    view = CandidateView([34, 5, 0], [40, 11, 6], mask, (1, 3, 0), np.zeros((6, 6, 6)))
    start, data = candidate_canvas(view, (40, 40, 40), Shown())
    assert data.shape == (10, 12, 12) and start == (30, 5, 0)  # 34 + 10 > 40: moved back
    held = data[4:10, 0:6, 0:6]
    np.testing.assert_array_equal(held > 0, mask)
    assert int(data.sum()) == int(mask.sum())
    big = CandidateView([0, 0, 0], [14, 6, 6], np.ones((14, 6, 6), bool), (0, 0, 0), mask)
    start, data = candidate_canvas(big, (40, 40, 40), Shown())
    assert start == (0, 0, 0) and data.shape == (14, 12, 12)
    start, data = candidate_canvas(view, (40, 40, 40), None)  # no layer yet: the box itself
    assert start == (34, 5, 0) and data.shape == (6, 6, 6)
    start, data = candidate_canvas(view, (40, 40, 40), None, block=(8, 7, 9))  # the list's
    assert start == (32, 5, 0) and data.shape == (8, 7, 9)
    np.testing.assert_array_equal(data[2:8, 0:6, 0:6] > 0, mask)


def test_block_shape_is_the_largest_surroundings_of_the_list():
    from types import SimpleNamespace

    from napari_pvs._widgets.review_candidate_layers import (
        MARGIN_FRACTION,
        MAX_BLOCK,
        MIN_MARGIN,
        block_shape,
    )
    from napari_pvs._widgets.review_layers import grown_box

    listed = [SimpleNamespace(bbox_start=[10, 10, 10], bbox_stop=[12, 13, 11]),
              SimpleNamespace(bbox_start=[0, 30, 30], bbox_stop=[5, 31, 31]),
              SimpleNamespace(bbox_start=[40, 0, 0], bbox_stop=[41, 1, 200])]  # fmt: skip
    boxes = [grown_box(c.bbox_start, c.bbox_stop, (80, 80, 300), MARGIN_FRACTION, MIN_MARGIN)
             for c in listed]  # fmt: skip
    sides = [np.subtract(stop, start) for start, stop in boxes]
    expected = np.minimum(np.max(sides, axis=0), MAX_BLOCK).tolist()
    assert block_shape(listed, (80, 80, 300)) == expected and expected[2] == MAX_BLOCK


def test_keys_answer_undo_skip_and_edit_through_the_ledger(workflow, qtbot, project):
    viewer = workflow.viewer
    vid = project.volumes()[0].id
    review, box = start_candidates(workflow, qtbot)
    listed = project.candidates(vid)
    assert len(listed) == len(CLUSTERS) == len(box.queue.candidates)
    assert box.counter_label.text() == "answered 0: 0 yes, 0 no, 0 edited · 0 skipped · 6 left"
    layer = viewer.layers[CANDIDATE_LAYER]
    assert viewer.layers.selection.active is layer and layer.contour == 1
    assert layer.mode == "pan_zoom"  # shown, not painted (E opens a patch for that)
    first = box.queue.current()
    assert first.id == listed[0].id  # rank 1 first
    # the layer holds exactly the cluster, placed on the volume's grid
    mask = project.candidate_mask(first.id)
    assert_holds_exactly(layer, first, mask)
    array = layer.data  # one block for the list: the next candidates go into this array
    # the canvas is on the cluster's plane (the slider's point is inside the cluster's box)
    plane = viewer.dims.point[0] / SPACING
    assert first.bbox_start[0] <= round(plane) < first.bbox_stop[0]
    assert not box.planes_label.pixmap().isNull()
    zoom = viewer.camera.zoom

    # -- Y: a PVS. The next candidate is shown at once, the counter follows, then the ledger
    key(workflow, qtbot, Qt.Key.Key_Y)
    assert box.queue.current().id != first.id
    assert viewer.camera.zoom == zoom  # one zoom for the list: sizes compare
    assert box.counter_label.text().startswith("answered 1: 1 yes, 0 no")
    wait(qtbot, review.is_busy)
    assert project.candidate(first.id).status == "yes"
    values = stored(project, first)
    assert set(np.unique(values[mask])) == {1} and set(np.unique(values[~mask])) <= {UNREVIEWED}
    # -- N: not a PVS (its voxels become background)
    second = box.queue.current()
    assert viewer.layers[CANDIDATE_LAYER] is layer and layer.data is array  # no new data
    assert_holds_exactly(layer, second, project.candidate_mask(second.id))
    key(workflow, qtbot, Qt.Key.Key_N)
    wait(qtbot, review.is_busy)
    assert project.candidate(second.id).status == "no"
    values, mask2 = stored(project, second), project.candidate_mask(second.id)
    assert set(np.unique(values[mask2])) == {0} and set(np.unique(values[~mask2])) <= {UNREVIEWED}
    # -- S: skipped (no labels), asked again after the open ones
    third = box.queue.current()
    key(workflow, qtbot, Qt.Key.Key_S)
    wait(qtbot, review.is_busy)
    assert project.candidate(third.id).status == "skipped"
    assert (stored(project, third) == UNREVIEWED).all()
    assert box.counter_label.text() == "answered 2: 1 yes, 1 no, 0 edited · 1 skipped · 4 left"
    assert [a.answer for a in project.answers(vid)] == ["yes", "no", "skip"]

    # -- U twice: the skip, then the no, are undone; each candidate is shown again
    key(workflow, qtbot, Qt.Key.Key_U)
    assert box.queue.current().id == third.id
    wait(qtbot, review.is_busy)
    assert project.candidate(third.id).status == "open"
    key(workflow, qtbot, Qt.Key.Key_U)
    assert box.queue.current().id == second.id
    wait(qtbot, review.is_busy)
    assert project.candidate(second.id).status == "open"
    assert (stored(project, second) == UNREVIEWED).all()  # exactly its voxels back to 255
    assert [a.answer for a in project.answers(vid)] == ["yes"]
    assert box.counter_label.text() == "answered 1: 1 yes, 0 no, 0 edited · 0 skipped · 5 left"

    # -- Shift+N / Shift+M move without answering
    shown = box.queue.index
    key(workflow, qtbot, Qt.Key.Key_N, Qt.KeyboardModifier.ShiftModifier)
    assert box.queue.index == shown - 1
    key(workflow, qtbot, Qt.Key.Key_M, Qt.KeyboardModifier.ShiftModifier)
    assert box.queue.index == shown
    # -- changing an earlier answer: back to the first (yes) and answer N: undone, then no
    box.show_candidate(box.queue.position(first.id))
    key(workflow, qtbot, Qt.Key.Key_N)
    wait(qtbot, review.is_busy)
    assert project.candidate(first.id).status == "no"
    assert set(np.unique(stored(project, first)[mask])) == {0}
    assert [a.answer for a in project.answers(vid)] == ["no"]

    # -- E: the patch around it opens (the candidate's layer and keys make way); A accepts it
    edited = box.queue.current()
    assert edited.status == "open"
    key(workflow, qtbot, Qt.Key.Key_E)
    assert CANDIDATE_LAYER not in viewer.layers and review.patch_box.isVisibleTo(review)
    patch_layer = viewer.layers[PATCH_LAYER]
    assert viewer.layers.selection.active is patch_layer
    expected = edit_patch(edited, 12, SHAPE)
    assert list(patch_layer.data.shape) == [b - a for a, b in zip(expected.start, expected.stop,
                                                                  strict=True)]  # fmt: skip
    key(workflow, qtbot, Qt.Key.Key_Y)  # not a key of the patch layer: nothing is answered
    key(workflow, qtbot, Qt.Key.Key_A)
    wait(qtbot, review.is_busy)
    assert project.candidate(edited.id).status == "edited"
    (annotation,) = project.annotations(vid)
    assert list(annotation.start) == list(expected.start) and annotation.patch_id is None
    assert PATCH_LAYER not in viewer.layers and not review.patch_box.isVisibleTo(review)
    assert viewer.layers.selection.active is viewer.layers[CANDIDATE_LAYER]
    assert box.queue.current().id != edited.id
    assert box.counter_label.text() == "answered 2: 0 yes, 1 no, 1 edited · 0 skipped · 4 left"
    assert [a.answer for a in project.answers(vid)] == ["no"]
    # the Report counts the answers beside the patches (read in its worker)
    wait(qtbot, workflow.report_step.is_refreshing)
    report = workflow.report_step.reviewed_label.text()
    assert report == reviewed_text(project.status()) and report.startswith("reviewed: 1 patches")
    assert "1 candidate answers: 0 yes, 1 no, 0 skipped" in report

    # -- outside the mode the keys do nothing: the candidate's layer is gone with them
    review.mode_buttons["Patches"].click()
    assert review.mode() == "Patches" and CANDIDATE_LAYER not in viewer.layers
    image = next(lyr for lyr in viewer.layers if lyr.name.startswith("sub-01"))
    viewer.layers.selection.active = image
    for name in (Qt.Key.Key_Y, Qt.Key.Key_N, Qt.Key.Key_S, Qt.Key.Key_U):
        key(workflow, qtbot, name)
    wait(qtbot, review.is_busy)
    assert [a.answer for a in project.answers(vid)] == ["no"]
    assert project.candidates(vid, status="open") and not review.candidates_box.pending


def test_find_predicts_first_when_the_volume_has_no_prediction(make_napari_viewer, qtbot,
                                                               tmp_path):  # fmt: skip
    project = unpredicted_project(tmp_path)
    vid = project.volumes()[0].id
    viewer = make_napari_viewer()
    workflow = PVSWorkflow(viewer, ask=Answers())
    viewer.window.add_dock_widget(workflow, area="right")
    workflow.state.set_project(project)
    try:
        review = workflow.review_step
        box = review.candidates_box
        review.set_mode("Candidates")
        wait(qtbot, box.load_job.is_running)
        assert box.counter_label.text() == "no candidates listed: press Find candidates"
        assert not box.yes_button.isEnabled()
        box.find_button.click()
        wait(qtbot, box.load_job.is_running)
        assert project.has_prediction(vid) and project.candidates_current(vid)
        listed = project.candidates(vid)
        assert [c.id for c in box.queue.candidates] == [c.id for c in listed]
        assert listed  # the seeded tiny model segments a few dozen clusters
        assert box.queue.current().id == listed[0].id
        key(workflow, qtbot, Qt.Key.Key_Y)
        wait(qtbot, review.is_busy)
        assert project.candidate(listed[0].id).status == "yes"
    finally:
        workflow.teardown()


def test_the_order_box_orders_the_next_find(workflow, qtbot, project):
    _, box = start_candidates(workflow, qtbot)
    box.order_combo.setCurrentText("size")
    box.find_button.click()
    wait(qtbot, box.load_job.is_running)
    vid = project.volumes()[0].id
    assert [c.id for c in box.queue.candidates] == [c.id for c in project.candidates(vid)]
    # six clusters of 6, 16 | 20, 24 | 27, 28 voxels: small, medium, large in turn
    sizes = [c.voxels for c in box.queue.candidates]
    assert sizes[0] in (6, 16) and sizes[1] in (20, 24) and sizes[2] in (27, 28)
    assert box.queue.current().id == box.queue.candidates[0].id


def test_u_with_no_answer_this_session_undoes_the_projects_latest(workflow, qtbot, project):
    vid = project.volumes()[0].id
    project.refresh_candidates(vid)
    earlier = project.candidates(vid)[2]
    project.answer(earlier.id, "no", annotator="rater-2")  # e.g. from the command line
    review, box = start_candidates(workflow, qtbot, left=len(CLUSTERS) - 1)
    assert box.queue.get(earlier.id).status == "no" and box.queue.candidates[0].id == earlier.id
    assert box.counter_label.text().startswith("answered 1: 0 yes, 1 no")
    key(workflow, qtbot, Qt.Key.Key_U)
    wait(qtbot, review.is_busy)
    assert project.candidate(earlier.id).status == "open" and not project.answers()
    assert box.queue.current().id == earlier.id  # shown again, to be answered anew
    assert box.counter_label.text().endswith("· 6 left")
    key(workflow, qtbot, Qt.Key.Key_U)  # nothing left to undo: said, nothing changes
    wait(qtbot, review.is_busy)
    assert "no answer to undo" in review.status_label.text()
    assert project.candidate(earlier.id).status == "open"


def test_a_failed_save_puts_the_candidate_back(workflow, qtbot, project, monkeypatch):
    review, box = start_candidates(workflow, qtbot)
    first = box.queue.current()

    def refuse(self, candidate_id, answer, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Project, "answer", refuse)
    key(workflow, qtbot, Qt.Key.Key_Y)
    assert box.queue.current().id != first.id  # shown before the save fails
    wait(qtbot, review.is_busy)
    assert box.queue.get(first.id).status == "open"
    assert "could not save the answer on candidate" in review.status_label.text()
    assert "No space left" in review.status_label.text()
    assert box.counter_label.text().endswith("6 left") and not box.history
    assert not project.answers()


def test_answering_keeps_the_gui_responsive(workflow, qtbot, project):
    review, box = start_candidates(workflow, qtbot)
    with Heartbeat() as beat:
        for answer in (Qt.Key.Key_Y, Qt.Key.Key_N, Qt.Key.Key_Y, Qt.Key.Key_N, Qt.Key.Key_Y):
            key(workflow, qtbot, answer)
            qtbot.wait(60)  # a quick annotator: the next key before the saves have finished
        wait(qtbot, review.is_busy)
    assert beat.longest < FREEZE_LIMIT_S, beat.report()
    assert [a.answer for a in project.answers()] == ["yes", "no", "yes", "no", "yes"]
    assert box.counter_label.text() == "answered 5: 3 yes, 2 no, 0 edited · 0 skipped · 1 left"


def test_the_next_candidate_is_read_ahead_in_a_worker(workflow, qtbot, project, monkeypatch):
    """While one candidate is shown, the one an answer shows next (its surroundings and
    planes) is read in a worker: the key press shows it without reading the image on the GUI
    thread, and what it shows is that candidate."""
    import threading

    layers = workflow.review_step.candidates_box.layers
    read = layers.read
    readers: list[bool] = []  # per read of surroundings: on the GUI thread?

    def spy(*args):
        readers.append(threading.current_thread() is threading.main_thread())
        return read(*args)

    monkeypatch.setattr(layers, "read", spy)
    review, box = start_candidates(workflow, qtbot)  # the first shown, the second read ahead
    first = box.queue.current()
    qtbot.waitUntil(lambda: False in readers, timeout=10000)
    qtbot.wait(200)  # the worker's value reaches the GUI thread
    on_gui = readers.count(True)
    key(workflow, qtbot, Qt.Key.Key_Y)
    second = box.queue.current()
    assert second.id != first.id
    assert readers.count(True) == on_gui  # the key press read nothing on the GUI thread
    layer = workflow.viewer.layers[CANDIDATE_LAYER]
    assert_holds_exactly(layer, second, project.candidate_mask(second.id))
    plane = round(workflow.viewer.dims.point[0] / SPACING)  # the canvas on its plane
    assert second.bbox_start[0] <= plane < second.bbox_stop[0]
    assert not box.planes_label.pixmap().isNull()
    wait(qtbot, review.is_busy)


def test_the_list_order_and_what_is_asked_next():
    from napari_pvs.project import CandidateRecord

    def record(cid, status, rank):
        return CandidateRecord(
            id=cid, volume_id=1, model_version=0, bbox_start=[0, 0, 0], bbox_stop=[1, 1, 1],
            centre=[0.0, 0.0, 0.0], seed=[0, 0, 0], voxels=1, volume_mm3=1.0,
            mean_probability=0.5, uncertainty=0.5, rank=rank, status=status,
        )  # fmt: skip

    queue = CandidateQueue()
    queue.set_candidates([record(1, "skipped", 1), record(2, "open", 2), record(3, "yes", 3),
                          record(4, "open", 1), record(5, "stale", 1)])  # fmt: skip
    assert [c.id for c in queue.candidates] == [3, 4, 2, 1]  # answered, open, skipped; no stale
    queue.select(1)
    assert queue.next_to_ask() == 2
    queue.set_status(2, "no")
    assert queue.next_to_ask() == 3  # no open one after it: the skipped one
    queue.select(3)
    queue.set_status(4, "yes")
    assert queue.next_to_ask() == -1  # the shown one is the last to ask
    assert queue.counts() == {"open": 0, "yes": 2, "no": 1, "skipped": 1, "edited": 0,
                                   "answered": 3, "left": 1}  # fmt: skip


def test_the_three_planes_and_the_edit_box():
    crop = np.zeros((10, 12, 14), np.float32)
    mask = np.zeros(crop.shape, bool)
    mask[4:7, 5, 6] = True
    mask[5, 5:8, 6] = True  # widest on plane 5
    crop[mask] = 100.0
    point = widest_point(mask)
    assert point[0] == 5 and mask[point]
    picture = orthogonal_planes(crop, mask, point, (2.0, 1.0, 1.0), (0, 100), pixels=48)
    assert picture.dtype == np.uint8 and picture.shape[2] == 3
    # the first plane (12 x 14 mm) is 48 px wide; the second is 20 x 14 mm: 48 px high
    assert picture.shape[0] == 48
    tinted = picture[..., 2] < picture[..., 0]  # the cluster's yellow tint (grey has R = B)
    # three panels: 48, 34 and 29 px wide (mm-true), 4 px apart; the cluster in each
    assert picture.shape[1] == 48 + 4 + 34 + 4 + 29
    assert tinted[:, :48].any() and tinted[:, 52:86].any() and tinted[:, 90:].any()
    assert not tinted[:, 48:52].any() and not tinted[:, 86:90].any()
    from napari_pvs.project import CandidateRecord

    candidate = CandidateRecord(
        id=7, volume_id=1, model_version=0, bbox_start=[0, 10, 30], bbox_stop=[3, 30, 32],
        centre=[1.0, 20.0, 31.0], seed=[0, 10, 30], voxels=5, volume_mm3=1.0,
        mean_probability=0.5, uncertainty=0.5, rank=1, status="open",
    )  # fmt: skip
    patch = edit_patch(candidate, 12, (40, 48, 40))
    assert patch.id == -7 and patch.model_version == 0
    # 12 voxels a side, 20 where the cluster is longer; inside the volume; around the cluster
    assert [b - a for a, b in zip(patch.start, patch.stop, strict=True)] == [12, 20, 12]
    assert list(patch.start) == [0, 10, 25] and list(patch.stop) == [12, 30, 37]
    # near the volume's edge the box moves inside rather than shrinking
    near_edge = edit_patch(candidate, 12, (40, 48, 34))
    assert list(near_edge.start)[2] == 22 and list(near_edge.stop)[2] == 34

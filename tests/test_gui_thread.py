"""Create, Add and Make current run in their step's worker, and progress reaches the GUI thread
a few times a second: a 50 ms heartbeat never waits a second (the gross-freeze guard)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from napari_pvs import io
from napari_pvs._widgets import PVSWorkflow
from napari_pvs._widgets._jobs import PROGRESS_REPORTS_PER_SECOND, throttled
from napari_pvs.phantom import make_phantom
from test_workflow_widget import SHAPE, SPACING, Answers, Heartbeat  # the shared GUI helpers
from tiny_models import tiny_checkpoint

pytestmark = pytest.mark.gui

#: A heartbeat wait above this fails: a gross freeze (the 200 ms goal is benchmarks/bench_gui.py's).
FREEZE_S = 1.0
#: How long the stubbed slow core calls take: longer than FREEZE_S, so on the GUI thread they fail.
SLOW_S = 1.5


@pytest.fixture
def workflow(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = PVSWorkflow(viewer, ask=Answers())
    viewer.window.add_dock_widget(widget, area="right")
    yield widget
    widget.teardown()


def _slow_on(cls, name: str, threads: list, monkeypatch) -> None:
    """Make ``cls.name`` record its thread and take SLOW_S more, as a cold torch import does."""
    raw = cls.__dict__[name]
    func = raw.__func__ if isinstance(raw, classmethod) else raw

    def slow(*args, **kwargs):
        threads.append(threading.current_thread())
        time.sleep(SLOW_S)
        return func(*args, **kwargs)

    monkeypatch.setattr(cls, name, classmethod(slow) if isinstance(raw, classmethod) else slow)


def test_create_add_and_make_current_keep_the_gui_responsive(
    workflow, qtbot, tmp_path, monkeypatch
):
    from napari_pvs.project import Project

    checkpoint = tiny_checkpoint(tmp_path / "tiny.safetensors")
    phantom = make_phantom(SHAPE, SPACING, "T1", seed=3, severity=1.0, snr=20.0)
    scan = io.save_ome_zarr(tmp_path / "case_1.zarr", phantom.image, phantom.spacing, levels=1)
    threads: list[threading.Thread] = []
    for name in ("create", "add_volume", "rollback"):
        _slow_on(Project, name, threads, monkeypatch)
    step = workflow.project_step

    step.folder_edit.setText(str(tmp_path / "project"))
    step.model_edit.setText(str(checkpoint))
    with Heartbeat() as beat:
        assert step.start_create()
        assert not step.create_button.isEnabled() and "creating" in step.status_label.text()
        qtbot.waitUntil(lambda: not step.is_busy(), timeout=60000)
    assert workflow.state.project is not None, step.status_label.text()
    assert beat.longest < FREEZE_S, "Create: " + beat.report()

    with Heartbeat() as beat:
        assert step.start_add_paths([scan])
        assert not step.volumes_box.add_files_button.isEnabled()
        qtbot.waitUntil(lambda: not step.is_busy(), timeout=60000)
    assert beat.longest < FREEZE_S, "Add: " + beat.report()
    (record,) = workflow.state.project.volumes()
    assert record.name == "case_1" and record.modality == "T1"  # from the image: no hint in it
    assert step.volumes_box.add_files_button.isEnabled()
    assert "added case_1 (T1)" in step.status_label.text()

    train = workflow.train_step
    train.refresh_versions()
    train.versions_table.selectRow(0)
    with Heartbeat() as beat:
        assert train.start_rollback()
        assert not train.rollback_button.isEnabled()
        qtbot.waitUntil(lambda: not train.rollback_job.is_running(), timeout=60000)
    assert beat.longest < FREEZE_S, "Make current: " + beat.report()
    assert "v0 is current" in train.status_label.text()
    assert train.rollback_button.isEnabled()
    assert len(threads) == 3 and threading.main_thread() not in threads

    step.close_project()  # Open reads and checks the ledger in the worker too
    assert step.start_open() and not step.open_button.isEnabled()
    qtbot.waitUntil(lambda: not step.is_busy(), timeout=60000)
    assert workflow.state.project is not None and "opened project" in step.status_label.text()


def test_a_failed_create_says_why_and_gives_the_buttons_back(workflow, qtbot, tmp_path):
    step = workflow.project_step
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something.txt").write_text("not a project")
    step.folder_edit.setText(str(tmp_path / "full"))
    assert step.start_create()
    qtbot.waitUntil(lambda: not step.is_busy(), timeout=60000)
    assert workflow.state.project is None
    assert step.create_button.isEnabled() and step.status_label.text()
    assert "creating" not in step.status_label.text()


def test_progress_is_throttled_to_a_few_reports_a_second():
    received = []
    report = throttled(lambda done, total, message: received.append((done, message)))
    start = time.monotonic()
    for done in range(20_000):
        report(done, 20_000, "predicting")
    report(3, 3, "saving")  # a new phase always passes
    report(20_000, 20_000, "predicting")
    elapsed = time.monotonic() - start
    predicting = [r for r in received if r[1] == "predicting"]
    assert predicting[0] == (0, "predicting") and received[-1] == (20_000, "predicting")
    assert (3, "saving") in received
    assert len(received) <= 4 + elapsed * PROGRESS_REPORTS_PER_SECOND


def test_napari_in_progress_indicator_stays_still_while_a_job_runs(workflow, qtbot):
    """napari's status bar shows its "in progress" GIF while a job's progress bar is open,
    but on one frame: each frame would repaint the window with its OpenGL canvas (a third
    of the CPU under software OpenGL)."""
    from napari_pvs._widgets._jobs import BackgroundJob

    indicator = workflow.viewer.window._status_bar._activity_item._inProgressIndicator
    movie = indicator.movie()
    release = threading.Event()
    job = BackgroundJob(workflow)
    assert job.start(lambda progress, cancel: release.wait(10), "waiting")
    try:
        qtbot.waitUntil(lambda: not indicator.isHidden(), timeout=5000)
        first = movie.currentFrameNumber()
        qtbot.wait(600)  # several frames of the GIF's own timing
        assert movie.frameCount() > 1 and movie.currentFrameNumber() == first
        assert movie.state() != movie.MovieState.Running
    finally:
        release.set()
        qtbot.waitUntil(lambda: not job.is_running(), timeout=10000)
    assert indicator.isHidden()


def test_the_heap_is_frozen_after_a_job_that_imported_many_modules(workflow, qtbot):
    """A job that imported many modules (the first prediction imports torch) freezes the
    heap as it returns, so napari's collection on each layer removal has little to scan; a
    job that imported nothing freezes nothing."""
    import gc
    import sys
    import types

    from napari_pvs._widgets import _jobs

    names = [f"napari_pvs_test_module_{i}" for i in range(_jobs.FREEZE_AFTER_MODULES + 5)]

    def importing(progress, cancel):
        for name in names:
            sys.modules[name] = types.ModuleType(name)

    gc.unfreeze()
    _jobs._modules_at_freeze[0] = len(sys.modules)
    try:
        for work, frozen in ((lambda progress, cancel: None, False), (importing, True),
                             (lambda progress, cancel: None, False)):  # fmt: skip
            before = gc.get_freeze_count()
            job = _jobs.BackgroundJob(workflow)
            assert job.start(work, "a job")
            qtbot.waitUntil(lambda job=job: not job.is_running(), timeout=10000)
            assert (gc.get_freeze_count() > before) == frozen
    finally:
        for name in names:
            sys.modules.pop(name, None)
        gc.unfreeze()


EXIT_CHILD = """
import sys, time
import numpy as np, zarr
from qtpy.QtWidgets import QApplication
app = QApplication([])
from napari_pvs._widgets._jobs import BackgroundJob
store = zarr.create_array(sys.argv[1], shape=(64, 64, 64), chunks=(16, 16, 16), dtype="uint8")
store[...] = 1
def work(progress, cancel):
    time.sleep(1.0)  # the interpreter is exiting meanwhile
    print("read", int(np.asarray(zarr.open_array(sys.argv[1], mode="r")[...]).sum()), flush=True)
BackgroundJob(progress_bar=False).start(work, "reading")
time.sleep(0.2)
"""


def test_exit_waits_for_a_worker_still_reading_a_store(tmp_path):
    """Closing napari while a job reads a store: the job ends and the process exits (it
    crashed, or hung for good, when the exit shut down zarr's threads under the read)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "child.py"
    script.write_text(EXIT_CHILD)
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "s.zarr")], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "read 262144" in done.stdout


def test_contrast_set_in_the_project_table_reaches_the_prediction(workflow, qtbot, tmp_path):
    """Modality round trip: the Project table's Contrast -> the ledger -> the Segment step's
    choice -> the prediction's run signature (what the model was told)."""
    import zarr

    from napari_pvs.io import ATTRS_KEY

    checkpoint = tiny_checkpoint(tmp_path / "tiny.safetensors")
    noise = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    scan = io.save_ome_zarr(tmp_path / "scan.zarr", noise, (SPACING,) * 3, levels=1)
    step = workflow.project_step
    step.folder_edit.setText(str(tmp_path / "project"))
    step.model_edit.setText(str(checkpoint))
    assert step.start_create()
    qtbot.waitUntil(lambda: not step.is_busy(), timeout=60000)
    project = workflow.state.project
    workflow.state.update_settings(device="cpu", predict_mc=0, predict_tta=1)
    assert step.start_add_paths([scan])
    qtbot.waitUntil(lambda: not step.is_busy(), timeout=60000)
    assert project.volumes()[0].modality == "unknown"  # noise says nothing of its contrast
    assert "contrast unsure" in step.status_label.text()
    assert step.volumes_box.table.item(0, 4).text() == "unknown"

    step.volumes_box.table.selectRow(0)
    assert step.volumes_box.modality_combo.isEnabled()
    assert step.start_set_modality("T1")
    qtbot.waitUntil(lambda: not step.is_busy(), timeout=60000)
    assert project.volumes()[0].modality == "T1"
    assert step.volumes_box.table.item(0, 4).text() == "T1"

    layer = workflow.state.show_volume(project.volumes()[0])
    seg = workflow.segment_step
    seg.layer_combo.setCurrentText(layer.name)
    project.set_modality(project.volumes()[0].id, "unknown")
    workflow.state.volumes_changed.emit()
    assert seg.modality_combo.currentText() == "unknown"
    assert not seg.segment()  # the policy answers Cancel: the GUI asks, nothing runs
    question, choices = workflow.segment_step.state.ask.asked[-1]
    assert "contrast" in question and choices == ["T1", "T2", "Cancel"]
    project.set_modality(project.volumes()[0].id, "T1")
    workflow.state.volumes_changed.emit()
    assert seg.modality_combo.currentText() == "T1"  # the stored contrast
    seg.modality_combo.setCurrentText("T2")  # the Segment step's choice is used and kept
    seg.window_spin.setValue(32)
    seg.segment_button.click()
    qtbot.waitUntil(lambda: not seg.is_running(), timeout=120000)
    store = project.prediction_path(project.volumes()[0].id, 0)
    run = dict(zarr.open_group(str(store), mode="r").attrs)[ATTRS_KEY]["run"]
    assert run["modality"] == "T2" and project.volumes()[0].modality == "T2"
    assert run["tta"] == 1 and run["mc_samples"] == 0  # the project's settings, as asked


def test_rank_and_accept_keep_the_gui_responsive(workflow, qtbot, tmp_path, monkeypatch):
    """Rank and Accept (each 1.5 s slower here) run in the Review step's worker; the buttons
    wait, the heartbeat does not; an empty annotator is refused."""
    from napari_pvs.project import Project

    checkpoint = tiny_checkpoint(tmp_path / "tiny.safetensors")
    phantom = make_phantom(SHAPE, SPACING, "T1", seed=3, severity=1.0, snr=20.0)
    scan = io.save_ome_zarr(tmp_path / "case_1.zarr", phantom.image, phantom.spacing, levels=1)
    step = workflow.project_step
    step.folder_edit.setText(str(tmp_path / "project"))
    step.model_edit.setText(str(checkpoint))
    assert step.start_create()
    qtbot.waitUntil(lambda: not step.is_busy(), timeout=60000)
    project = workflow.state.project
    workflow.state.update_settings(device="cpu", predict_mc=2, predict_tta=1, patch=12, n=4)
    assert step.start_add_paths([scan])
    qtbot.waitUntil(lambda: not step.is_busy(), timeout=60000)
    threads: list[threading.Thread] = []
    for name in ("rank", "accept"):
        _slow_on(Project, name, threads, monkeypatch)

    review = workflow.review_step
    with Heartbeat() as beat:
        assert review.queue_box.rank()
        assert not review.queue_box.rank_button.isEnabled()
        qtbot.waitUntil(lambda: not review.is_busy(), timeout=120000)
    assert beat.longest < FREEZE_S, "Rank: " + beat.report()
    assert review.patch is not None, review.status_label.text()

    review.annotator_edit.setText("  ")
    assert not review.accept() and "Annotator" in review.status_label.text()
    assert project.annotations() == []
    review.annotator_edit.setText("rater-1")
    first = review.patch
    with Heartbeat() as beat:
        assert review.accept()
        assert not review.accept_button.isEnabled() and "saving patch" in (
            review.status_label.text()
        )
        qtbot.waitUntil(lambda: not review.is_busy(), timeout=60000)
    assert beat.longest < FREEZE_S, "Accept: " + beat.report()
    (annotation,) = project.annotations()
    assert annotation.patch_id == first.id and annotation.annotator == "rater-1"
    assert review.patch is not None and review.patch.id != first.id  # the next one opened
    assert review.accept_button.isEnabled()
    assert len(threads) == 2 and threading.main_thread() not in threads


def test_settings_are_read_from_the_ledger_once_per_project_and_change(
    workflow, tmp_path, monkeypatch
):
    """The steps read settings on the GUI thread: from the ledger once per opened project and
    after each change, else from what was read (this window holds the project's lock)."""
    from napari_pvs.project import Project

    reads = []
    original = Project.settings

    def counted(self):
        reads.append(self)
        return original(self)

    monkeypatch.setattr(Project, "settings", counted)
    checkpoint = tiny_checkpoint(tmp_path / "tiny.safetensors")
    state = workflow.state
    state.set_project(Project.create(tmp_path / "first", model=checkpoint))  # steps read them
    assert state.settings()["brush_size"] == state.settings()["brush_size"]
    assert len(reads) == 1
    state.settings()["patch"] = 999  # a copy: the cached values cannot be changed by a reader
    state.update_settings(patch=12, brush_size=3)
    assert (state.settings()["patch"], state.settings()["brush_size"]) == (12, 3)
    assert len(reads) == 2  # one more: what the change stored, read back once
    state.set_project(Project.create(tmp_path / "second", model=checkpoint))
    assert state.settings()["patch"] != 12  # the new project's own, read afresh
    assert len(reads) == 3


def test_the_annotator_starts_as_the_os_user(workflow):
    import getpass

    assert workflow.review_step.annotator_edit.text() == getpass.getuser()


def test_tables_are_read_and_volumes_removed_off_the_gui_thread(
    workflow, qtbot, tmp_path, monkeypatch
):
    """The Project step's volumes table (``status``, the stores' completeness), the Train
    step's versions table (``compare``, validation scores, the reviewed line) and Remove run
    in workers: made slower than a freeze, they leave the heartbeat alone, and the tables and
    the status column say what the ledger holds."""
    from napari_pvs.project import Project

    checkpoint = tiny_checkpoint(tmp_path / "tiny.safetensors")
    phantom = make_phantom(SHAPE, SPACING, "T2", seed=4, severity=1.0)
    scan = io.save_ome_zarr(tmp_path / "sub-01_T2w.zarr", phantom.image, phantom.spacing)
    with Project.create(tmp_path / "project", model=checkpoint) as project:
        project.add_volume(scan, modality="T2")
    threads: list[threading.Thread] = []
    for name in ("status", "compare", "rounds", "remove_volume"):
        _slow_on(Project, name, threads, monkeypatch)
    step, train, report = workflow.project_step, workflow.train_step, workflow.report_step
    step.folder_edit.setText(str(tmp_path / "project"))

    def reading() -> bool:
        return step.is_busy() or train.is_refreshing() or report.is_refreshing()

    with Heartbeat() as beat:
        assert step.open_project()  # the ledger is checked here (a script's call), then:
        assert step.is_busy() and train.is_refreshing() and report.is_refreshing()
        qtbot.waitUntil(lambda: not reading(), timeout=60000)  # the tables, the curve: workers
    assert beat.longest < FREEZE_S, "tables: " + beat.report()
    assert report.refresh_curve() == {"round": [], "reviewed patches": [], "dice": []}
    table = step.volumes_box.table
    assert table.rowCount() == 1 and table.item(0, 0).text() == "sub-01_T2w"
    assert table.item(0, 4).text() == "T2" and "v0 (current)" in step.project_label.text()
    assert train.versions_table.item(0, 0).text() == "v0*"
    assert train.versions_table.item(0, 4).text() == "current"
    assert "0 reviewed patches" in train.labelled_label.text()
    train.versions_table.selectRow(0)
    assert [row["version"] for row in train.compare()] == [0]  # from the read: no ledger call

    table.selectRow(0)
    with Heartbeat() as beat:
        assert step.start_remove_selected()
        assert not step.volumes_box.remove_button.isEnabled()
        qtbot.waitUntil(lambda: not step.is_busy(), timeout=60000)
    assert beat.longest < FREEZE_S, "Remove: " + beat.report()
    assert workflow.state.project.volumes() == [] and table.rowCount() == 0
    assert "removed sub-01_T2w" in step.status_label.text()
    assert len(threads) >= 5 and threading.main_thread() not in threads


def test_the_versions_status_says_what_a_version_is_now():
    """Never "new": current while it is, kept aside when the worse-round guard kept it out,
    else ready (Make current uses it), or its ledger status when not ready."""
    from napari_pvs._widgets.train import version_state
    from napari_pvs.project import ModelVersion

    def version(number, status="ready", **metrics):
        return ModelVersion(version=number, checkpoint=f"v{number}.safetensors", parent=None,
                            created="", status=status, metrics=metrics, manifest_hash="",
                            round=number or None)  # fmt: skip

    assert version_state(version(1), current=1) == "current"
    assert version_state(version(1), current=2) == "ready"  # a newer round made v2 current
    assert version_state(version(2, worse_than_base=True), current=1) == "kept aside"
    assert version_state(version(2, worse_than_base=True), current=2) == "current"  # made so
    assert version_state(version(3, status="failed"), current=1) == "failed"


def test_a_job_shows_napari_progress_bar_only_once_it_runs_past_the_delay(
    workflow, qtbot, monkeypatch
):
    """A napari progress bar costs the GUI thread 10-80 ms to make: a quick job (an Accept, a
    count) makes none; a long one gets it after BAR_DELAY_MS, with its last report."""
    from napari_pvs._widgets import _jobs
    from napari_pvs._widgets._jobs import BAR_DELAY_MS, BackgroundJob

    made = []

    def counted(*args, **kwargs):
        made.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    real = _jobs.napari_progress
    monkeypatch.setattr(_jobs, "napari_progress", counted)
    job = BackgroundJob(workflow)
    assert job.start(lambda progress_, cancel: 42, "quick")
    qtbot.waitUntil(lambda: not job.is_running(), timeout=5000)
    qtbot.wait(BAR_DELAY_MS + 100)
    assert made == []

    release = threading.Event()

    def slow(report, cancel):
        report(3, 10, "counting")
        release.wait(10)

    assert job.start(slow, "slow")
    try:
        qtbot.wait(BAR_DELAY_MS // 4)
        assert job._bar is None
        qtbot.waitUntil(lambda: job._bar is not None, timeout=5000)
        qtbot.waitUntil(lambda: job._bar.n == 3 and job._bar.total == 10, timeout=5000)
        assert made == ["slow"]
    finally:
        release.set()
        qtbot.waitUntil(lambda: not job.is_running(), timeout=10000)
    assert job._bar is None


def test_a_staged_step_that_returns_reads_holds_the_next_until_they_are_done(qtbot):
    """How a layer is shown once its first plane is read: the step after the reads waits,
    the event loop turning meanwhile (a timer still fires)."""
    from concurrent.futures import Future

    from qtpy.QtCore import QTimer

    from napari_pvs._widgets._layers import StagedLayers

    staged = StagedLayers()
    read: Future = Future()
    done: list[str] = []
    staged.run([lambda: [read], lambda: done.append("shown")])
    ticks: list[int] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(5)
    qtbot.waitUntil(lambda: len(ticks) >= 5, timeout=5000)
    assert done == [] and staged.is_running()  # the read is not done: nothing shown yet
    read.set_result(None)
    qtbot.waitUntil(lambda: not staged.is_running(), timeout=5000)
    assert done == ["shown"]
    timer.stop()


def test_3d_view_reads_a_closed_volume_in_the_worker_and_keeps_the_edits(
    workflow, qtbot, tmp_path, monkeypatch
):
    """The 3D view of an open patch whose volume layer the user closed: the volume is read in
    the Review step's worker (1.5 s slower here), then shown in 3D; the patch's unsaved
    edits stay."""
    from napari_pvs._widgets.review_layers import CONTEXT_LAYER, PATCH_LAYER
    from napari_pvs._widgets.state import WorkflowState

    checkpoint = tiny_checkpoint(tmp_path / "tiny.safetensors")
    phantom = make_phantom(SHAPE, SPACING, "T2", seed=3, severity=1.0, snr=20.0)
    scan = io.save_ome_zarr(tmp_path / "case_1.zarr", phantom.image, phantom.spacing, levels=1)
    step, review, viewer = workflow.project_step, workflow.review_step, workflow.viewer
    step.folder_edit.setText(str(tmp_path / "project"))
    step.model_edit.setText(str(checkpoint))
    assert step.start_create()
    qtbot.waitUntil(lambda: not step.is_busy(), timeout=60000)
    workflow.state.update_settings(device="cpu", predict_mc=2, predict_tta=1, patch=12, n=4)
    assert step.start_add_paths([scan])
    qtbot.waitUntil(lambda: not step.is_busy(), timeout=60000)
    assert review.queue_box.rank()
    qtbot.waitUntil(lambda: not review.is_busy(), timeout=120000)
    assert review.patch is not None, review.status_label.text()
    labels = viewer.layers[PATCH_LAYER]
    labels.paint(tuple(np.argwhere(np.asarray(labels.data) == 0)[0]), 1)
    edited = np.asarray(labels.data).copy()
    assert review.has_unsaved_edits()
    viewer.layers.remove(workflow.state.layer_for_volume(review.volume))

    threads: list[threading.Thread] = []
    read = WorkflowState.read_volume_layers

    def slow_read(volume):
        threads.append(threading.current_thread())
        time.sleep(SLOW_S)
        return read(volume)

    monkeypatch.setattr(WorkflowState, "read_volume_layers", staticmethod(slow_read))
    with Heartbeat() as beat:
        review.view3d_check.setChecked(True)
        assert "opening" in review.status_label.text()
        qtbot.waitUntil(
            lambda: viewer.dims.ndisplay == 3 and CONTEXT_LAYER in viewer.layers
            and viewer.layers[CONTEXT_LAYER].visible and viewer.layers[PATCH_LAYER].visible,
            timeout=60000,
        )  # fmt: skip
    assert beat.longest < FREEZE_S, "3D view: " + beat.report()
    assert threads and threading.main_thread() not in threads
    assert workflow.state.layer_for_volume(review.volume) is not None
    assert "opening" not in review.status_label.text()
    assert viewer.layers[PATCH_LAYER] is labels and review.has_unsaved_edits()
    np.testing.assert_array_equal(np.asarray(labels.data), edited)

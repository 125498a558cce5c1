"""Screenshots of every step of the napari workflow, from a real 1920x1080 napari window.

Runs the loop the README walks through on the sample-size phantom (96 x 112 x 96 voxels of
1.5 mm, saved as OME-Zarr): create a project, add the volume, segment it with the bundled
model, rank patches and open the first, paint corrections and accept three or more patches
(until a validation patch holds PVS), run a short training round, count the PVS burden, and save
one PNG per step into ``docs/images/``
(``workflow-project.png``, ``-segment``, ``-review``, ``-train``, ``-report``). It prints the
share of the window's width the canvas keeps, and how long each step took.

    xvfb-run -a -s "-screen 0 1920x1080x24" python examples/03_workflow_screenshots.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import napari
import numpy as np
from napari._qt.dialogs.qt_notification import NapariQtNotification
from PIL import Image as PILImage
from qtpy.QtWidgets import QApplication

from napari_pvs import io
from napari_pvs._widgets import PVSWorkflow
from napari_pvs._widgets.review_layers import PATCH_LAYER
from napari_pvs.phantom import make_phantom

SIZE = (1920, 1080)


def settle(seconds: float = 0.4) -> None:
    """Let the window lay out and draw (and queued timers fire)."""
    app = QApplication.instance()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.02)


def wait_for(busy, timeout: float = 900.0) -> None:
    app = QApplication.instance()
    end = time.perf_counter() + timeout
    while busy():
        if time.perf_counter() > end:
            raise TimeoutError("a step did not finish in time")
        app.processEvents()
        time.sleep(0.05)


def shoot(viewer: napari.Viewer, workflow: PVSWorkflow, step: str, out: Path) -> None:
    workflow.show_step(step)
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()  # pop-up notifications would cover the canvas
    settle()
    path = out / f"workflow-{step.lower()}.png"
    pixels = viewer.screenshot(canvas_only=False, flash=False)
    # a 256-colour palette keeps a UI screenshot sharp and small (< 400 KB)
    image = PILImage.fromarray(np.asarray(pixels)[..., :3]).quantize(colors=256, dither=0)
    image.save(path, optimize=True)
    print(f"saved {path} ({path.stat().st_size // 1024} KB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/images", help="folder for the PNGs")
    parser.add_argument("--model", default="default", help="'default' or a .safetensors file")
    parser.add_argument("--steps", type=int, default=30, help="training steps of the round")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="napari-pvs-screens-"))

    phantom = make_phantom((96, 112, 96), 1.5, "T2", seed=0)
    scan = io.save_ome_zarr(
        work / "sub-01_T2w.ome.zarr", phantom.image, phantom.spacing,
        labels={"pvs": phantom.pvs, "regions": phantom.regions}, modality="T2", levels=2,
    )  # fmt: skip

    viewer = napari.Viewer(title="napari-pvs")
    window = viewer.window._qt_window
    window.resize(*SIZE)
    _, workflow = viewer.window.add_plugin_dock_widget("napari-pvs", "PVS workflow")
    viewer.window._qt_window.grab()  # lay the window out once before the first screenshot
    settle(1.0)

    timings = {}
    started = time.perf_counter()
    project_step = workflow.project_step
    project_step.folder_edit.setText(str(work / "project"))
    project_step.model_edit.setText(args.model)
    project_step.create_project()
    workflow.state.update_settings(predict_mc=4, predict_tta=1, n=12, patch=16)
    image, truth = viewer.open(str(scan), plugin="napari-pvs")[:2]
    truth.visible = False  # the phantom's ground truth: not what a user would see
    project_step.volumes_box.layer_combo.setCurrentText(image.name)
    project_step.add_current_layer()  # in the step's worker
    wait_for(project_step.is_busy)
    viewer.layers.selection.active = image
    timings["project"] = time.perf_counter() - started

    started = time.perf_counter()
    segment = workflow.segment_step
    segment.layer_combo.setCurrentText(image.name)
    workflow.show_step("Segment")
    segment.segment()
    wait_for(segment.is_running)
    timings["segment"] = time.perf_counter() - started
    shoot(viewer, workflow, "Segment", out)

    started = time.perf_counter()
    review = workflow.review_step
    review.queue_box.rank()
    wait_for(review.queue_box.job.is_running)
    layer = viewer.layers[PATCH_LAYER]
    project = workflow.state.project
    # accept patches until one with PVS is a validation patch (about 1 accepted patch in 4
    # is one), so the round can measure Dice
    # (the annotator here corrects each patch to the phantom's ground truth)
    while len(project.annotations()) < 3 or not any(
        a.split == "validation" and a.pvs_voxels for a in project.annotations()
    ):
        if review.patch is None or review.patch.status != "new":
            review.queue_box.rank()  # this queue is done: rank the next patches
            wait_for(review.queue_box.job.is_running)
            if review.patch is None or review.patch.status != "new":
                break
        box = tuple(slice(a, b) for a, b in zip(review.patch.start, review.patch.stop,
                                                strict=True))  # fmt: skip
        layer.data = phantom.pvs[box].astype(np.uint8)
        review.accept()  # saved in the step's worker, then the next patch opens
        wait_for(review.is_busy)
    # leave a patch with predicted PVS open for the picture, its uncertainty overlaid
    for index, patch in enumerate(review.queue.patches):
        if patch.status == "new" and patch.predicted_pvs > 0:
            review.open_patch(index)
            break
    review.uncertainty_check.setChecked(True)
    timings[f"review ({len(project.annotations())} accepted)"] = time.perf_counter() - started
    shoot(viewer, workflow, "Review", out)

    started = time.perf_counter()
    train = workflow.train_step
    train.steps_spin.setValue(args.steps)
    review.contour_check.setChecked(False)
    review.uncertainty_check.setChecked(False)
    viewer.reset_view()
    train.start()
    wait_for(lambda: train.outcome is None)
    wait_for(segment.is_running)
    timings["train"] = time.perf_counter() - started
    print(f"round: {train.outcome}")
    wait_for(train.is_refreshing)  # the versions table, read in a worker
    shoot(viewer, workflow, "Train", out)

    started = time.perf_counter()
    report = workflow.report_step
    report.compute_burden()
    wait_for(report.job.is_running)
    wait_for(report.is_refreshing)  # the learning curve, read in a worker
    report.refresh_curve()
    timings["report"] = time.perf_counter() - started
    shoot(viewer, workflow, "Report", out)
    wait_for(project_step.is_busy)  # the table read again after the round
    project_step.volumes_box.table.selectRow(0)  # the volume's state after the loop
    shoot(viewer, workflow, "Project", out)

    canvas = viewer.window._qt_viewer.canvas.native
    print(
        f"window {window.width()}x{window.height()}, dock {workflow.width()} px, canvas "
        f"{canvas.width()}x{canvas.height()} ({canvas.width() / window.width():.0%} of the width)"
    )
    print("seconds per step: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    workflow.teardown()
    viewer.close()


if __name__ == "__main__":
    main()

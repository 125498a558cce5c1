"""Opening a project with a 1024^3 volume and its prediction in the workflow: time to the first
drawn slice and peak resident memory, each in a fresh process under Xvfb.

Goal (issue 10): first slice in under 2 s, resident memory under 1 GB.

Built once and cached (``NAPARI_PVS_BENCH_DIR``, default ``$TMPDIR/napari-pvs-bench``):
- the 1024^3 uint16 OME-Zarr of ``bench_open.bench_store`` (3 levels);
- a project (``Project.create`` with the default model) holding that volume;
- its prediction store at ``project.prediction_path(vid)``. The store is **synthetic**:
  predicting 1024^3 on CPU takes far longer than this benchmark should, and opening does not
  depend on the values. It has exactly the layout ``inference.Predictor`` writes (the
  Predictor's own ``_signature`` and ``_create_store`` make it, with the project's predictor
  options, so the run signature matches and ``has_prediction`` sees it complete); the arrays
  are then filled slab by slab with cheap values (thin tubes of high probability), the
  Predictor's ``write_display_levels`` writes the max-pooled display levels (512^3, 256^3), every
  chunk is marked done and ``complete`` is set with the PVS count recorded (the core's
  ``count_pvs``), as a finished run leaves it.

Rows (a fresh ``xvfb-run`` process each; napari viewer with ``show=False``, the window grabbed
once to lay it out before the clock starts; "drawn" = ``viewer.screenshot(canvas_only=True)``
has non-black pixels; RSS is the process peak, ``VmHWM``, imports included):
- ``napari, dask levels (reference)``: plain napari given the OME-Zarr's levels as
  ``da.from_zarr`` arrays (what napari does with any OME-Zarr), to its first drawn slice;
- ``napari viewer.open, our reader``: the napari-pvs reader (direct display views,
  :mod:`napari_pvs.display`), to its first drawn slice;
- ``project: open -> volume drawn``: the workflow's Project step ``open_project`` on the
  folder, its volumes table read (in a worker), the volume selected and "Show in viewer"
  pressed (opening a project shows no layers by itself), to the volume's first drawn slice (a
  large volume's first plane comes from the level whose plane decodes within
  ``display.FIRST_PLANE_VOXELS``; napari chooses again once the user zooms);
- ``project: ... -> prediction drawn``: then the Segment step's Segment on that volume (with a
  complete prediction it computes nothing: it shows the probability and segmentation layers,
  then counts PVS in the background), to the slice with those two layers drawn. Time from
  ``open_project``. The next row is the time until the hidden uncertainty layers, added one
  per event-loop turn after the shown ones, are in the layer list too. Its peak RSS is taken
  right then (the goal's figure).

Then, in the project process: the longest wait of a 50 ms QTimer heartbeat from the open to the
last layer, and scrolling the next 50 planes, across a chunk-slab boundary
(``dims.set_current_step`` + a screenshot, the PVS count still running in the background as it
does for a user), with the peak RSS after them
(the slab cache of :mod:`napari_pvs.display` filled) and whether torch was imported at all.

Run: ``xvfb-run`` is started by the script itself (it must be installed):
``.venv/bin/python benchmarks/bench_project_open.py [--size 1024] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_open import bench_store

GOAL_SECONDS = 2.0
GOAL_MB = 1024.0

_CHILD = r"""
import json, sys, time
mode, path, folder = sys.argv[1], sys.argv[2], sys.argv[3]
import numpy as np
import napari
from qtpy.QtWidgets import QApplication

def wait(condition, what, limit=120.0):
    started = time.perf_counter()
    while not condition():
        QApplication.processEvents()
        if time.perf_counter() - started > limit:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.002)

def drawn():
    pixels = viewer.screenshot(canvas_only=True, flash=False)
    return bool(np.any(pixels[..., :3] > 0))

def peak_mb():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmHWM")) / 1024

viewer = napari.Viewer(show=False)
result = {}
if mode in ("reference", "reader"):
    import dask.array as da
    viewer.window._qt_window.grab()
    t0 = time.perf_counter()
    if mode == "reference":  # napari's own way with an OME-Zarr: dask levels, its dask cache
        levels = [da.from_zarr(f"{path}/{i}") for i in range(3)]
        viewer.add_image(levels, multiscale=True)
    else:
        viewer.open(path, plugin="napari-pvs")
    wait(drawn, "the first slice")
    result["seconds"] = time.perf_counter() - t0
else:
    from napari_pvs._widgets.main import PVSWorkflow
    workflow = PVSWorkflow(viewer)
    viewer.window.add_dock_widget(workflow)
    viewer.window._qt_window.grab()
    step, segment = workflow.project_step, workflow.segment_step
    from qtpy.QtCore import QTimer
    ticks = []
    beat = QTimer()
    beat.setInterval(50)
    beat.timeout.connect(lambda: ticks.append(time.perf_counter()))
    t0 = time.perf_counter()
    beat.start()
    step.folder_edit.setText(folder)
    assert step.open_project()
    wait(lambda: not step.is_busy(), "the volumes table (read off the GUI thread)")
    step.volumes_box.table.selectRow(0)
    step.volumes_box.show_selected()  # the volume is read in a worker, then added
    wait(lambda: not step.is_busy(), "the volume's read")
    layer = step.volumes_box.shown
    assert layer is not None
    wait(drawn, "the volume's first slice")
    result["volume_seconds"] = time.perf_counter() - t0
    segment.layer_combo.setCurrentText(layer.name)
    assert segment.segment()
    # the first slice with the prediction: probability and segmentation shown (the hidden
    # uncertainty layers are still being added, one per event-loop turn, behind it)
    def shown():
        layers = [segment.result_layers.get(a) for a in ("probability", "segmentation")]
        return all(lyr is not None and lyr.visible for lyr in layers)
    wait(shown, "the prediction layers")
    assert drawn()
    result["seconds"] = time.perf_counter() - t0
    result["rss_mb"] = peak_mb()  # the goal's figure: opened and drawn
    result["multiscale"] = all(
        segment.result_layers[a].multiscale for a in ("probability", "segmentation")
    )
    wait(lambda: segment.result is not None and not segment.job.is_running()
         and not segment.staged.is_running(), "every result layer")
    result["all_layers_seconds"] = time.perf_counter() - t0
    beat.stop()
    # the longest the event loop was held between two heartbeat ticks (the first tick waits
    # for the open itself, which runs in the calling turn: it is left out)
    result["longest_wait"] = max(b - a for a, b in zip(ticks[1:], ticks[2:]))
    # scrolling: the next 50 planes (one chunk-slab boundary) of the volume and both
    # prediction layers, read and drawn
    z = viewer.dims.current_step[0]
    steps = []
    for k in range(1, 51):
        started = time.perf_counter()
        viewer.dims.set_current_step(0, z + k)
        drawn()
        steps.append(time.perf_counter() - started)
    result["next_plane_seconds"] = sum(steps) / len(steps)
    result["median_plane_seconds"] = sorted(steps)[len(steps) // 2]
    result["worst_plane_seconds"] = max(steps)
    result["second_worst_plane_seconds"] = sorted(steps)[-2]
if mode == "project":  # then scrolled, with the slab cache filled
    result["scrolled_rss_mb"] = peak_mb()
    result["torch_imported"] = "torch" in sys.modules
else:
    result["rss_mb"] = peak_mb()
print(json.dumps(result), flush=True)
import os
os._exit(0)  # a background count may still run: nothing is written, nothing to wait for
"""


def bench_project(size: int) -> tuple[Path, Path]:
    """Create (once) the volume, a project holding it and a synthetic complete prediction."""
    import numpy as np

    from napari_pvs.inference import DONE_ARRAY, Predictor, WindowPlan, write_display_levels
    from napari_pvs.inference.inputs import as_source
    from napari_pvs.inference.store import create_store
    from napari_pvs.intensity import robust_range
    from napari_pvs.io import ATTRS_KEY
    from napari_pvs.project import Project

    volume_path = bench_store(size)
    folder = volume_path.parent / f"project_{size}"
    if (folder / ".bench-complete-levels-256").exists():
        record_pvs_count(folder)  # a build from before stores recorded it: added once
        return volume_path, folder
    if folder.exists():
        import shutil

        shutil.rmtree(folder)  # an earlier build was interrupted: ours, start over
    started = time.perf_counter()
    with Project.create(folder, model="default") as project:
        record = project.add_volume(volume_path)
        out = project.prediction_path(record.id)
        out.parent.mkdir(parents=True, exist_ok=True)
        model, _ = project.load_model(device="cpu")
        predictor = Predictor(model, modality=record.modality, **project.predictor_options())
        volume = project.open_volume(record.id)
        src = as_source(volume)
        plan = WindowPlan(src.data.shape, predictor.window, predictor.overlap, predictor.chunks)
        signature = predictor._signature(plan.shape, src.modality, robust_range(src.data))
        create_store(out, json.loads(json.dumps(signature)), plan, src, predictor.output_arrays)

        import zarr

        group = zarr.open_group(str(out), mode="r+")
        slab = plan.chunks[0]
        _, ny, nx = plan.shape
        y, x = np.ogrid[:ny, :nx]
        tubes = ((y % 40) < 2) & ((x % 40) < 2)  # thin tubes along z: PVS-like, compressible
        for z0 in range(0, plan.shape[0], slab):
            depth = min(slab, plan.shape[0] - z0)
            probability = np.where(tubes, np.float16(0.9), np.float16(0.02))
            probability = np.broadcast_to(probability, (depth, ny, nx))
            box = slice(z0, z0 + depth)
            group["probability"][box] = probability
            group["segmentation"][box] = (probability >= predictor.threshold).astype(np.uint8)
            for name in predictor.output_arrays[2:]:
                group[name][box] = (probability * np.float16(0.1)).astype(np.float16)
            print(f"synthetic prediction {z0 + depth}/{plan.shape[0]}", end="\r", file=sys.stderr)
        print("\nwriting display levels", file=sys.stderr)
        write_display_levels(group, predictor.output_arrays, predictor.display_edge)
        group[DONE_ARRAY][...] = np.ones(plan.chunk_grid, np.uint8)
        attrs = dict(group.attrs[ATTRS_KEY])
        attrs["complete"] = True
        group.attrs[ATTRS_KEY] = attrs
        assert project.has_prediction(record.id), "the synthetic store is not seen as complete"
    record_pvs_count(folder)  # as the predictor does when it completes a store
    (folder / ".bench-complete-levels-256").write_text("")  # (older layouts: rebuilt)
    print(f"\nbuilt {folder} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return volume_path, folder


def record_pvs_count(folder: Path) -> None:
    """Record the PVS count in a cached build's store, as the predictor does, if it has none."""
    import zarr

    from napari_pvs.io import ATTRS_KEY
    from napari_pvs.io.predictions import PVS_COUNT, pvs_count_record, recorded_pvs_count
    from napari_pvs.metrics import count_pvs
    from napari_pvs.project import Project

    with Project.open(folder) as project:
        out = project.prediction_path(project.volumes()[0].id)
    group = zarr.open_group(str(out), mode="r+")
    if recorded_pvs_count(group) is None:
        attrs = dict(group.attrs[ATTRS_KEY])
        attrs[PVS_COUNT] = pvs_count_record(*count_pvs(group["segmentation"]))
        group.attrs[ATTRS_KEY] = attrs


def measure(mode: str, volume: Path, folder: Path, repeats: int) -> dict:
    """Best times, highest peak RSS and longest wait over ``repeats`` fresh processes."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            ["xvfb-run", "-a", "-s", "-screen 0 1920x1080x24",
             sys.executable, "-c", _CHILD, mode, str(volume), str(folder)],
            capture_output=True, text=True,
        )  # fmt: skip
        if out.returncode != 0:
            raise SystemExit(f"{mode} run failed:\n{out.stdout}\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    # the highest over the runs; times: the best
    worst = ("rss_mb", "scrolled_rss_mb", "longest_wait", "worst_plane_seconds",
             "second_worst_plane_seconds", "torch_imported")  # fmt: skip
    merged = {key: min(r[key] for r in runs) for key in runs[0] if key not in worst}
    merged.update({key: max(r[key] for r in runs) for key in worst if key in runs[0]})
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="edge of the cube (default 1024)")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per row")
    args = parser.parse_args()
    volume, folder = bench_project(args.size)
    reference = measure("reference", volume, folder, args.repeats)
    reader = measure("reader", volume, folder, args.repeats)
    project = measure("project", volume, folder, args.repeats)
    rows = [
        ("napari, dask levels (reference)", reference["seconds"], reference["rss_mb"], False),
        ("napari viewer.open, our reader", reader["seconds"], reader["rss_mb"], False),
        ("project: open -> volume drawn", project["volume_seconds"], None, True),
        ("project: ... -> prediction drawn", project["seconds"], project["rss_mb"], True),
        ("  (hidden uncertainty layers added)", project["all_layers_seconds"], None, False),
    ]
    print(f"\n{args.size}^3 uint16 volume + synthetic prediction, best of {args.repeats} processes")
    print(f"{'row':34s} {'seconds':>8s} {'peak RSS MB':>12s}  {'goal':18s} met")
    for label, seconds, rss, goal in rows:
        rss_text = f"{rss:12.0f}" if rss is not None else f"{'(same run)':>12s}"
        if goal:
            ok = seconds < GOAL_SECONDS and (rss if rss is not None else 0) < GOAL_MB
            met = "yes" if ok else "NO"
            goal_text = f"< {GOAL_SECONDS:g} s, < {GOAL_MB:g} MB"
        else:
            met, goal_text = "", ""
        print(f"{label:34s} {seconds:8.2f} {rss_text}  {goal_text:18s} {met}")
    levels = "yes" if project.get("multiscale") else "no"
    print(f"prediction layers drawn from their display levels (multiscale): {levels}")
    print(f"longest event-loop wait while opening (50 ms heartbeat): "
          f"{project['longest_wait'] * 1000:.0f} ms")
    print(f"scrolling 50 planes (volume + 2 prediction layers read and drawn): mean "
          f"{project['next_plane_seconds'] * 1000:.0f} ms, median "
          f"{project['median_plane_seconds'] * 1000:.0f} ms, slowest two "
          f"{project['worst_plane_seconds'] * 1000:.0f} and "
          f"{project['second_worst_plane_seconds'] * 1000:.0f} ms; peak RSS after scrolling "
          f"{project['scrolled_rss_mb']:.0f} MB; torch imported: "
          f"{'yes' if project['torch_imported'] else 'no'}")  # fmt: skip


if __name__ == "__main__":
    main()

"""A napari session driven from a script: the sample phantom, segmented and ranked.

Opens napari with the T2w (or T1w) sample phantom and both napari-pvs panels, segments it with
the bundled default model (Monte Carlo dropout for uncertainty), ranks the patches most worth
correcting and jumps to the first one. With ``--screenshot`` it saves the window and closes
(this is how ``docs/images/napari-segment.png`` is made, under ``xvfb-run`` on a headless
machine); without it the window stays open for you to explore.

    python examples/02_napari_session.py
    xvfb-run -a python examples/02_napari_session.py --screenshot docs/images/napari-segment.png
"""

from __future__ import annotations

import argparse
import time

import napari
from qtpy.QtWidgets import QApplication

from napari_pvs._widgets.segment import SegmentPanel


def wait_for(panel: SegmentPanel) -> None:
    """Keep the GUI responsive while the panel's background job runs."""
    app = QApplication.instance()
    while panel.is_running():
        app.processEvents()
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modality", choices=["T1", "T2"], default="T2")
    parser.add_argument("--model", default="default", help="'default' or a .safetensors file")
    parser.add_argument("--mc", type=int, default=8, help="Monte Carlo dropout samples")
    parser.add_argument("--strategy", default="stratified", help="patch ranking strategy")
    parser.add_argument("--screenshot", help="save the window to this PNG and close")
    args = parser.parse_args()

    viewer = napari.Viewer()
    viewer.open_sample("napari-pvs", f"pvs_phantom_{args.modality.lower()}w")
    viewer.window.add_plugin_dock_widget("napari-pvs", "Volume panel")
    _, panel = viewer.window.add_plugin_dock_widget("napari-pvs", "Segment PVS")
    panel.model_edit.setText(args.model)
    panel.mc_spin.setValue(args.mc)

    started = time.perf_counter()
    panel.segment()
    wait_for(panel)
    print(f"segmented in {time.perf_counter() - started:.1f} s: {panel.summary_label.text()}")
    ranking = panel.ranking_box
    ranking.strategy_combo.setCurrentText(args.strategy)
    ranking.n_spin.setValue(10)
    ranking.patch_spin.setValue(16)  # the sample is a small (96 x 112 x 96) volume
    ranking.rank()
    wait_for(panel)
    ranking.table.selectRow(0)
    for row in ranking.ranking[:5]:
        print(f"patch {row.rank}: score {row.score:.4f}, centre {row.centre}, "
              f"{row.predicted_pvs} predicted PVS")

    if args.screenshot:
        viewer.layers[f"PVS phantom {args.modality}w PVS ground truth"].visible = False
        viewer.window._qt_window.resize(1500, 1150)
        from napari._qt.dialogs.qt_notification import NapariQtNotification

        for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
            toast.close()  # pop-up notifications would cover the canvas
        for _ in range(20):  # let the window lay out and draw before grabbing it
            QApplication.instance().processEvents()
            time.sleep(0.05)
        viewer.screenshot(args.screenshot, canvas_only=False, flash=False)
        viewer.close()
    else:
        napari.run()


if __name__ == "__main__":
    main()

"""The standalone Segment PVS panel's ranking: rank controls, the ranking job, the ranked table.

:func:`napari_pvs.ranking.rank_patches` ranks patches of the panel's prediction store off the
GUI thread (its own :class:`~napari_pvs._widgets._jobs.BackgroundJob`, shown on the panel's
progress bar) and :func:`~napari_pvs.ranking.save_ranking` writes the ranking beside the store;
selecting a row zooms the view to that patch and outlines it. A new segmentation clears the
ranking. In the workflow the Review step ranks through the project instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import QFormLayout, QGroupBox, QHBoxLayout, QLabel, QPushButton, QSpinBox

from napari_pvs._widgets._common import fill_table, strategy_combo
from napari_pvs._widgets._jobs import BackgroundJob
from napari_pvs._widgets._layers import box_world, find_layer, show_box, zoom_to
from napari_pvs._widgets.patch_table import ranking_table, show_ranking
from napari_pvs.display import as_dask
from napari_pvs.progress import CancelToken, ProgressCallback
from napari_pvs.ranking import (
    DEFAULT_PATCH,
    RankedPatch,
    rank_patches,
    save_ranking,
    shortfall_message,
)

if TYPE_CHECKING:
    from napari_pvs._widgets.segment import SegmentPanel

#: The layer outlining the selected ranked patch.
OUTLINE_LAYER = "ranked patch"


class RankingBox(QGroupBox):
    """Rank patches of the panel's prediction for review and browse them.

    It ranks the prediction store of the panel's chosen image (:meth:`SegmentPanel.output_path`)
    and reports on the panel's status line; the panel is busy while it ranks.
    """

    def __init__(self, panel: SegmentPanel) -> None:
        super().__init__("Rank patches for review")
        self.panel = panel
        self.viewer = panel.viewer
        self.state = panel.state
        #: the ranking (the core's rows; the table shows them) and the files it was saved to
        self.ranking: list[RankedPatch] = []
        self.ranking_files: tuple[Path, Path] | None = None
        self._geometry: dict[str, Any] = {}  # the ranked layer's scale, translate; n, patch
        self.job = BackgroundJob(self)
        self.job.succeeded.connect(self._on_ranked)
        self.job.failed.connect(self._on_failed)
        self.job.cancelled.connect(self._on_cancelled)
        self._build()
        self.state.settings_changed.connect(self.apply_settings)
        self.apply_settings()

    def _build(self) -> None:
        form = QFormLayout(self)
        self.strategy_combo = strategy_combo("bald needs MC samples or flips at segmentation time")
        form.addRow("Strategy", self.strategy_combo)
        self.n_spin = QSpinBox()
        self.n_spin.setRange(1, 500)
        self.n_spin.setValue(20)
        self.patch_spin = QSpinBox()
        self.patch_spin.setRange(4, 256)
        self.patch_spin.setValue(DEFAULT_PATCH)
        row = QHBoxLayout()
        row.addWidget(QLabel("N"))
        row.addWidget(self.n_spin)
        row.addWidget(QLabel("patch"))
        row.addWidget(self.patch_spin)
        form.addRow(row)
        self.rank_button = QPushButton("Rank patches")
        self.rank_button.clicked.connect(self.rank)
        form.addRow(self.rank_button)
        self.table = ranking_table()
        self.table.itemSelectionChanged.connect(self._on_row_selected)
        form.addRow(self.table)

    def apply_settings(self) -> None:
        """The strategy and patch size of the shared settings."""
        settings = self.state.settings()
        self.strategy_combo.setCurrentText(str(settings["strategy"]))
        self.patch_spin.setValue(int(settings["patch"]))

    def clear(self) -> None:
        """Forget the ranking (a new segmentation replaces what it ranked)."""
        self.ranking, self.ranking_files = [], None
        fill_table(self.table, [])
        outline = find_layer(self.viewer, OUTLINE_LAYER)
        if outline is not None:
            self.viewer.layers.remove(outline)

    def rank(self) -> bool:
        """Rank patches of the chosen layer's prediction in the background."""
        panel = self.panel
        if panel.is_running():
            panel.report("a segmentation or ranking is already running", error=True)
            return False
        layer, store = panel.current_layer(), panel.output_path()
        if layer is None or store is None or not store.exists():
            panel.report("no prediction for this image yet; press Segment first", error=True)
            return False
        strategy = self.strategy_combo.currentText()
        n, patch = self.n_spin.value(), self.patch_spin.value()
        self.state.update_settings(strategy=strategy, patch=patch, n=n)
        self._geometry = {
            "scale": tuple(layer.scale),
            "translate": tuple(layer.translate),
            "units": tuple(layer.units),
            "n": n,
            "patch": patch,
        }
        panel.set_busy(True)
        panel.cancel_button.setEnabled(False)  # ranking is short and takes no cancel token
        panel.status_label.setText(f"ranking {n} patches by {strategy}…")

        image = as_dask(layer.data[0] if layer.multiscale else layer.data)  # skips air

        def work(progress: ProgressCallback, cancel: CancelToken):
            table = rank_patches(store, n=n, patch=patch, strategy=strategy, image=image)
            # re-ranking replaces the panel's own ranking files
            return table, save_ranking(table, store, overwrite=True), tuple(image.shape)

        self.job.start(work, f"Ranking patches ({strategy})")
        return True

    def _on_ranked(self, value: Any) -> None:
        self.panel.set_busy(False)
        self._show_ranking(*value)

    def _on_failed(self, message: str) -> None:
        self.panel.set_busy(False)
        self.panel.report(message, error=True)

    def _on_cancelled(self) -> None:
        self.panel.set_busy(False)
        self.panel.report("ranking cancelled")

    def _show_ranking(
        self, table: list[RankedPatch], files: tuple[Path, Path], shape: tuple[int, ...]
    ) -> None:
        self.ranking, self.ranking_files = list(table), files
        show_ranking(self.table, table)
        message = f"{len(table)} patches ranked; saved {files[0].name} and {files[1].name}"
        why = shortfall_message(len(table), self._geometry["n"], shape, self._geometry["patch"])
        self.panel.report(f"{message}. {why}" if why else message, warning=bool(why))

    def _on_row_selected(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if rows:
            self.go_to_patch(rows[0].row())

    def go_to_patch(self, row: int) -> np.ndarray:
        """Zoom the view to ranked patch ``row`` and outline it; returns its centre (world)."""
        patch = self.ranking[row]
        scale = self._geometry["scale"]
        translate = self._geometry["translate"]
        _, world = box_world(patch.bbox_start, patch.bbox_stop, scale, translate)
        extent = (np.asarray(patch.bbox_stop) - patch.bbox_start) * np.asarray(scale[-3:])
        active = self.viewer.layers.selection.active
        outline = show_box(self.viewer, OUTLINE_LAYER, patch.bbox_start, patch.bbox_stop,
                           scale, translate)  # fmt: skip
        zoom_to(self.viewer, world, extent)
        segmentation = self.panel.result_layers.get("segmentation")
        if active is None or active is outline or not active.visible:
            active = segmentation if segmentation in self.viewer.layers else None
        if active is not None:
            self.viewer.layers.selection.active = active  # keep annotating where the user was
        self.panel.status_label.setText(
            f"patch {patch.rank}: score {patch.score:.4f}, {patch.predicted_pvs} predicted PVS"
        )
        return world

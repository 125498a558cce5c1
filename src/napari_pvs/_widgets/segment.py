"""The "Segment PVS" panel (and the workflow's Segment step): run a model over an image layer.

A thin Qt adapter over :func:`~napari_pvs._widgets.segment_run.run_segmentation` (the core's
:class:`napari_pvs.inference.Predictor`, or :meth:`napari_pvs.project.Project.predict` with the
project's model version for a volume of the open project), which writes a resumable prediction
store chunk by chunk off the GUI thread (via :class:`~napari_pvs._widgets._jobs.BackgroundJob`).
The fields it runs on are :class:`~napari_pvs._widgets.segment_options.SegmentOptions`. The
result comes back as lazy layers read from that store, added one per event-loop turn
(:class:`~napari_pvs._widgets._layers.StagedLayers`) so the canvas keeps drawing; the PVS are
counted after. A new run replaces the earlier run's layers (never a labels layer holding unsaved
corrections: it asks first) and, standalone, its ranking. As a standalone panel it also ranks
patches (:class:`~napari_pvs._widgets.ranking_panel.RankingBox`); in the workflow the Review
step does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtWidgets import QFormLayout, QGroupBox, QLabel, QPushButton, QVBoxLayout

from napari_pvs._widgets._common import notify, status_label
from napari_pvs._widgets._jobs import BackgroundJob, JobProgress, keep_activity_indicator_still
from napari_pvs._widgets._layers import (
    EDITED_KEY,
    PREDICTION_KEY,
    StagedLayers,
    find_layer,
    has_unsaved_edits,
    prefetch_first_plane,
    prepare_layer_dependencies,
    replace_labels,
    start_at_affordable_level,
    track_edits,
    warm_up_labels_visuals,
)
from napari_pvs._widgets.ranking_panel import RankingBox
from napari_pvs._widgets.segment_options import SegmentOptions
from napari_pvs._widgets.segment_run import (
    UNCERTAINTY_DISPLAY,
    SegmentResult,
    open_display_levels,
    pvs_statistics,
    run_segmentation,
)
from napari_pvs._widgets.state import VOLUME_KEY, WorkflowState
from napari_pvs.progress import CancelToken, ProgressCallback

if TYPE_CHECKING:
    import napari

__all__ = ["SegmentPanel"]

#: Metadata key naming the model (version) a result layer came from.
MODEL_KEY = "model_version"


def as_float32(data: Any) -> Any:
    """Float16 predictions as float32 for display (vispy has no float16 textures), per level
    (a dask array, a :class:`~napari_pvs.display.DisplayLevel`, or a list of either)."""
    if isinstance(data, list):
        return [level.astype(np.float32) for level in data]
    return data.astype(np.float32)


class SegmentPanel(SegmentOptions):
    """Segment PVS with the default model, a checkpoint or the project's model version.

    ``state`` is the workflow's shared state (a fresh one, without a project, when the panel
    is opened on its own); ``standalone`` adds the ranking section the Review step replaces.
    """

    def __init__(
        self,
        napari_viewer: napari.viewer.Viewer,
        state: WorkflowState | None = None,
        standalone: bool = True,
    ) -> None:
        super().__init__(napari_viewer, state)
        keep_activity_indicator_still(napari_viewer)
        self.job = BackgroundJob(self)
        self.job.succeeded.connect(self._on_succeeded)
        self.job.failed.connect(self._on_failed)
        self.job.cancelled.connect(self._on_cancelled)
        #: counts PVS of a shown result (after its layers are on screen)
        self.count_job = BackgroundJob(self)
        self.count_job.succeeded.connect(self._on_counted)
        self.count_job.failed.connect(self._on_count_failed)
        self.staged = StagedLayers(self)
        warm_up_labels_visuals()
        #: the last segmentation run
        self.result: SegmentResult | None = None
        self._geometry: dict[str, Any] = {}  # layer name, scale, translate, metadata of the run
        self._volume_id: int | None = None
        #: result layers of the last run by array name ("segmentation", "probability", ...)
        self.result_layers: dict[str, Image | Labels] = {}
        self._names: dict[str, str] = {}

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self._build_segment_box())
        #: the ranking section (standalone only; in the workflow the Review step ranks)
        self.ranking_box = RankingBox(self) if standalone else None
        if self.ranking_box is not None:
            self.progress.follow(self.ranking_box.job)
            layout.addWidget(self.ranking_box)
        self.status_label = status_label()
        layout.addWidget(self.status_label)
        layout.addStretch(1)

        self._follow_fields()
        self.state.versions_changed.connect(self._follow_current_version)

    # ---------------------------------------------------------------- building
    def _build_segment_box(self) -> QGroupBox:
        box = QGroupBox("Segment PVS")
        form = QFormLayout(box)
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        self._add_option_rows(form)
        self.segment_button = QPushButton("Segment")
        self.segment_button.clicked.connect(self.segment)
        form.addRow(self.segment_button)
        self.progress = JobProgress("windows")
        self.progress.follow(self.job)
        self.cancel_button = self.progress.cancel_button
        form.addRow(self.progress)
        self.summary_label = QLabel("")
        self.summary_label.setWordWrap(True)
        form.addRow(self.summary_label)
        return box

    # ---------------------------------------------------------------- status
    def report(self, message: str, error: bool = False, warning: bool = False) -> None:
        """The panel's status line and a napari notification (the ranking section's too)."""
        notify(self.status_label, message, "error" if error else "warning" if warning else "info")

    def set_busy(self, busy: bool) -> None:
        """Segment and Rank wait while a run, its layers, its count or a ranking are going."""
        self.segment_button.setEnabled(not busy)
        if self.ranking_box is not None:
            self.ranking_box.rank_button.setEnabled(not busy)

    def is_running(self) -> bool:
        """A run, its layers still being added, its PVS still being counted, or a ranking."""
        jobs = [self.job, self.count_job]
        if self.ranking_box is not None:
            jobs.append(self.ranking_box.job)
        return self.staged.is_running() or any(job.is_running() for job in jobs)

    def _follow_current_version(self) -> None:
        """After a round or a roll back: show the current version's prediction of the volume
        whose result is on screen, when it has one (a finished store: nothing is recomputed)."""
        project, result = self.state.project, self.result
        if project is None or result is None or result.version is None or self.is_running():
            return
        layer = find_layer(self.viewer, self._geometry.get("name", ""))
        volume = self.state.volume_for_layer(layer)
        current = project.current_version().version
        if (
            volume is None
            or current == result.version
            or not project.has_prediction(volume.id, current)
        ):
            return
        self.layer_combo.setCurrentText(layer.name)
        self.version_combo.setCurrentIndex(max(0, self.version_combo.findData(current)))
        self.segment()

    # ---------------------------------------------------------------- segmentation
    def _result_names(self, base: str, suffix: str = "") -> dict[str, str]:
        titles = {"segmentation": "segmentation", "probability": "probability"}
        titles.update({key: title for key, (title, _) in UNCERTAINTY_DISPLAY.items()})
        return {key: f"{base} PVS {title}{suffix}" for key, title in titles.items()}

    def _protect_corrections(self, names: dict[str, str]) -> dict[str, str] | None:
        """Ask before a new result replaces a segmentation layer holding painted corrections.

        "Keep a copy" renames the edited layer "<name> (corrected)" (numbered when one exists)
        and keeps its data; the result then goes to the volume's usual layers, so each volume
        and version keeps one set of result layers. Returns the names to write the results
        under, or None when the user cancelled.
        """
        edited = find_layer(self.viewer, names["segmentation"])
        if not has_unsaved_edits(edited):
            return names
        choice = self.state.ask(
            self,
            "Unsaved corrections",
            f"'{edited.name}' holds corrections you painted that are not saved. Keep them in a "
            "copy (renamed '… (corrected)') and show the new result in the usual layers, "
            "replace them, or cancel?",
            ["Keep a copy", "Replace", "Cancel"],
        )
        if choice == "Cancel":
            return None
        if choice == "Replace":
            return names
        # the edited layer may read lazily from the store the new run rewrites: keep a copy
        if not isinstance(edited.data, np.ndarray):
            edited.data = np.asarray(edited.data)
        edited.metadata.pop(PREDICTION_KEY, None)
        copy_name, index = f"{names['segmentation']} (corrected)", 2
        while find_layer(self.viewer, copy_name) is not None:
            copy_name, index = f"{names['segmentation']} (corrected {index})", index + 1
        edited.name = copy_name
        if self.result_layers.get("segmentation") is edited:
            del self.result_layers["segmentation"]  # no longer this panel's result layer
        return names

    def segment(self) -> bool:
        """Start segmenting the chosen layer in the background; False if it could not start."""
        if self.is_running():
            self.report("a segmentation or ranking is already running", error=True)
            return False
        layer = self.current_layer()
        if layer is None:
            self.report("no image layer to segment; open a volume or a sample first", error=True)
            return False
        try:
            request = self.segment_request(layer)
        except ValueError as exc:
            self.report(str(exc), error=True)
            return False
        project, version = request.project, request.version
        if project is not None and request.volume.modality == "unknown":
            # the model needs the contrast: ask rather than predict badly in silence
            choice = self.state.ask(
                self,
                "Which contrast?",
                f"The contrast of {layer.name} could not be told from the image. Is it T1 "
                "(CSF dark) or T2 (CSF bright)? It is kept in the project.",
                ["T1", "T2", "Cancel"],
            )
            if choice not in ("T1", "T2"):
                self.report("segmentation not started: choose the volume's contrast")
                return False
            self.modality_combo.setCurrentText(choice)
            request = self.segment_request(layer)
        if project is not None:  # what this run uses, every project prediction uses
            self.state.update_settings(predict_mc=request.mc_samples, predict_tta=request.tta)
        label = f"v{version}" if version is not None else "new"
        names = self._protect_corrections(self._result_names(layer.name))
        if names is None:
            self.report("segmentation not started: your corrections are untouched")
            return False
        if request.volume_id is not None:
            holder = self.state.claim(request.volume_id, "the Segment step")
            if holder is not None:
                self.report(f"{holder} is predicting this volume; wait for it to finish",
                            error=True)  # fmt: skip
                return False
        self._names = names
        if request.overwrite:
            # the store is about to be rewritten: layers reading it would show a half-run
            self._remove_result_layers(names)
        self._geometry = {
            "name": layer.name,
            "scale": tuple(layer.scale),
            "translate": tuple(layer.translate),
            "units": tuple(layer.units),
            "axis_labels": tuple(layer.axis_labels),
            "metadata": {
                k: v for k, v in layer.metadata.items() if k in ("affine", "spacing", "axes")
            },
            "source": request.volume.source,
            "modality": request.volume.modality,
        }
        self._volume_id = request.volume_id
        self.result = None
        self.set_busy(True)
        self.summary_label.setText("")
        model = f"model {label}" if project is not None else request.model
        self.status_label.setText(f"segmenting {layer.name} with {model}…")

        def work(progress: ProgressCallback, cancel: CancelToken) -> SegmentResult:
            result = open_display_levels(run_segmentation(request, progress, cancel, count=False))
            prepare_layer_dependencies()  # here, not in the result layers' turns
            return result

        self.job.start(work, f"Segmenting {layer.name}")
        return True

    def cancel(self) -> None:
        """Stop the running segmentation within one batch per network lane; finished chunks
        are kept."""
        self.job.cancel()
        self.cancel_button.setEnabled(False)
        self.status_label.setText("cancelling…")

    def _on_succeeded(self, result: SegmentResult) -> None:
        self.state.release(self._volume_id)
        self._show_segmentation(result)

    def _on_failed(self, message: str) -> None:
        self.state.release(self._volume_id)
        self.set_busy(False)
        self.report(message, error=True)

    def _on_cancelled(self) -> None:
        self.state.release(self._volume_id)
        self.set_busy(False)
        self.report("segmentation cancelled; finished chunks are kept, Segment resumes")

    def _remove_result_layers(self, names: dict[str, str]) -> None:
        for name in names.values():
            layer = find_layer(self.viewer, name)
            if layer is not None and not has_unsaved_edits(layer):
                self.viewer.layers.remove(layer)

    def _swappable_in_view(self, name: str, data, kind: str) -> Image | Labels | None:
        """The shown layer of that name that can take ``data`` without being hidden: one
        level in and out, the same shape (the same volume predicted again, as after a round).

        Hiding and showing a layer makes the canvas link its visuals' shader programs again,
        each compiled on the GUI thread under software OpenGL (``bench_gui``'s count for the
        round phase: 8 with the hide and show, 4 with the swap; napari relinks a labels
        layer's program on every new data anyway). Such a layer keeps showing and swaps data
        once the new data's plane is read (:func:`prefetch_first_plane` with ``data``).
        """
        existing = find_layer(self.viewer, name)
        if (
            isinstance(existing, Labels if kind == "labels" else Image)
            and existing.visible
            and not existing.multiscale
            and not isinstance(data, list)
            and tuple(existing.data.shape) == tuple(data.shape)
        ):
            return existing
        return None

    def _put_layer(
        self, name: str, data, kind: str, keep_visible: bool = False, **kwargs
    ) -> Image | Labels:
        """Add the layer, or give an existing one of that name the new data (keeps display).

        The layer comes back hidden: a hidden layer is not sliced, so building it and reading
        its first slice (a ``show`` step later) happen in different event-loop turns. With
        ``keep_visible``, a shown layer stays shown (see :meth:`_swappable_in_view`).
        """
        existing = find_layer(self.viewer, name)
        kwargs["visible"] = False
        multiscale = isinstance(data, list)
        kwargs["multiscale"] = multiscale
        if isinstance(existing, Labels if kind == "labels" else Image) and (
            existing.multiscale == multiscale
        ):
            if not keep_visible:
                existing.visible = False
            if "contrast_limits" in kwargs and tuple(existing.contrast_limits) != tuple(
                kwargs["contrast_limits"]
            ):
                existing.contrast_limits = kwargs["contrast_limits"]
            existing.metadata = kwargs["metadata"]
            if isinstance(existing, Labels):
                replace_labels(existing, data)  # no undo of the earlier result's strokes
            else:
                existing.data = data
            start_at_affordable_level(self.viewer, existing)
            return existing  # (a layer cannot turn multiscale: then it is built anew)
        if existing is not None:
            self.viewer.layers.remove(existing)
        add = self.viewer.add_labels if kind == "labels" else self.viewer.add_image
        layer = add(data, name=name, **kwargs)
        start_at_affordable_level(self.viewer, layer)  # a 1024^3 one's first plane: 512^3's
        return layer

    def _show_segmentation(self, result: SegmentResult) -> None:
        """Replace the earlier run's layers with this one's, one layer per event-loop turn."""
        self.result = result
        geometry = self._geometry
        metadata = {
            **geometry["metadata"],
            "napari_pvs": True,
            "source": geometry["source"],
            "modality": geometry["modality"],
            PREDICTION_KEY: str(result.out),
            MODEL_KEY: result.model,
        }
        if self._volume_id is not None:
            metadata[VOLUME_KEY] = self._volume_id
        common = {k: geometry[k] for k in ("scale", "translate", "units", "axis_labels")}
        names = self._names
        wanted = [a for a in result.arrays if a in ("segmentation", "probability")]
        if self.uncertainty_check.isChecked():
            wanted += [a for a in result.arrays if a in UNCERTAINTY_DISPLAY]
        # the earlier run's layers this run does not replace are stale: they go
        stale = [
            layer
            for key, layer in self.result_layers.items()
            if key not in wanted and layer in self.viewer.layers and not has_unsaved_edits(layer)
        ]
        for layer in stale:
            self.viewer.layers.remove(layer)
        self.result_layers = {}
        if self.ranking_box is not None:
            self.ranking_box.clear()

        def data_of(array: str):
            # a large prediction is drawn from its display levels (see Predictor.display_edge)
            levels = result.levels[array]  # opened in the worker
            # display views napari reads directly (read-only; one plane per slice, no dask
            # graph on the GUI thread); the segmentation of one level as dask, which a labels
            # layer can be painted over (on the first stroke it becomes numpy)
            if array == "segmentation":
                return levels if len(levels) > 1 else levels[0].to_dask()
            return as_float32(levels if len(levels) > 1 else levels[0])

        def kind_of(array: str) -> str:
            return "labels" if array == "segmentation" else "image"

        order = [a for a in ("probability", "segmentation") if a in wanted]
        order += [a for a in wanted if a in UNCERTAINTY_DISPLAY]
        datas = {array: data_of(array) for array in order}

        def add(array: str, keep_visible: bool = False) -> None:
            data = datas[array]
            keep = {"keep_visible": keep_visible}
            if array == "segmentation":
                layer = self._put_layer(
                    names[array], data, "labels", metadata=dict(metadata), **keep, **common
                )
                layer.metadata.pop(EDITED_KEY, None)
                layer.brush_size = int(self.state.settings()["brush_size"])
                layer.selected_label = 1
                track_edits(layer)
            elif array == "probability":
                layer = self._put_layer(
                    names[array],
                    data,
                    "image",
                    metadata=dict(metadata),
                    contrast_limits=(0.0, 1.0),
                    colormap="inferno",
                    blending="additive",
                    opacity=0.7,
                    **keep,
                    **common,
                )
            else:
                _, limits = UNCERTAINTY_DISPLAY[array]
                layer = self._put_layer(
                    names[array],
                    data,
                    "image",
                    metadata=dict(metadata),
                    contrast_limits=limits,
                    colormap="viridis",
                    **keep,
                    **common,
                )
            self.result_layers[array] = layer

        def read_ahead(array: str) -> list:
            layer = self.result_layers.get(array)
            if layer is None or layer not in self.viewer.layers:
                return []
            return prefetch_first_plane(self.viewer, layer)  # shown once read

        def show(array: str) -> None:
            layer = self.result_layers.get(array)
            if layer is not None and layer in self.viewer.layers:
                layer.visible = True

        def read_ahead_of_swap(array: str, layer: Image | Labels) -> list:
            if layer not in self.viewer.layers:
                return []
            return prefetch_first_plane(self.viewer, layer, data=datas[array])

        steps = []
        for array in order:
            shown = self._swappable_in_view(names[array], datas[array], kind_of(array))
            if shown is not None:  # swapped in place once its new plane is read
                steps += [lambda a=array, s=shown: read_ahead_of_swap(a, s),
                          lambda a=array: add(a, keep_visible=True)]  # fmt: skip
            elif array in ("probability", "segmentation"):
                steps += [lambda a=array: add(a), lambda a=array: read_ahead(a),
                          lambda a=array: show(a)]  # fmt: skip
            else:  # uncertainty layers stay hidden (not sliced) until the user shows one
                steps.append(lambda a=array: add(a))
        steps.append(lambda: self._finish_segmentation(result))
        self.staged.run(steps)

    def _finish_segmentation(self, result: SegmentResult) -> None:
        """The layers are on screen: say so, then count PVS (the panel is busy until then)."""
        segmentation = self.result_layers.get("segmentation")
        if segmentation is not None:
            self.viewer.layers.selection.active = segmentation  # a visible layer, ready to paint
        self._show_summary(result)
        message = f"segmented {self._geometry['name']} with model {result.model} -> {result.out}"
        if segmentation is not None and segmentation.multiscale:
            message += (
                f"; shown at {len(segmentation.data)} scales, it is too large to paint in "
                "place: correct it patch by patch in the Review step"
            )
        self.report(message, warning=bool(result.notes))
        out = result.out
        self.count_job.start(lambda progress, cancel: pvs_statistics(out), "Counting PVS")

    def _on_counted(self, counts: tuple[int, float, int | None]) -> None:
        self.set_busy(False)
        result = self.result
        if result is None:
            return
        result.pvs_voxels, result.pvs_volume_mm3, result.pvs_count = counts
        self._show_summary(result)
        if self._volume_id is not None and result.version is not None:
            self.state.pvs_counts[(self._volume_id, result.version)] = result.pvs_count
            self.state.predictions_changed.emit(self._volume_id)

    def _on_count_failed(self, message: str) -> None:
        self.set_busy(False)
        self.report(message, error=True)

    def _show_summary(self, result: SegmentResult) -> None:
        summary = result.summary
        if result.pvs_voxels is None:
            pvs = "counting PVS…"
        else:
            count = result.pvs_count if result.pvs_count is not None else "not counted (too large)"
            pvs = f"{count} PVS, {result.pvs_volume_mm3:.1f} mm³ ({result.pvs_voxels} voxels)"
        if result.device:
            text = f"{pvs}; model {result.model}, {result.seconds:.1f} s on {result.device}"
        else:
            text = f"{pvs}; model {result.model}, its stored prediction (nothing recomputed)"
        if summary is not None:
            text += f"; {summary.windows_run}/{summary.windows_total} windows"
            if summary.chunks_skipped:
                text += f" (resumed: {summary.chunks_skipped}/{summary.chunks_total} chunks kept)"
        self.summary_label.setText("\n".join([text, *result.notes]))

"""Layer helpers the panels share: an image layer as a core ``Volume``, where its prediction
goes, layers added in pieces so the canvas keeps drawing, patch boxes and zooming to them.

Adding a napari layer builds its controls and its vispy visual on the GUI thread (about
100-250 ms each on 2 cores); adding a segmentation's four or five result layers in one go
stalled the viewer for 0.6-1 s. :class:`StagedLayers` adds one per event-loop turn instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels, Layer, Shapes
from qtpy.QtCore import QObject, QTimer, Signal

from napari_pvs import io
from napari_pvs.cohort import output_name
from napari_pvs.display import as_dask, first_level, prefetch_plane

if TYPE_CHECKING:
    import napari

#: How often a staged step waiting for reads looks whether they are done (ms).
WAIT_POLL_MS = 10

#: Metadata key marking layers made from a prediction store (value: the store path).
PREDICTION_KEY = "prediction"
#: metadata key of the layers that show one review patch (the volume id they belong to)
PATCH_OF_KEY = "patch_of"
#: Metadata key set on a labels layer once the user painted into it (unsaved corrections).
EDITED_KEY = "napari_pvs_edited"


def input_image_layers(viewer: napari.viewer.Viewer) -> list[Image]:
    """Image layers a user may segment or add: not our results, not a review patch's overlay."""
    return [
        layer
        for layer in viewer.layers
        if isinstance(layer, Image)
        and PREDICTION_KEY not in layer.metadata
        and PATCH_OF_KEY not in layer.metadata
    ]


def find_layer(viewer: napari.viewer.Viewer, name: str) -> Layer | None:
    return next((layer for layer in viewer.layers if layer.name == name), None)


def layer_source(layer: Layer) -> str | None:
    """The file or folder the layer was read from (our reader's metadata, else napari's)."""
    source = layer.metadata.get("source") or layer.source.path
    return str(source).rstrip("/") if source else None


def layer_volume(layer: Image, modality: str) -> io.Volume:
    """The image layer as an :class:`io.Volume` (finest level, geometry from its metadata)."""
    data = as_dask(layer.data[0] if layer.multiscale else layer.data)
    if layer.rgb or getattr(data, "ndim", 0) != 3:
        raise ValueError(
            f"layer {layer.name!r} has shape {tuple(data.shape)}; PVS segmentation needs a "
            "single-channel 3D volume (open one with the napari-pvs reader)"
        )
    meta = layer.metadata
    scale = [float(s) for s in layer.scale[-3:]]
    affine = meta.get("affine")
    if affine is None:
        affine = np.diag([*scale, 1.0])
        affine[:3, 3] = layer.translate[-3:]
    return io.Volume(
        data=data,
        spacing=tuple(float(s) for s in meta.get("spacing", scale)),  # type: ignore[arg-type]
        affine=np.asarray(affine, dtype=np.float64),
        modality=io.normalize_modality(modality),
        source=layer_source(layer),
        axes=tuple(meta.get("axes", ("z", "y", "x"))),  # type: ignore[arg-type]
    )


def default_output(layer: Image, scratch: Path) -> Path:
    """``<name>_pvs.zarr`` next to the layer's file, or in ``scratch`` for in-memory layers."""
    source = layer_source(layer)
    if source:
        path = Path(source)
        return path.parent / (output_name(path)[: -len(".zarr")] + "_pvs.zarr")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", layer.name).strip("_") or "image"
    return scratch / f"{safe}_pvs.zarr"


def track_edits(layer: Labels) -> None:
    """Mark the layer as holding unsaved corrections as soon as the user paints into it."""

    def mark(event=None) -> None:
        layer.metadata[EDITED_KEY] = True

    layer.events.paint.connect(mark)


def has_unsaved_edits(layer: Layer | None) -> bool:
    return isinstance(layer, Labels) and bool(layer.metadata.get(EDITED_KEY))


def prepare_layer_dependencies() -> None:
    """Do in a worker what napari does on the GUI thread for the first layers of a session:
    build pint's unit registry (every layer's units: 0.4-1 s, once), import scipy.ndimage
    (the first thumbnail: up to 0.8 s), pandas (the first labels layer's feature table:
    0.3-0.6 s), skimage.color (every labels layer's random colours: 0.17 s the first
    time) and scipy.spatial (the 3D camera's rotations: 0.05-0.1 s). Called by the workers
    that hand back something to show (a project opened or created, a segmentation), so the
    layers built from it find them ready."""
    import pandas  # noqa: F401
    import pint
    import skimage.color  # noqa: F401
    from scipy import ndimage  # noqa: F401
    from scipy.spatial import transform  # noqa: F401

    pint.get_application_registry().pixel  # noqa: B018 (the lazy registry builds itself here)


def warm_up_labels_visuals() -> None:
    """Compute now what vispy computes once per process for the first labels layer.

    Its line visuals build 13 dash patterns in Python (about 0.1 s, cached after); doing it
    when a panel is built keeps that out of the first result's layer-building turn.
    """
    try:
        from vispy.visuals.line.dash_atlas import DashAtlas
    except ImportError:  # a vispy without it: nothing to warm up
        return
    DashAtlas()


def replace_labels(layer: Labels, data, *, in_place: bool = False) -> None:
    """Give a labels layer new data, with an undo history that starts from it.

    napari's data setter keeps the layer's history, whose strokes are voxel indices and
    values: Ctrl+Z after the swap wrote the previous data's last stroke into the new data
    (the previous patch's stroke undone inside the next patch's prefill).

    ``in_place``: when the layer's array is its own (nobody else holds it) and ``data`` has
    its shape and dtype, copy ``data`` into it and refresh. napari's vispy labels layer links
    its shader program again on every ``data`` event (a probe under software OpenGL: a canvas
    turn of 80-100 ms against 60-70 ms in place); a refresh only uploads the new plane.
    """
    current = layer.data
    if (
        in_place
        and isinstance(current, np.ndarray)
        and isinstance(data, np.ndarray)
        and current is not data
        and current.shape == data.shape
        and current.dtype == data.dtype
        and current.flags.writeable
    ):
        current[...] = data
        layer.refresh()
    else:
        layer.data = data
    layer._reset_history()  # (napari has no public call for it)


def start_at_affordable_level(viewer: napari.viewer.Viewer, layer: Layer) -> int | None:
    """Show a multiscale layer first at the finest level whose whole plane decodes at most
    :data:`napari_pvs.display.FIRST_PLANE_VOXELS`, until the user zooms or turns to 3D.

    napari picks the level that has a voxel per screen pixel over the whole field of view: at
    1024^3 on a 600-pixel canvas, full resolution, a plane that decodes a slab of whole chunks
    (90-290 ms on the GUI thread per layer). The level is locked (napari's own
    ``locked_data_level``, shown in the layer controls) and unlocked at the first zoom or
    switch to 3D: napari then picks again for the zoomed view, which reads only what it shows.
    Call it while the layer is hidden (or before it is sliced) so that only this level is read.
    Returns the level locked, or None (not multiscale, or napari's finest already affordable).
    """
    if not getattr(layer, "multiscale", False) or viewer.dims.ndisplay != 2:
        return None
    across = [axis - (viewer.dims.ndim - layer.ndim) for axis in viewer.dims.not_displayed]
    across = [axis for axis in across if axis >= 0]
    if not across:
        return None
    level = first_level(layer.data, across[-1])
    if level == 0:
        return None
    layer.locked_data_level = level
    hooks: list[tuple[object, Callable]] = []

    def release(event=None) -> None:
        for emitter, callback in hooks:
            emitter.disconnect(callback)
        hooks.clear()
        if layer.locked_data_level == level:
            layer.locked_data_level = None  # napari's own choice from now on

    def removed(event) -> None:
        if event.value is layer:
            release()

    hooks += [(viewer.scene.camera.events.zoom, release), (viewer.dims.events.ndisplay, release),
              (layer.events.data, release),  # new data: the lock was for the old levels
              (viewer.layers.events.removed, removed)]  # fmt: skip
    for emitter, callback in hooks:
        emitter.connect(callback)
    return level


def prefetch_first_plane(
    viewer: napari.viewer.Viewer,
    layer: Layer,
    point: Sequence[float] | None = None,
    data: Any = None,
) -> list[Future]:
    """Start reading, off the GUI thread, what a hidden layer's first plane reads once shown
    (:func:`napari_pvs.display.prefetch_plane`: the slabs of its shown level and of its
    thumbnail's, at the viewer's current plane, or at the world ``point`` the view is about
    to move to); returns the reads on their way. With ``data`` (one level, of the layer's
    shape), the plane of that data, which is about to replace the layer's: a shown layer
    then swaps to it without a read on the GUI thread.

    Showing a 1024^3 layer read that plane on the GUI thread, in the turn that made it
    visible: 0.2-0.37 s with the event loop held. Shown once these reads are done, napari's
    own read of the same plane is a copy from memory. Best effort: a layer whose data is not
    a display view, a 3D view, or a plane napari then reads differently (the view zoomed
    meanwhile) is read as before, on the GUI thread.
    """
    if viewer.dims.ndisplay != 2:
        return []
    across = [axis - (viewer.dims.ndim - layer.ndim) for axis in viewer.dims.not_displayed]
    across = [axis for axis in across if axis >= 0]
    if len(across) != 1:
        return []
    axis = across[0]
    point = float(layer.world_to_data(viewer.dims.point if point is None else point)[axis])
    if data is not None:
        levels, wanted, factors = [data], {0}, [1.0]
    elif getattr(layer, "multiscale", False):
        levels = list(layer.data)
        shown = layer.locked_data_level
        shown = layer.data_level if shown is None else shown
        wanted = {shown, getattr(layer, "_thumbnail_level", len(levels) - 1)}
        factors = [float(layer.downsample_factors[k][axis]) for k in range(len(levels))]
    else:
        levels, wanted, factors = [layer.data], {0}, [1.0]
    reads = []
    for k in sorted(wanted):
        at = point / factors[k]  # napari rounds it: both neighbours (mostly one slab)
        for plane in {int(np.floor(at)), int(np.ceil(at))}:
            read = prefetch_plane(levels[k], axis, plane)
            if read is not None:
                reads.append(read)
    return reads


class StagedLayers(QObject):
    """Runs layer-building steps one per event-loop turn, so the viewer draws between them.

    A step may return reads on their way (a list of futures, as from
    :func:`prefetch_first_plane`): the next step then runs once they are done, the event loop
    turning meanwhile. ``run`` replaces whatever was still pending (a newer result supersedes
    an older one); ``finished`` fires after the last step.
    """

    finished = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._steps: list[Callable[[], object]] = []
        #: reads the next step waits for (what the last step returned)
        self._waiting: list[Future] = []
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(0)
        self._timer.timeout.connect(self._next)

    def run(self, steps: Sequence[Callable[[], object]]) -> None:
        self._steps = list(steps)
        self._waiting = []
        self._timer.start(0)

    def is_running(self) -> bool:
        return bool(self._steps) or self._timer.isActive()

    def stop(self) -> None:
        self._steps = []
        self._waiting = []
        self._timer.stop()

    def _next(self) -> None:
        if self._waiting:
            if not all(read.done() for read in self._waiting):
                self._timer.start(WAIT_POLL_MS)
                return
            self._waiting = []
        if not self._steps:
            return
        step = self._steps.pop(0)
        try:
            outcome = step()
        finally:
            if self._steps:
                self._timer.start(0)
            else:
                self.finished.emit()
        if isinstance(outcome, list) and all(isinstance(r, Future) for r in outcome):
            self._waiting = list(outcome)


#: The box outline's width in voxels: thin enough to see the voxels along its edge.
BOX_EDGE = 0.3


def box_outline(start: Sequence[int], stop: Sequence[int]) -> list[np.ndarray]:
    """A 3D box as one rectangle per slice of its first axis (pixel edges, data coordinates)."""
    (z0, y0, x0), (z1, y1, x1) = start, stop
    lo_y, hi_y, lo_x, hi_x = y0 - 0.5, y1 - 0.5, x0 - 0.5, x1 - 0.5
    return [
        np.array([[z, lo_y, lo_x], [z, lo_y, hi_x], [z, hi_y, hi_x], [z, hi_y, lo_x]], float)
        for z in range(z0, z1)
    ]


def show_box(
    viewer: napari.viewer.Viewer,
    name: str,
    start: Sequence[int],
    stop: Sequence[int],
    scale: Sequence[float],
    translate: Sequence[float],
    color: str = "yellow",
) -> Shapes:
    """Draw the box in a shapes layer ``name`` (made once, reused), on the volume's grid."""
    layer = find_layer(viewer, name)
    scale = np.asarray(scale[-3:], dtype=float)
    translate = np.asarray(translate[-3:], dtype=float)
    if isinstance(layer, Shapes):
        layer.data = []
        layer.scale, layer.translate = scale, translate
    else:
        if layer is not None:
            viewer.layers.remove(layer)
        layer = viewer.add_shapes(
            name=name, ndim=3, scale=scale, translate=translate, units=("mm",) * 3,
            edge_width=BOX_EDGE,
        )  # fmt: skip
    layer.add_rectangles(
        box_outline(start, stop), edge_color=color, face_color="transparent", edge_width=BOX_EDGE
    )
    return layer


def box_world(
    start: Sequence[int], stop: Sequence[int], scale: Sequence[float], translate: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """The box's first voxel's origin (world) and its centre (world), on a layer's grid."""
    scale = np.asarray(scale[-3:], dtype=float)
    translate = np.asarray(translate[-3:], dtype=float)
    origin = np.asarray(start, dtype=float) * scale + translate
    centre = (np.asarray(start) + np.asarray(stop) - 1) / 2 * scale + translate
    return origin, centre


def zoom_to(
    viewer: napari.viewer.Viewer,
    centre_world: Sequence[float],
    extent_world: Sequence[float],
    fraction: float = 0.45,
) -> None:
    """Put the slider on the centre and zoom so the extent fills ``fraction`` of the canvas."""
    ndim = viewer.dims.ndim
    viewer.dims.set_point(range(ndim - 3, ndim), tuple(float(c) for c in centre_world))
    viewer.scene.camera.center = tuple(float(c) for c in centre_world)
    size = np.asarray(viewer.canvas.size, dtype=float)  # (height, width) in pixels
    shown = np.asarray(extent_world[-2:], dtype=float)
    if viewer.dims.ndisplay == 3:
        shown = np.full(2, float(np.max(extent_world)))
    if np.all(size > 0) and np.all(shown > 0):
        viewer.scene.camera.zoom = float(np.min(size * fraction / shown))

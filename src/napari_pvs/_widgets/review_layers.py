"""The Review step's layers: the patch under review, its box and its uncertainty overlay.

The patch is one in-memory labels layer at the box (``translate`` = the box's first voxel in
world coordinates, ``scale`` = the spacing), prefilled with the model's segmentation of the
box (the prediction the patch was ranked on, else the current version's) and, where the
volume was reviewed, the accepted labels. The box is outlined by the labels layer's own
bounding box (napari's overlay: no layer of its own to build, tessellate and draw); the
overlay is the patch's predictive entropy from the same prediction store. Both carry the
volume id (:data:`~napari_pvs._widgets._layers.PATCH_OF_KEY`) and are removed together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Image, Labels

from napari_pvs._widgets._layers import (
    PATCH_OF_KEY,
    box_world,
    find_layer,
    prefetch_first_plane,
    replace_labels,
    zoom_to,
)
from napari_pvs._widgets.state import WorkflowState

if TYPE_CHECKING:
    from napari_pvs.project import PatchRecord

PATCH_LAYER = "patch under review"
#: The patch box's outline: its labels layer's bounding box, in canvas pixels.
BOX_COLOR = "yellow"
BOX_LINE_PIXELS = 2.0
UNCERTAINTY_LAYER = "patch uncertainty"
CONTEXT_LAYER = "patch surroundings (3D)"
#: The share of the canvas the 3D view's box spans face on: turned any way, its diagonal (up
#: to sqrt(3) times its edge) stays in view. (It was 0.6, which a turn pushed off the canvas;
#: the smaller view is also a third fewer pixels for software OpenGL to cast rays through.)
VIEW_3D_FRACTION = 0.5
#: The 3D view shows the patch's box grown by this fraction of its edge on every side (at
#: least MIN_MARGIN voxels), clipped to the volume: the patch in its surroundings, not the
#: whole head (which hides it, and takes minutes to upload at 256^3 and more).
MARGIN_FRACTION = 0.5
MIN_MARGIN = 4


def patch_box(patch: PatchRecord) -> tuple[slice, slice, slice]:
    """The patch's voxels in its volume, as slices."""
    return tuple(slice(a, b) for a, b in zip(patch.start, patch.stop, strict=True))


def _prefill_key(patch: PatchRecord) -> tuple:
    """What a patch's prefill depends on: its volume, box and the prediction it was ranked on."""
    return (patch.volume_id, tuple(patch.start), tuple(patch.stop), patch.model_version)


def grown_box(start, stop, shape, fraction: float, minimum: int) -> tuple[list[int], list[int]]:
    """The box ``[start, stop)`` grown on every side by ``fraction`` of its edge (at least
    ``minimum`` voxels), clipped to a volume of ``shape``."""
    grown_start, grown_stop = [], []
    for a, b, edge in zip(start, stop, shape, strict=True):
        margin = max(minimum, round((b - a) * fraction))
        grown_start.append(max(0, int(a) - margin))
        grown_stop.append(min(int(edge), int(b) + margin))
    return grown_start, grown_stop


def context_box(patch: PatchRecord, shape) -> tuple[list[int], list[int]]:
    """The patch's box grown by its margin on every side, clipped to a volume of ``shape``."""
    return grown_box(patch.start, patch.stop, shape, MARGIN_FRACTION, MIN_MARGIN)


class PatchLayers:
    """Puts the patch under review on the canvas, and takes it off.

    ``bind_keys`` is called once on a newly made patch layer (the review keys go with it).
    """

    def __init__(self, state: WorkflowState, bind_keys: Callable[[Labels], None]) -> None:
        self.state = state
        self.viewer = state.viewer
        self.bind_keys = bind_keys
        #: layers the 3D view hid (shown again when it ends)
        self._hidden_for_3d: list = []
        #: the next patch's prefilled labels, read in the last Accept's worker:
        #: ``(patch key, labels)``, used once by :meth:`take_prefill`
        self._read_ahead: tuple[tuple, np.ndarray] | None = None

    def labels(self) -> Labels | None:
        """The patch's labels layer, if it is open."""
        layer = find_layer(self.viewer, PATCH_LAYER)
        return layer if isinstance(layer, Labels) else None

    def prediction_group(self, patch: PatchRecord):
        """The prediction store the patch was ranked on (else the current version's), or None."""
        from napari_pvs.io import open_prediction

        project = self.state.project
        for version in (patch.model_version, None):
            path = project.prediction_path(patch.volume_id, version)
            if path.is_dir():
                try:
                    return open_prediction(path)
                except ValueError:
                    continue
        return None

    def prefill_labels(self, patch: PatchRecord) -> np.ndarray:
        """The model's segmentation of the box, with accepted labels where it was reviewed."""
        from napari_pvs.project import UNREVIEWED

        box = patch_box(patch)
        shape = tuple(b - a for a, b in zip(patch.start, patch.stop, strict=True))
        group = self.prediction_group(patch)
        labels = (
            (np.asarray(group["segmentation"][box]) > 0).astype(np.uint8)
            if group is not None
            else np.zeros(shape, np.uint8)
        )
        stored = np.asarray(self.state.project.labels(patch.volume_id)["labels"][box])
        reviewed = stored != UNREVIEWED
        labels[reviewed] = stored[reviewed]
        return labels

    def keep_read_ahead(self, patch: PatchRecord, labels: np.ndarray) -> None:
        """Keep ``patch``'s prefill, read ahead in a worker, for its :meth:`take_prefill`."""
        self._read_ahead = (_prefill_key(patch), labels)

    def take_prefill(self, patch: PatchRecord) -> np.ndarray:
        """``patch``'s prefill: the one read ahead when it is this patch's, else read now (a
        patch's few chunks; after an Accept the next patch's were read in its worker)."""
        ahead, self._read_ahead = self._read_ahead, None
        if ahead is not None and ahead[0] == _prefill_key(patch):
            return ahead[1]
        return self.prefill_labels(patch)

    def show_steps(
        self, patch: PatchRecord, data: np.ndarray, image: Image, brush: int, contour: bool
    ) -> tuple[Labels, list[Callable[[], object]]]:
        """Open ``data`` as the patch's labels layer: the layer at once (hidden, its data in
        place), and the steps left, one per event-loop turn: the shown layers' planes at the
        patch are read off the GUI thread (:func:`prefetch_first_plane`), the view moves to
        the patch (every shown layer drawn at its plane), then the patch's layer is shown on
        top, active, in paint mode (the first time its first draw compiles a shader under
        software OpenGL). Each turn stays short, where all of it in one turn held the viewer
        0.25-0.45 s."""
        scale = tuple(float(s) for s in image.scale[-3:])
        translate = tuple(float(t) for t in image.translate[-3:])
        origin, centre = box_world(patch.start, patch.stop, scale, translate)
        extent = (np.asarray(patch.stop) - np.asarray(patch.start)) * np.asarray(scale)
        layer = self._put_hidden(data, origin, scale, patch, brush, contour)
        self.raise_to_top(layer)
        self.viewer.layers.selection.active = layer

        def mine() -> bool:
            return self.labels() is layer and layer.metadata.get("patch_id") == patch.id

        def read_ahead() -> list:
            """The shown layers' planes at the patch, read off the GUI thread first."""
            if not mine():
                return []
            point = [*self.viewer.dims.point[:-3], *centre]
            return [read for other in self.viewer.layers if other.visible
                    for read in prefetch_first_plane(self.viewer, other, point)]  # fmt: skip

        def move_view() -> None:
            if mine():  # (not when another patch opened, or the patch closed, in between)
                zoom_to(self.viewer, centre, extent)

        def on_top() -> None:
            if not mine():
                return
            layer.visible = True
            self.raise_to_top(layer)
            self.viewer.layers.selection.active = layer
            layer.mode = "paint"

        return layer, [read_ahead, move_view, on_top]

    def _put_hidden(
        self, data: np.ndarray, origin, scale, patch: PatchRecord, brush: int, contour: bool
    ) -> Labels:
        """The patch's labels layer (made once, then reused) holding ``data``, hidden: it is
        read and drawn only when shown, at the patch."""
        layer = self.labels()
        metadata = {PATCH_OF_KEY: patch.volume_id, "patch_id": patch.id}
        if layer is None:
            layer = self.viewer.add_labels(
                data, name=PATCH_LAYER, scale=scale, translate=origin, metadata=metadata,
                opacity=0.8, units=("mm",) * 3, visible=False,
            )  # fmt: skip
            self.bind_keys(layer)
            box = layer.bounding_box
            box.points, box.line_color, box.line_thickness = False, BOX_COLOR, BOX_LINE_PIXELS
            box.visible = True
        else:
            layer.visible = False  # first: the new data is not read where it is not shown
            layer.scale, layer.translate = scale, origin
            # the previous patch's undo history goes; its array (the layer's own) is reused
            replace_labels(layer, data, in_place=True)
            layer.metadata = metadata
        layer.selected_label = 1
        layer.brush_size = brush
        layer.contour = 1 if contour else 0
        return layer

    def raise_to_top(self, layer) -> None:
        index = self.viewer.layers.index(layer)
        if index != len(self.viewer.layers) - 1:
            self.viewer.layers.move(index, len(self.viewer.layers))

    def remove(self) -> None:
        """Take the patch (its box with it), its overlay and its 3D surroundings off the
        canvas."""
        self.hide_3d()
        self._read_ahead = None
        for name in (PATCH_LAYER, UNCERTAINTY_LAYER):
            layer = find_layer(self.viewer, name)
            if layer is not None:
                self.viewer.layers.remove(layer)

    def set_brush(self, size: int) -> None:
        layer = self.labels()
        if layer is not None:
            layer.brush_size = size

    def set_contour(self, on: bool) -> None:
        layer = self.labels()
        if layer is not None:
            layer.contour = 1 if on else 0

    def frame(self) -> None:
        """Zoom the view to the open patch (after switching between 2D and 3D)."""
        layer = self.labels()
        if layer is not None:
            scale, shape = np.asarray(layer.scale[-3:]), np.asarray(layer.data.shape)
            centre = np.asarray(layer.translate[-3:]) + (shape - 1) / 2 * scale
            zoom_to(self.viewer, centre, shape * scale)

    def show_3d_steps(self, patch: PatchRecord, image: Image) -> list[Callable[[], object]]:
        """The 3D view in four steps, for four event-loop turns (under software OpenGL each
        new shader's first draw takes 0.1-0.3 s, so each turn draws one). First the patch's box
        with a margin as its own small image layer, not yet shown, and every other layer but
        the patch's hidden; then the 3D view with the camera on the box, nothing drawn yet;
        then that layer (the whole volume is neither drawn nor uploaded); then the patch's
        labels in 3D."""
        shape = image.data[0].shape[-3:] if image.multiscale else image.data.shape[-3:]
        start, stop = context_box(patch, shape)
        scale = tuple(float(v) for v in image.scale[-3:])
        translate = image.translate[-3:]

        def surroundings() -> None:
            data = image.data[0] if image.multiscale else image.data
            box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
            crop = np.asarray(data[box], dtype=np.float32)
            origin, _ = box_world(start, stop, scale, translate)
            layer = find_layer(self.viewer, CONTEXT_LAYER)
            if isinstance(layer, Image):
                layer.visible = False
                layer.data, layer.translate = crop, origin
                layer.scale = scale
            else:
                self.viewer.add_image(
                    crop, name=CONTEXT_LAYER, scale=scale, translate=origin, units=("mm",) * 3,
                    colormap="gray", contrast_limits=tuple(image.contrast_limits),
                    rendering="mip", metadata={PATCH_OF_KEY: patch.volume_id}, visible=False,
                )  # fmt: skip
            ours = {PATCH_LAYER, UNCERTAINTY_LAYER, CONTEXT_LAYER}
            for other in self.viewer.layers:
                if other.name not in ours and other.visible:
                    other.visible = False
                    self._hidden_for_3d.append(other)
            patch_layer = self.labels()
            if patch_layer is not None:
                self.raise_to_top(patch_layer)
                self.viewer.layers.selection.active = patch_layer

        def in_3d() -> None:
            layer = find_layer(self.viewer, CONTEXT_LAYER)
            if layer is None:  # the patch was closed in between
                return
            patch_layer = self.labels()
            if patch_layer is not None:
                patch_layer.visible = False  # drawn in 3D in a later turn (its own shader)
            self.viewer.dims.ndisplay = 3  # (only now: the whole volume is never drawn in 3D)
            extent = (np.asarray(stop) - np.asarray(start)) * np.asarray(scale)
            _, centre = box_world(patch.start, patch.stop, scale, translate)
            zoom_to(self.viewer, centre, extent, fraction=VIEW_3D_FRACTION)

        def surroundings_in_3d() -> None:
            layer = find_layer(self.viewer, CONTEXT_LAYER)
            if layer is not None and self.viewer.dims.ndisplay == 3:
                layer.visible = True  # its own turn: the volume shader's first draw

        def patch_in_3d() -> None:
            patch_layer = self.labels()
            if patch_layer is not None and self.viewer.dims.ndisplay == 3:
                patch_layer.visible = True

        return [surroundings, in_3d, surroundings_in_3d, patch_in_3d]

    def hide_3d_steps(self) -> list[Callable[[], object]]:
        """Leaving the 3D view, one step per event-loop turn (all in one turn held the viewer
        0.24 s under software OpenGL): its layer goes, then each layer it hid comes back, its
        plane read off the GUI thread first (:func:`prefetch_first_plane`), one a turn. Call
        in 2D: the layers shown again are then sliced as planes."""

        def remove_surroundings() -> None:
            layer = find_layer(self.viewer, CONTEXT_LAYER)
            if layer is not None:
                self.viewer.layers.remove(layer)

        def read(other) -> list:
            if other not in self._hidden_for_3d or other not in self.viewer.layers:
                return []
            return prefetch_first_plane(self.viewer, other)

        def show(other) -> None:
            if other in self._hidden_for_3d:
                self._hidden_for_3d.remove(other)
                if other in self.viewer.layers:
                    other.visible = True

        steps: list[Callable[[], object]] = [remove_surroundings]
        for other in list(self._hidden_for_3d):
            steps += [lambda o=other: read(o), lambda o=other: show(o)]
        return steps

    def hide_3d(self) -> None:
        """End the 3D view at once: its layer goes, the layers it hid come back."""
        layer = find_layer(self.viewer, CONTEXT_LAYER)
        if layer is not None:
            self.viewer.layers.remove(layer)
        for other in self._hidden_for_3d:
            if other in self.viewer.layers:
                other.visible = True
        self._hidden_for_3d = []

    def hide_uncertainty(self) -> None:
        existing = find_layer(self.viewer, UNCERTAINTY_LAYER)
        if existing is not None:
            self.viewer.layers.remove(existing)

    def show_uncertainty(self, patch: PatchRecord) -> bool:
        """Overlay the patch's entropy under its labels; False when the prediction has none."""
        existing = find_layer(self.viewer, UNCERTAINTY_LAYER)
        group = self.prediction_group(patch)
        if group is None or "entropy" not in group:
            return False
        data = np.asarray(group["entropy"][patch_box(patch)], dtype=np.float32)
        layer = self.labels()
        if isinstance(existing, Image):
            existing.data = data
            existing.scale, existing.translate = layer.scale, layer.translate
        else:
            existing = self.viewer.add_image(
                data, name=UNCERTAINTY_LAYER, scale=layer.scale, translate=layer.translate,
                units=layer.units, colormap="magma", blending="additive", opacity=0.6,
                contrast_limits=(0.0, 1.0), metadata={PATCH_OF_KEY: patch.volume_id},
            )  # fmt: skip
        self.raise_to_top(layer)
        self.viewer.layers.selection.active = layer
        return True

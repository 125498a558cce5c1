"""The Review step's Candidates mode on the canvas: the candidate's outline and its three planes.

A candidate is one predicted cluster (:mod:`napari_pvs.candidates`). It is shown as one small
labels layer over its surroundings (the cluster's box grown by :data:`MARGIN_FRACTION` of its
edge, at least :data:`MIN_MARGIN` voxels), holding the cluster alone (the mask the ledger
keeps, ``project.candidate_mask``, read in the step's worker with the list), drawn as an
outline; the view goes to the plane
of the first axis where the cluster is widest, centred and zoomed on it. The step's keys are
bound on that layer, so they go with it. The three orthogonal planes through the same point
(:func:`orthogonal_planes`) are a small RGB picture the panel shows beside its counter: cheap
(a few thousand voxels) and with no second canvas to keep in step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Image, Labels

from napari_pvs._widgets._layers import PATCH_OF_KEY, find_layer, replace_labels, zoom_to
from napari_pvs._widgets.review_layers import grown_box
from napari_pvs._widgets.state import WorkflowState

if TYPE_CHECKING:
    from napari_pvs.project import CandidateRecord

CANDIDATE_LAYER = "candidate under review"
#: The shown surroundings: the cluster's box grown by this fraction of its edge, at least
#: MIN_MARGIN voxels on every side (a PVS is a few voxels wide: it needs its neighbourhood).
MARGIN_FRACTION = 1.0
MIN_MARGIN = 8
#: The three planes' picture: each plane this many pixels on its longer side (mm-true aspect).
PLANE_PIXELS = 96
#: The cluster's tint in the planes (RGB) and how strongly it covers the image there.
TINT = np.array([255, 210, 0], dtype=np.float32)
TINT_OPACITY = 0.45


@dataclass
class CandidateView:
    """What one candidate's display needs: its surroundings' box, the cluster there, the
    point the view goes to (voxels, in the volume) and the image crop for the planes."""

    start: list[int]
    stop: list[int]
    mask: np.ndarray
    point: tuple[int, int, int]
    crop: np.ndarray


def widest_point(mask: np.ndarray) -> tuple[int, int, int]:
    """The view's point in ``mask``'s box: the first-axis plane where the cluster has the most
    voxels, and on it the voxel of the cluster nearest the cluster's in-plane centroid."""
    per_plane = mask.reshape(mask.shape[0], -1).sum(axis=1)
    plane = int(np.argmax(per_plane))
    voxels = np.argwhere(mask[plane])
    centroid = voxels.mean(axis=0)
    nearest = voxels[np.argmin(((voxels - centroid) ** 2).sum(axis=1))]
    return plane, int(nearest[0]), int(nearest[1])


def _plane_pixels(plane: np.ndarray, spacing: Sequence[float], pixels: int) -> np.ndarray:
    """Nearest-neighbour resampling of a plane (its first two axes) so its longer side is
    ``pixels`` and each pixel covers the same millimetres along both axes."""
    extent = np.asarray(plane.shape[:2], float) * np.asarray(spacing, float)
    size = np.maximum(1, np.round(extent / extent.max() * pixels)).astype(int)
    rows = np.minimum((np.arange(size[0]) + 0.5) / size[0] * plane.shape[0], plane.shape[0] - 1)
    cols = np.minimum((np.arange(size[1]) + 0.5) / size[1] * plane.shape[1], plane.shape[1] - 1)
    return plane[np.ix_(rows.astype(int), cols.astype(int))]


def orthogonal_planes(
    crop: np.ndarray,
    mask: np.ndarray,
    point: Sequence[int],
    spacing: Sequence[float],
    limits: Sequence[float],
    pixels: int = PLANE_PIXELS,
    gap: int = 4,
) -> np.ndarray:
    """The three planes through ``point`` of ``crop`` (grey in the contrast ``limits``) with
    the cluster ``mask`` tinted, side by side as one RGB ``uint8`` picture: the first axis's
    plane (what the canvas shows), then the second's, then the third's."""
    lo, hi = float(limits[0]), float(limits[1])
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    z, y, x = (int(v) for v in point)
    sz, sy, sx = (float(s) for s in spacing)
    planes = [
        (crop[z], mask[z], (sy, sx)),
        (crop[:, y], mask[:, y], (sz, sx)),
        (crop[:, :, x], mask[:, :, x], (sz, sy)),
    ]
    pictures = []
    for image, cluster, plane_spacing in planes:
        grey = np.clip((np.asarray(image, np.float32) - lo) * scale, 0, 255)
        rgb = np.repeat(grey[..., None], 3, axis=-1)
        rgb[cluster] = (1 - TINT_OPACITY) * rgb[cluster] + TINT_OPACITY * TINT
        pictures.append(_plane_pixels(rgb, plane_spacing, pixels))
    height = max(p.shape[0] for p in pictures)
    width = sum(p.shape[1] for p in pictures) + gap * (len(pictures) - 1)
    out = np.zeros((height, width, 3), np.uint8)
    left = 0
    for picture in pictures:
        out[: picture.shape[0], left : left + picture.shape[1]] = picture.astype(np.uint8)
        left += picture.shape[1] + gap
    return out


class CandidateLayers:
    """Puts the candidate under review on the canvas, and takes it off.

    ``bind_keys`` is called once on a newly made candidate layer (the step's keys go with it).
    """

    def __init__(self, state: WorkflowState, bind_keys: Callable[[Labels], None]) -> None:
        self.state = state
        self.viewer = state.viewer
        self.bind_keys = bind_keys

    def labels(self) -> Labels | None:
        """The candidate's labels layer, if it is on the canvas."""
        layer = find_layer(self.viewer, CANDIDATE_LAYER)
        return layer if isinstance(layer, Labels) else None

    def read(self, candidate: CandidateRecord, cluster: np.ndarray, image: Image) -> CandidateView:
        """The candidate's surroundings: its ``cluster`` (a mask over its box) placed there,
        and the image crop."""
        data = image.data[0] if image.multiscale else image.data
        start, stop = grown_box(candidate.bbox_start, candidate.bbox_stop, data.shape[-3:],
                                MARGIN_FRACTION, MIN_MARGIN)  # fmt: skip
        box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
        mask = np.zeros([b - a for a, b in zip(start, stop, strict=True)], dtype=bool)
        bbox = zip(candidate.bbox_start, candidate.bbox_stop, start, strict=True)
        inner = tuple(slice(a - s, b - s) for a, b, s in bbox)
        mask[inner] = cluster
        crop = np.asarray(data[box])
        return CandidateView(start, stop, mask, widest_point(mask), crop)

    def show(
        self,
        candidate: CandidateRecord,
        view: CandidateView,
        image: Image,
        block: Sequence[int] | None = None,
    ) -> Labels:
        """The cluster's outline over its surroundings, active, the view on its widest plane.
        ``block``: the layer's smallest shape (:func:`block_shape` of the list), so that the
        next candidates are written into the same array, and the frame the view zooms to."""
        scale = np.asarray(image.scale[-3:], dtype=float)
        translate = np.asarray(image.translate[-3:], dtype=float)
        layer = self.labels()
        volume_shape = (image.data[0] if image.multiscale else image.data).shape[-3:]
        start, data = candidate_canvas(view, volume_shape, layer, block)
        origin = np.asarray(start, float) * scale + translate
        metadata = {PATCH_OF_KEY: candidate.volume_id, "candidate_id": candidate.id}
        if layer is None:
            layer = self.viewer.add_labels(
                data, name=CANDIDATE_LAYER, scale=tuple(scale), translate=tuple(origin),
                metadata=metadata, opacity=1.0, units=("mm",) * 3,
            )  # fmt: skip
            layer.contour = 1
            self.bind_keys(layer)
        else:  # each setter redraws the layer, even with the same value: only what changed
            if not np.allclose(layer.scale[-3:], scale):
                layer.scale = tuple(scale)
            layer.translate = tuple(origin)
            replace_labels(layer, data, in_place=True)  # the same shape: no shader link
            layer.metadata = metadata
            if not layer.visible:
                layer.visible = True
        index = self.viewer.layers.index(layer)
        if index != len(self.viewer.layers) - 1:
            self.viewer.layers.move(index, len(self.viewer.layers))
        if self.viewer.layers.selection.active is not layer:
            self.viewer.layers.selection.active = layer
        if layer.mode != "pan_zoom":  # shown, not painted (an edit is E's patch)
            layer.mode = "pan_zoom"
        if self.viewer.dims.ndisplay != 2:
            self.viewer.dims.ndisplay = 2
        point = (np.asarray(view.start) + np.asarray(view.point)) * scale + translate
        # one zoom for the list (its block's; a cluster longer than the block gets its own):
        # sizes compare from one candidate to the next, and napari re-emits no layer's scale
        # factor (a layer-list update each) per answer
        frame = np.subtract(view.stop, view.start)
        if block is not None:
            frame = np.maximum(frame, np.asarray(block))
        zoom_to(self.viewer, point, frame * scale)
        return layer

    def remove(self) -> None:
        """Take the candidate's layer (and with it the step's keys) off the canvas."""
        layer = find_layer(self.viewer, CANDIDATE_LAYER)
        if layer is not None:
            self.viewer.layers.remove(layer)


#: The largest block edge (voxels) :func:`block_shape` asks for: a rare long cluster grows the
#: layer for itself rather than every candidate's layer for it.
MAX_BLOCK = 64


def block_shape(candidates: Sequence[CandidateRecord], volume_shape: Sequence[int]) -> list[int]:
    """The elementwise largest surroundings (:func:`grown_box`) of ``candidates`` in a volume
    of ``volume_shape``, at most :data:`MAX_BLOCK` a side: one layer shape for the list."""
    shape = [1, 1, 1]
    for candidate in candidates:
        start, stop = grown_box(candidate.bbox_start, candidate.bbox_stop, volume_shape,
                                MARGIN_FRACTION, MIN_MARGIN)  # fmt: skip
        shape = [max(n, b - a) for n, a, b in zip(shape, start, stop, strict=True)]
    return [min(n, MAX_BLOCK) for n in shape]


def candidate_canvas(
    view: CandidateView,
    volume_shape: Sequence[int],
    layer: Labels | None,
    block: Sequence[int] | None = None,
) -> tuple[tuple[int, ...], np.ndarray]:
    """Where the candidate's layer starts (voxels) and what it holds: the cluster's mask in a
    block of the shape the layer already has (or ``block``, if larger) when the mask fits in
    it (placed to hold the cluster's surroundings and stay inside the volume), else of the
    elementwise larger shape.

    The layer's shape then settles after a few candidates and each next one is written into
    its own array (:func:`replace_labels` in place): a new shape is a ``data`` event, and
    napari links the labels shader program again on every one."""
    box = np.asarray(view.stop) - np.asarray(view.start)
    shape = box if block is None else np.maximum(box, np.asarray(block))
    if layer is not None and isinstance(layer.data, np.ndarray) and layer.data.ndim == 3:
        shape = np.maximum(shape, layer.data.shape)
    shape = np.minimum(shape, np.asarray(volume_shape))
    start = np.minimum(np.asarray(view.start), np.asarray(volume_shape) - shape).clip(0)
    data = np.zeros(tuple(int(n) for n in shape), np.uint8)
    inner = tuple(slice(a - s, b - s) for a, b, s in zip(view.start, view.stop, start,
                                                         strict=True))  # fmt: skip
    data[inner] = view.mask
    return tuple(int(v) for v in start), data

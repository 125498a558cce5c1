"""Chunked sliding-window prediction over lazy volumes, streaming into a resumable zarr group.

Outputs always have exactly the input's shape and voxel order. The stages, one module each:
:mod:`.planning` (MONAI's window grid, output chunks, tile order, what a resumed run still has
to do), :mod:`.inputs` (the volume's array and geometry, normalised windows), :mod:`.engine`
(the models on their device: precision, mirrorings, MC samples; the streaming loop),
:mod:`.blending` (Gaussian-weighted partial sums on the frontier of unfinished chunks),
:mod:`.writer` (completed chunks stored, then marked done once durable), :mod:`.store` (layout,
run signature, lock, resume, overwrite), :mod:`.segmentation` (the calibrated rule, the
small-cluster pass), :mod:`.levels` (display levels) and :mod:`.predictor` (:class:`Predictor`,
which composes them).
"""

from napari_pvs.inference.levels import DISPLAY_EDGE, display_level_shapes, write_display_levels
from napari_pvs.inference.planning import WindowPlan, importance_map, window_starts
from napari_pvs.inference.predictor import PredictionSummary, Predictor, predict
from napari_pvs.inference.segmentation import min_cluster_voxels, remove_small_clusters
from napari_pvs.inference.store import DONE_ARRAY, overwrite_staging_path, store_lock_path

__all__ = [
    "DISPLAY_EDGE",
    "DONE_ARRAY",
    "PredictionSummary",
    "Predictor",
    "WindowPlan",
    "display_level_shapes",
    "importance_map",
    "min_cluster_voxels",
    "overwrite_staging_path",
    "predict",
    "remove_small_clusters",
    "store_lock_path",
    "window_starts",
    "write_display_levels",
]

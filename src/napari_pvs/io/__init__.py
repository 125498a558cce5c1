"""Lazy volume I/O: zarr, OME-Zarr and NIfTI in, OME-Zarr (and NIfTI) out.

Everything here is lazy: opening a volume reads metadata only (plus, for float data, a small
strided sample of the coarsest level to catch NaN/inf early), and writers stream chunk by chunk
from dask, so memory does not grow with the volume. Arrays keep the file's own voxel order:
zarr/OME-Zarr ``(z, y, x)``, NIfTI ``(i, j, k)`` with the header affine mapping ``(i, j, k)`` to
scanner mm. No Qt or napari here; the reader, writer, widgets and CLI are adapters over this.

One concept per module: :mod:`~napari_pvs.io.volume` (the :class:`Volume`),
:mod:`~napari_pvs.io.readers` (open any path), :mod:`~napari_pvs.io.nifti`,
:mod:`~napari_pvs.io.zarr_reader`, :mod:`~napari_pvs.io.predictions` (``predict`` stores),
:mod:`~napari_pvs.io.writers` (OME-Zarr out), :mod:`~napari_pvs.io.convert`,
:mod:`~napari_pvs.io.pyramid`, :mod:`~napari_pvs.io.metadata` (zarr attributes),
:mod:`~napari_pvs.io.damage` (damaged files), :mod:`~napari_pvs.io.finite` (NaN/inf),
:mod:`~napari_pvs.io.labels` (label values and names), :mod:`~napari_pvs.io.geometry`,
:mod:`~napari_pvs.io.modality`. This package exports their public API.
"""

from napari_pvs.io.convert import convert_to_ome_zarr
from napari_pvs.io.damage import (
    DamagedFileError,
    damaged_file_error,
    guarded_display,
    guarded_from_zarr,
)
from napari_pvs.io.finite import FINITE_SAMPLE_VOXELS, finite_guard
from napari_pvs.io.geometry import check_spacing
from napari_pvs.io.labels import (
    LABEL_VALUES,
    PVS_LABEL_NAME,
    UNLABELLED,
    LabelWarning,
    check_label_name,
    check_label_values,
    label_value_counts,
)
from napari_pvs.io.metadata import ATTRS_KEY
from napari_pvs.io.modality import MODALITIES, modality_from_name, normalize_modality
from napari_pvs.io.nifti import NIFTI_SUFFIXES, save_nifti
from napari_pvs.io.predictions import (
    PREDICTION_LEVELS,
    is_prediction_store,
    open_prediction,
    prediction_levels,
)
from napari_pvs.io.pyramid import WRITE_BATCH_BYTES, downsample, pyramid_shapes, store_chunked
from napari_pvs.io.readers import is_supported_path, open_labels, open_volume
from napari_pvs.io.volume import Volume, describe
from napari_pvs.io.writers import DEFAULT_CHUNK, save_ome_zarr, write_labels

__all__ = [
    "ATTRS_KEY",
    "DEFAULT_CHUNK",
    "FINITE_SAMPLE_VOXELS",
    "LABEL_VALUES",
    "MODALITIES",
    "NIFTI_SUFFIXES",
    "PREDICTION_LEVELS",
    "PVS_LABEL_NAME",
    "UNLABELLED",
    "WRITE_BATCH_BYTES",
    "DamagedFileError",
    "LabelWarning",
    "Volume",
    "check_label_name",
    "check_label_values",
    "check_spacing",
    "convert_to_ome_zarr",
    "damaged_file_error",
    "describe",
    "downsample",
    "finite_guard",
    "guarded_display",
    "guarded_from_zarr",
    "is_prediction_store",
    "is_supported_path",
    "label_value_counts",
    "modality_from_name",
    "normalize_modality",
    "open_labels",
    "open_prediction",
    "open_volume",
    "prediction_levels",
    "pyramid_shapes",
    "save_nifti",
    "save_ome_zarr",
    "store_chunked",
    "write_labels",
]

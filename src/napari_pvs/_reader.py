"""npe2 reader: zarr / OME-Zarr directories and NIfTI files as lazy napari layers.

A thin adapter over :func:`napari_pvs.io.open_volume`: the image becomes a (multiscale) image
layer of lazy :class:`napari_pvs.display.DisplayLevel` views (dask for a ``.nii.gz`` or a
scaled NIfTI) with the physical spacing as ``scale``, contrast limits from a strided sample of
the coarsest level (never a full level), axis names and the volume's geometry in
``metadata``; OME-Zarr label images become labels layers on the same grid.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import numpy as np

from napari_pvs import io
from napari_pvs.intensity import robust_range

LayerData = tuple[Any, dict, str]

#: The plugin's name in napari's reader preferences.
PLUGIN_NAME = "napari-pvs"
#: napari's reader-preference patterns for what this reader opens. A dropped file that two
#: readers accept (napari's builtins list ``*.nii``, ``*.nii.gz`` and ``*.zarr`` too) opens with
#: the preferred one, else napari asks and preselects the alphabetically first ("napari
#: builtins", which fails on them). napari matches a folder as ``path/``, hence ``*.zarr/``.
READER_PATTERNS = ("*.nii", "*.nii.gz", "*.zarr", "*.zarr/")


def prefer_this_reader(settings=None) -> list[str]:
    """Make napari-pvs napari's reader for NIfTI and zarr wherever the user chose none yet.

    A preference the user set (any reader, any of :data:`READER_PATTERNS`) is left alone;
    returns the patterns added. ``settings`` defaults to napari's own (saved with them).
    """
    if settings is None:
        from napari.settings import get_settings

        settings = get_settings()
    current = dict(settings.plugins.extension2reader)
    added = [pattern for pattern in READER_PATTERNS if pattern not in current]
    if added:
        settings.plugins.extension2reader = {**current, **dict.fromkeys(added, PLUGIN_NAME)}
    return added


def activate(context: object) -> None:
    """npe2's ``on_activate``: the first use of any napari-pvs command makes it the reader."""
    prefer_this_reader()


def napari_get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """Return a reader for supported paths, ``None`` otherwise (so other readers can try)."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths or not all(io.is_supported_path(p) for p in paths):
        return None
    return read_paths


def read_paths(path: str | list[str]) -> list[LayerData]:
    """Open every path as layers (image first, then its labels).

    A damaged file raises the same one-sentence :class:`napari_pvs.io.DamagedFileError` the CLI
    prints (:func:`napari_pvs.io.damaged_file_error`), whichever read found the damage.
    """
    paths = [path] if isinstance(path, str | Path) else list(path)
    layers: list[LayerData] = []
    for p in paths:
        try:
            volume = io.open_volume(p)
            layers.extend(volume_layer_data(volume))
        except Exception as exc:
            damaged = io.damaged_file_error(p, exc)
            if damaged is None or damaged is exc:
                raise
            raise damaged from exc
    return layers


def volume_metadata(volume: io.Volume) -> dict:
    """What later steps (saving labels, prediction) need to know about the layer's volume."""
    return {
        "napari_pvs": True,
        "source": volume.source,
        "affine": np.asarray(volume.affine),
        "spacing": tuple(volume.spacing),
        "axes": tuple(volume.axes),
        "modality": volume.modality,
        "levels": [tuple(int(s) for s in lv.shape) for lv in volume.levels],
    }


def layer_geometry(volume: io.Volume) -> dict:
    """``scale`` (mm), ``translate`` and axis names shared by the image and its labels.

    Only a diagonal affine's origin becomes ``translate``; an oblique NIfTI affine is shown on
    its voxel grid at its physical spacing (the full affine stays in ``metadata``).
    """
    affine = np.asarray(volume.affine)
    diagonal = np.allclose(affine[:3, :3], np.diag(volume.spacing))
    translate = tuple(float(t) for t in affine[:3, 3]) if diagonal else (0.0, 0.0, 0.0)
    return {
        "scale": tuple(volume.spacing),
        "translate": translate,
        "axis_labels": tuple(volume.axes),
        "units": ("mm", "mm", "mm"),
    }


#: A coarsest level up to this size (8 MB of float32) is sampled with a regular stride; a bigger
#: one by a few whole chunks spread over the volume, never all of them, so that opening never
#: reads a full level of a large volume.
STRIDED_SAMPLE_MAX_VOXELS = 2_097_152
SAMPLE_CHUNKS_PER_AXIS = 3


def _sample_block_indices(n_blocks: int) -> list[int]:
    """Up to 3 block indices spread over an axis, fewer than all when there are 2 or more."""
    k = min(SAMPLE_CHUNKS_PER_AXIS, max(1, n_blocks - 1))
    return sorted({int((j + 0.5) * n_blocks / k) for j in range(k)})


def contrast_limits(volume: io.Volume) -> tuple[float, float]:
    """Robust display range from the coarsest level, never reading a whole large level."""
    level = volume.levels[-1]
    if level.size <= STRIDED_SAMPLE_MAX_VOXELS:
        return robust_range(level)
    picks = [_sample_block_indices(n) for n in level.numblocks]
    blocks = [level.blocks[i, j, k] for i in picks[0] for j in picks[1] for k in picks[2]]
    sample = np.concatenate([np.ravel(block) for block in dask.compute(*blocks)])
    return robust_range(sample)


def volume_layer_data(volume: io.Volume, name: str | None = None) -> list[LayerData]:
    """Layer data for a volume: one image (multiscale when it has levels) plus its labels."""
    name = name or _display_name(volume.source)
    geometry = layer_geometry(volume)
    multiscale = len(volume.levels) > 1
    low, high = contrast_limits(volume)
    shown = volume.display_levels()  # direct store reads when the file allows them
    image = (
        shown if multiscale else shown[0],
        {
            "name": name,
            "multiscale": multiscale,
            "contrast_limits": (low, high),
            "metadata": volume_metadata(volume),
            "colormap": "gray",
            **geometry,
        },
        "image",
    )
    layers: list[LayerData] = [image]
    for label_name in volume.label_names:
        labels = io.open_labels(volume.source, label_name)
        # direct store views, as for the image: napari slicing a dask label image ran dask's
        # threaded scheduler on the GUI thread at every plane (100-170 ms at 256^3)
        label_levels = labels.display_levels()
        layers.append(
            (
                label_levels if len(label_levels) > 1 else label_levels[0],
                {
                    "name": f"{name} {label_name}",
                    "multiscale": len(label_levels) > 1,
                    "metadata": {**volume_metadata(volume), "label_name": label_name},
                    # one label image at a time over the MRI: the PVS one, the rest on request
                    "opacity": 0.6,
                    "visible": label_name == "pvs",
                    **geometry,
                },
                "labels",
            )
        )
    return layers


def _display_name(source: str | None) -> str:
    if not source:
        return "volume"
    name = Path(source.rstrip("/")).name
    for suffix in (".nii.gz", ".nii", ".ome.zarr", ".zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name

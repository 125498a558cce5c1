"""Lazy volume I/O: open any supported path as a :class:`~napari_pvs.io.volume.Volume`.

Opening reads metadata only (plus, for float data, a bounded sample of the coarsest level to
catch NaN/inf early). Every reader refuses a zero-size, non-3-D or implausibly large declared
shape with a sentence (:mod:`napari_pvs.io.sizes`) before any work. Arrays keep the file's own
voxel order: zarr/OME-Zarr ``(z, y, x)``, NIfTI ``(i, j, k)`` with the header affine mapping
``(i, j, k)`` to scanner mm. No Qt or napari here; the reader, writer, widgets and CLI are
adapters over this.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from napari_pvs.io.finite import check_finite_sample, finite_guard
from napari_pvs.io.metadata import ome_attrs
from napari_pvs.io.modality import normalize_modality
from napari_pvs.io.nifti import is_nifti, open_nifti
from napari_pvs.io.predictions import is_prediction_group
from napari_pvs.io.sizes import check_declared_size, check_nonempty_shape
from napari_pvs.io.volume import Volume
from napari_pvs.io.zarr_reader import is_zarr_dir, open_zarr, open_zarr_volume, stored_label_names


def is_supported_path(path: str | Path) -> bool:
    """True for paths :func:`open_volume` can read (zarr directories and .nii/.nii.gz files)."""
    path = Path(path)
    return (path.is_file() and is_nifti(path)) or is_zarr_dir(path)


def check_path(path: str | Path) -> Path:
    """``path`` with ``~`` expanded; FileNotFoundError naming it when nothing is there."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    return path


def open_volume(
    path: str | Path, *, modality: str | None = None, check_finite: bool = True
) -> Volume:
    """Open a zarr / OME-Zarr directory or a NIfTI file lazily as a :class:`Volume`.

    Reads metadata only. ``modality`` overrides what the file says (our zarr attributes) or
    hints at ("T2w" in the name). With ``check_finite`` float volumes are checked for NaN/inf
    on a strided sample of the coarsest level at open time, and every chunk of ``data`` and
    ``levels`` is checked again lazily when it is computed (see :func:`finite_guard`).
    """
    path = check_path(path)
    if path.is_file():
        if not is_nifti(path):
            raise ValueError(
                f"{path.name}: unsupported file type; open a .nii/.nii.gz file or a .zarr directory"
            )
        volume = open_nifti(path)
    else:
        volume = open_zarr_volume(path)
    check_sizes(volume, path)
    if modality is not None:
        volume.modality = normalize_modality(modality)
    if check_finite and np.issubdtype(volume.data.dtype, np.floating):
        reader = volume.display[-1] if volume.display else None
        check_finite_sample(volume.levels[-1], f"volume {path}", reader)
        volume.levels = [finite_guard(level) for level in volume.levels]
        volume.data = volume.levels[0]
        # what napari is given reads the store directly; computations through it stay checked
        if volume.display:
            pairs = zip(volume.display, volume.levels, strict=True)
            volume.display = [view.with_lazy(level) for view, level in pairs]
    return volume


def check_sizes(volume: Volume, path: Path) -> None:
    """The declared shape is a plausible, non-empty 3-D volume (from metadata alone)."""
    check_nonempty_shape(volume.shape, path)
    check_declared_size(volume.shape, volume.data.dtype, path)


def open_labels(path: str | Path, name: str | None = None) -> Volume:
    """Open a label image lazily: OME-Zarr ``labels/NAME``, a zarr array/group, or NIfTI.

    For an OME-Zarr image with labels, ``name`` picks one (default: the only one, or ``pvs``).
    A ``napari-pvs predict`` store opens as its ``segmentation``. A path that points into the
    store (``image.zarr/labels/pvs``) also works. The returned :class:`Volume` has integer (or
    bool) ``data``; NaN/inf checks do not apply.
    """
    path = check_path(path)
    if path.is_file():
        volume = open_volume(path, check_finite=False)
    else:
        node = open_zarr(path)
        ome = ome_attrs(dict(node.attrs))
        names = stored_label_names(node) if isinstance(node, zarr.Group) else ()
        if names and ("multiscales" in ome or name is not None):
            if name is None:
                if len(names) == 1:
                    name = names[0]
                elif "pvs" in names:
                    name = "pvs"
                else:
                    raise ValueError(
                        f"{path}: holds several label images ({', '.join(names)}); choose one "
                        f"with name=..., e.g. {path / 'labels' / names[0]}"
                    )
            if name not in names:
                raise ValueError(f"{path}: no label image {name!r}; it has {', '.join(names)}")
            image_volume = open_zarr_volume(path)
            volume = open_zarr_volume(path / "labels" / name)
            volume.affine = image_volume.affine
            volume.modality = image_volume.modality
        elif name is not None:
            raise ValueError(f"{path}: has no OME-Zarr labels, so there is no {name!r} to open")
        elif is_prediction_group(node):  # its label image is the segmentation
            volume = open_zarr_volume(path / "segmentation")
        else:
            volume = open_zarr_volume(path)
    check_sizes(volume, path)
    if np.issubdtype(volume.data.dtype, np.floating):
        raise ValueError(
            f"{path}: labels have float dtype {volume.data.dtype}; threshold or cast them to an "
            "integer type (e.g. uint8 0/1) first"
        )
    return volume

"""OME-Zarr out: a multiscale image with its label images, and label images added later.

Every store is built under a temporary name and renamed into place (:mod:`napari_pvs.atomic`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from napari_pvs import atomic
from napari_pvs.io.geometry import check_affine, check_spacing, check_write_input
from napari_pvs.io.labels import check_label_name, check_pvs_labels
from napari_pvs.io.metadata import ATTRS_KEY, multiscales_meta, ome_attrs, set_ome_attrs
from napari_pvs.io.modality import normalize_modality
from napari_pvs.io.nifti import NIFTI_SUFFIXES, save_nifti
from napari_pvs.io.pyramid import pyramid_shapes, write_multiscale
from napari_pvs.io.readers import check_path, open_volume
from napari_pvs.io.zarr_reader import is_zarr_dir
from napari_pvs.progress import CancelToken, ProgressCallback, no_progress

DEFAULT_CHUNK = 64


def _as_dask(array, chunks: int | Sequence[int]) -> da.Array:
    chunk_tuple = (chunks,) * 3 if isinstance(chunks, int) else tuple(chunks)
    if isinstance(array, da.Array):
        return array.rechunk(
            tuple(min(c, s) for c, s in zip(chunk_tuple, array.shape, strict=True))
        )
    return da.from_array(
        array, chunks=tuple(min(c, s) for c, s in zip(chunk_tuple, array.shape, strict=True))
    )


def _n_chunks(shape: Sequence[int], chunks: Sequence[int]) -> int:
    return int(np.prod([math.ceil(s / min(c, s)) for s, c in zip(shape, chunks, strict=True)]))


def _chunk_tuple(chunks: int | Sequence[int]) -> tuple[int, int, int]:
    chunk_tuple = (int(chunks),) * 3 if isinstance(chunks, int | np.integer) else tuple(chunks)
    if len(chunk_tuple) != 3 or any(c < 1 for c in chunk_tuple):
        raise ValueError(f"chunks must be a positive int or 3 positive ints, got {chunks!r}")
    return chunk_tuple


def save_ome_zarr(
    path: str | Path,
    image,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    labels: Mapping[str, object] | None = None,
    modality: str | None = "unknown",
    levels: int = 3,
    chunks: int | Sequence[int] = DEFAULT_CHUNK,
    axes: Sequence[str] = ("z", "y", "x"),
    affine: np.ndarray | None = None,
    name: str = "image",
    ome_version: str = "0.4",
    overwrite: bool = False,
    inputs: Sequence[str | Path | None] = (),
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> Path:
    """Write a 3D image (numpy or dask) as an OME-Zarr multiscale image, with optional labels.

    Streams chunk by chunk; level ``n+1`` halves every axis of level ``n`` (mean for the image,
    nearest for labels) and is computed from the level already written. ``labels`` maps names
    (e.g. ``"pvs"``, ``"regions"``) to 3D arrays of the image's shape, written under
    ``labels/<name>``. ``ome_version`` "0.4" writes zarr v2 (widest tool support), "0.5" zarr
    v3. ``affine`` (e.g. a NIfTI's, possibly oblique) is kept in our attributes so it survives
    a round trip; the OME metadata itself holds spacing and origin only. The store is built
    under a temporary name and renamed into place when complete (:mod:`napari_pvs.atomic`): an
    existing ``path`` (replaced only with ``overwrite``) stays intact if writing fails or is
    cancelled; ``inputs`` are paths ``path`` must not be or lie in. Returns the path.
    """
    path = Path(path)
    progress = progress or no_progress
    spacing, modality, chunk_tuple, labels = _checked_save_arguments(
        image, spacing, labels, modality, levels, chunks, axes, ome_version
    )
    _check_save_target(path, inputs, overwrite)
    if affine is not None:
        affine = check_affine(affine)
    for label_name, label in labels.items():
        check_pvs_labels(label_name, label)
    origin = tuple(affine[:3, 3]) if affine is not None else (0.0, 0.0, 0.0)

    image_d = _as_dask(image, chunk_tuple)
    shapes = pyramid_shapes(image_d.shape, levels)
    per_image = sum(_n_chunks(s, chunk_tuple) for s in shapes)
    total = per_image * (1 + len(labels))
    counter = [0]
    zarr_format = 2 if ome_version == "0.4" else 3
    with atomic.atomic_output(path, inputs=inputs, overwrite=overwrite, kind="dir") as temp:
        root = zarr.open_group(str(temp), mode="w", zarr_format=zarr_format)
        ours: dict = {"modality": modality, "spacing": list(spacing), "axes": list(axes)}
        if affine is not None:
            ours["affine"] = affine.tolist()
        set_ome_attrs(
            root,
            {"multiscales": [multiscales_meta(name, shapes, spacing, origin, axes, ome_version)]},
            ome_version,
            {ATTRS_KEY: ours},
        )
        write_multiscale(
            root, image_d, chunk_tuple, levels, False, progress, cancel, counter, total, "image"
        )
        if labels:
            _write_label_images(
                root.require_group("labels"),
                labels,
                spacing,
                origin,
                axes,
                chunk_tuple,
                levels,
                ome_version,
                progress,
                cancel,
                counter,
                total,
            )
    return path


def _checked_save_arguments(
    image,
    spacing,
    labels: Mapping[str, object] | None,
    modality: str | None,
    levels: int,
    chunks: int | Sequence[int],
    axes: Sequence[str],
    ome_version: str,
) -> tuple[tuple[float, float, float], str, tuple[int, int, int], dict]:
    """Refuse bad :func:`save_ome_zarr` arguments before anything is written; return the
    checked spacing, modality, chunk shape and labels (a dict)."""
    if ome_version not in ("0.4", "0.5"):
        raise ValueError(f"ome_version must be '0.4' or '0.5', got {ome_version!r}")
    if levels < 1:
        raise ValueError(f"levels must be at least 1, got {levels}")
    check_write_input(image, "image")
    spacing = check_spacing(spacing)
    if len(axes) != 3:
        raise ValueError(f"axes must name 3 axes, got {axes!r}")
    modality = normalize_modality(modality)
    chunk_tuple = _chunk_tuple(chunks)
    labels = dict(labels or {})
    for label_name, label in labels.items():
        check_label_name(label_name)
        check_write_input(label, f"label {label_name!r}")
        if tuple(label.shape) != tuple(image.shape):
            raise ValueError(
                f"label {label_name!r} has shape {tuple(label.shape)} but the image has "
                f"{tuple(image.shape)}; labels must match the image voxel for voxel"
            )
    return spacing, modality, chunk_tuple, labels


def _check_save_target(path: Path, inputs: Sequence[str | Path | None], overwrite: bool) -> None:
    """``path`` may be written: not an input, replaced only with ``overwrite``, and never
    anything but a zarr store (or an empty folder)."""
    atomic.check_output(path, inputs=inputs, overwrite=overwrite, flag="overwrite=True")
    if path.exists() and not (is_zarr_dir(path) or (path.is_dir() and not any(path.iterdir()))):
        raise FileExistsError(f"{path} exists and is not a zarr store; refusing to replace it")


def _write_label_images(
    labels_group: zarr.Group,
    labels: dict,
    spacing: Sequence[float],
    origin: Sequence[float],
    axes: Sequence[str],
    chunks: tuple[int, ...],
    levels: int,
    version: str,
    progress: ProgressCallback,
    cancel: CancelToken | None,
    counter: list[int],
    total: int,
) -> None:
    """The ``labels/`` group of a new image: its listing, then every label image."""
    set_ome_attrs(labels_group, {"labels": list(labels)}, version)
    for label_name, label in labels.items():
        _write_label_image(
            labels_group.require_group(label_name),
            label_name,
            _as_dask(label, chunks),
            spacing,
            origin,
            axes,
            chunks,
            levels,
            version,
            progress,
            cancel,
            counter,
            total,
        )


def _write_label_image(
    group: zarr.Group,
    name: str,
    label: da.Array,
    spacing: Sequence[float],
    origin: Sequence[float],
    axes: Sequence[str],
    chunks: tuple[int, ...],
    levels: int,
    version: str,
    progress: ProgressCallback,
    cancel: CancelToken | None,
    counter: list[int],
    total: int,
) -> None:
    """One OME-Zarr label image (multiscales + image-label metadata, its pyramid) in ``group``."""
    if np.issubdtype(label.dtype, np.floating) or label.dtype == np.bool_:
        if label.dtype != np.bool_:
            raise ValueError(
                f"label {name!r} has float dtype {label.dtype}; labels must be integers "
                "(threshold a probability first, e.g. (prob > 0.5).astype('uint8'))"
            )
        label = label.astype(np.uint8)
    shapes = pyramid_shapes(label.shape, levels)
    image_label = {"version": version, "source": {"image": "../../"}}
    set_ome_attrs(
        group,
        {
            "multiscales": [multiscales_meta(name, shapes, spacing, origin, axes, version)],
            "image-label": image_label,
        },
        version,
    )
    write_multiscale(
        group, label, chunks, levels, True, progress, cancel, counter, total, f"labels/{name}"
    )


def _metadata_files(group_path: Path) -> list[Path]:
    return [group_path / n for n in ("zarr.json", ".zattrs", ".zgroup")]


def write_labels(
    path: str | Path,
    name: str,
    labels,
    *,
    chunks: int | Sequence[int] | None = None,
    affine: np.ndarray | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> Path:
    """Add a label image ``labels/<name>`` to an OME-Zarr (or replace it with ``overwrite``),
    or write a NIfTI file.

    For an OME-Zarr ``path`` the labels must match the image's shape; they get the image's
    spacing, pyramid depth and chunks (unless ``chunks`` is given). The label image is built
    under a temporary name inside ``labels/`` and swapped in when complete, so the image and
    every other label image are never touched and a failed write leaves the old one intact.
    For a ``.nii``/``.nii.gz`` ``path`` the labels are written as a NIfTI with ``affine``
    (identity if None); ``name`` is then only used in messages. PVS labels (``name="pvs"``)
    must hold 0, 1 or 255.
    """
    path = Path(path)
    progress = progress or no_progress
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        check_pvs_labels(name, labels)
        return save_nifti(
            path, labels, affine if affine is not None else np.eye(4), overwrite=overwrite
        )
    check_label_name(name)
    check_write_input(labels, f"label {name!r}")
    image = open_volume(check_path(path), check_finite=False)
    if image.levels[0].ndim != 3 or len(image.levels) < 1:
        raise ValueError(f"{path}: not an OME-Zarr image")
    if tuple(labels.shape) != image.shape:
        raise ValueError(
            f"labels {name!r} have shape {tuple(labels.shape)} but the image in {path} has "
            f"{image.shape}; labels must match the image voxel for voxel"
        )
    root = zarr.open_group(str(path), mode="r")
    ome = ome_attrs(dict(root.attrs))
    if "multiscales" not in ome:
        raise ValueError(f"{path}: not an OME-Zarr multiscale image; save it with save_ome_zarr")
    if name in image.label_names and not overwrite:
        raise FileExistsError(
            f"{path} already has a label image {name!r}; pass overwrite=True (or choose another "
            "name) to replace it"
        )
    check_pvs_labels(name, labels)
    version = "0.5" if isinstance(root.attrs.get("ome"), Mapping) else "0.4"
    zarr_format = root.metadata.zarr_format
    chunk_tuple = (
        _chunk_tuple(chunks) if chunks is not None else tuple(int(c) for c in root["0"].chunks)
    )
    origin = tuple(float(v) for v in image.affine[:3, 3])
    levels = len(image.levels)
    label = _as_dask(labels, chunk_tuple)
    total = sum(_n_chunks(s, chunk_tuple) for s in pyramid_shapes(label.shape, levels))
    args = (image.spacing, origin, image.axes, chunk_tuple, levels, version, progress, cancel)
    labels_dir = path / "labels"
    if is_zarr_dir(labels_dir):
        # The new label image is complete before it replaces the old one (one swap), and the
        # lazy labels may read the very arrays being replaced: they are still there meanwhile.
        with atomic.atomic_output(labels_dir / name, overwrite=True, kind="dir") as temp:
            group = zarr.open_group(str(temp), mode="w", zarr_format=zarr_format)
            _write_label_image(group, name, label, *args, [0], total)
        listed = list(ome_attrs(dict(zarr.open_group(str(labels_dir)).attrs)).get("labels", []))
        if name not in listed:  # zarr writes metadata by rename; make it durable too
            set_ome_attrs(zarr.open_group(str(labels_dir), mode="r+"), {"labels": [*listed, name]},
                           version)  # fmt: skip
            atomic.fsync_files(_metadata_files(labels_dir))
            atomic.fsync_folder(labels_dir)
    else:
        with atomic.atomic_output(labels_dir, overwrite=True, kind="dir") as temp:
            group = zarr.open_group(str(temp), mode="w", zarr_format=zarr_format)
            set_ome_attrs(group, {"labels": [name]}, version)
            _write_label_image(group.require_group(name), name, label, *args, [0], total)
    return path

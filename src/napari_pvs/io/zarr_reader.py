"""Zarr and OME-Zarr in: a plain array, a group of one, a multiscale image, its labels.

Arrays are ``(z, y, x)`` (singleton t/c axes squeezed); every chunk read is guarded
(:mod:`napari_pvs.io.damage`) and napari reads the store directly through the display views.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from napari_pvs.display import DisplayLevel
from napari_pvs.io.damage import DamagedFileError, damaged_file_error, guarded_dask, guarded_reader
from napari_pvs.io.geometry import diagonal_affine, index_3d
from napari_pvs.io.labels import check_label_name
from napari_pvs.io.metadata import UNIT_TO_MM, ome_attrs, our_attrs, scale_and_translation
from napari_pvs.io.modality import modality_from_name, normalize_modality
from napari_pvs.io.predictions import is_prediction_group
from napari_pvs.io.volume import Volume


def is_zarr_dir(path: Path) -> bool:
    """Whether ``path`` is a zarr v2/v3 array or group directory (by its metadata file)."""
    return path.is_dir() and any(
        (path / marker).exists() for marker in ("zarr.json", ".zarray", ".zgroup")
    )


def open_zarr(path: Path):
    """The zarr array or group at ``path``, read-only, with a clear error when it is none."""
    if not is_zarr_dir(path):
        contents = sorted(p.name for p in path.iterdir())[:5] if path.is_dir() else []
        if not contents:
            raise ValueError(f"{path}: empty directory, not a zarr store")
        raise ValueError(
            f"{path}: not a zarr store (no zarr.json, .zarray or .zgroup; found "
            f"{', '.join(contents)}...); point to the .zarr directory itself"
        )
    try:
        return zarr.open(store=str(path), mode="r")
    except Exception as exc:
        raise damaged_file_error(path, exc) or ValueError(
            f"{path}: corrupt or unreadable zarr store ({exc})"
        ) from exc


def _zarr_level_3d(
    array: zarr.Array, store: str | Path, what: str, axis_names: Sequence[str] | None = None
) -> tuple[da.Array, DisplayLevel, list]:
    """One stored level squeezed to 3D: its dask array, its display view, its axis names."""
    index, names = index_3d(array.shape, array.dtype, what, axis_names)
    reader = guarded_reader(array, store)
    lazy = guarded_dask(reader, array.chunks)
    if index is not None:
        lazy = lazy[index]
    return lazy, DisplayLevel(reader, lazy=lazy, index=index), names


def open_zarr_volume(path: Path) -> Volume:
    """A zarr array, a group holding one, an OME-Zarr image or a prediction store as a Volume."""
    node = open_zarr(path)
    attrs = dict(node.attrs)
    ours = our_attrs(attrs)
    stored = ours.get("modality")
    modality = stored if stored not in (None, "unknown") else modality_from_name(path)
    if isinstance(node, zarr.Array):
        return _plain_array_volume(node, path, modality, ours)
    ome = ome_attrs(attrs)
    if "multiscales" in ome:
        levels, display, spacing, affine, axes = _read_multiscales(node, ome, path)
        if "affine" in ours:
            affine = np.asarray(ours["affine"], dtype=np.float64)
        return Volume(
            data=levels[0],
            spacing=spacing,
            affine=affine,
            modality=normalize_modality(modality),
            source=str(path),
            axes=axes,
            levels=levels,
            label_names=stored_label_names(node),
            display=display,
        )
    arrays = [name for name, _ in node.arrays()]
    if len(arrays) == 1:
        return _plain_array_volume(node[arrays[0]], path, modality, ours)
    if is_prediction_group(node):  # opens as its probability map
        return _plain_array_volume(node["probability"], path, modality, ours)
    if not arrays:
        groups = [name for name, _ in node.groups()]
        hint = f" (it holds groups: {', '.join(groups)})" if groups else ""
        raise ValueError(f"{path}: zarr group holds no array and no OME-Zarr image{hint}")
    visible = sorted(name for name in arrays if not name.startswith("_")) or sorted(arrays)
    raise ValueError(
        f"{path}: zarr group holds {len(arrays)} arrays ({', '.join(sorted(arrays))}) and no "
        f"OME-Zarr metadata; open one of them, e.g. {path / visible[0]}"
    )


def _plain_array_volume(array: zarr.Array, path: Path, modality: str, ours: Mapping) -> Volume:
    data, display, _ = _zarr_level_3d(array, path, f"zarr array {path}")
    spacing = tuple(float(s) for s in ours.get("spacing", (1.0, 1.0, 1.0)))
    affine = (
        np.asarray(ours["affine"], dtype=np.float64)
        if "affine" in ours
        else diagonal_affine(spacing, (0.0, 0.0, 0.0))
    )
    return Volume(
        data=data,
        spacing=spacing,
        affine=affine,
        modality=normalize_modality(modality),
        source=str(path),
        axes=tuple(ours.get("axes", ("z", "y", "x"))),
        display=[display],
    )


def _read_multiscales(group: zarr.Group, ome: Mapping, path: Path):
    """Levels (dask, finest first), spacing (mm), diagonal affine and axis names of an image."""
    try:
        multiscale = ome["multiscales"][0]
        datasets = multiscale["datasets"]
        arrays = [group[d["path"]] for d in datasets]
    except (KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"{path}: invalid OME-Zarr multiscales metadata ({exc!r})") from exc
    ndim = arrays[0].ndim
    axes_meta = multiscale.get("axes") or [{"name": n} for n in "tczyx"[-ndim:]]
    axes_meta = [a if isinstance(a, Mapping) else {"name": a} for a in axes_meta]
    names = [a.get("name") for a in axes_meta]
    scale, translation = scale_and_translation(datasets[0].get("coordinateTransformations"), ndim)
    global_scale, global_translation = scale_and_translation(
        multiscale.get("coordinateTransformations"), ndim
    )
    scale, translation = scale * global_scale, translation * global_scale + global_translation
    unit_mm = np.array([UNIT_TO_MM.get(a.get("unit"), 1.0) for a in axes_meta])
    levels, display, kept = [], [], None
    for i, array in enumerate(arrays):
        level, view, kept_names = _zarr_level_3d(array, path, f"OME-Zarr {path} level {i}", names)
        levels.append(level)
        display.append(view)
        kept = kept_names
    keep_idx = [names.index(n) for n in kept]
    spacing = tuple(float(scale[i] * unit_mm[i]) for i in keep_idx)
    origin = tuple(float(translation[i] * unit_mm[i]) for i in keep_idx)
    axes = tuple(str(n) for n in kept)
    return levels, display, spacing, diagonal_affine(spacing, origin), axes


def stored_label_names(image_group: zarr.Group) -> tuple[str, ...]:
    """The label images an OME-Zarr image lists, each checked to be a plain name."""
    try:
        labels = image_group["labels"]
    except KeyError:
        return ()
    if not isinstance(labels, zarr.Group):
        return ()
    names = ome_attrs(dict(labels.attrs)).get("labels")
    if names is None:
        names = [name for name, _ in labels.groups()]
    store = str(image_group.store_path).removeprefix("file://")
    if not isinstance(names, list | tuple):
        raise DamagedFileError(
            f"{store}: its labels metadata is not a list of names; repair or re-create the store"
        )
    for name in names:
        try:
            check_label_name(name)
        except ValueError as exc:
            raise ValueError(
                f"the OME-Zarr labels of {store} list {str(name)!r}, which is "
                "not a plain name (no '/', '..' or absolute paths): refusing to follow it into "
                "another location; rename that label image"
            ) from exc
    return tuple(str(n) for n in names)

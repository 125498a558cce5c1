"""npe2 writer: labels layers to OME-Zarr labels or NIfTI, keeping the source geometry.

The volume panel's "Save labels" uses :func:`save_labels` too, so both paths behave the same.
Every write goes through :mod:`napari_pvs.io`'s writers, hence :mod:`napari_pvs.atomic`: a
temporary sibling renamed into place when complete, so a crash never leaves a truncated file
and the previous labels stay intact if saving fails. Saving replaces what is at ``path``: the
file dialog has already asked, and labels layers are the user's own work. PVS labels
(``pvs``) must hold 0, 1 or 255.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_pvs import io


def layer_affine(meta: dict) -> np.ndarray:
    """The voxel-to-mm affine of a layer: the source volume's (kept in metadata) or scale."""
    affine = (meta.get("metadata") or {}).get("affine")
    if affine is not None:
        return np.asarray(affine, dtype=np.float64)
    scale = tuple(meta.get("scale") or (1.0, 1.0, 1.0))[-3:]
    translate = tuple(meta.get("translate") or (0.0, 0.0, 0.0))[-3:]
    out = np.eye(4)
    out[:3, :3] = np.diag(scale)
    out[:3, 3] = translate
    return out


def save_labels(path: str | Path, data: Any, meta: dict) -> str:
    """Write a labels array to ``path`` and return it.

    - ``*.nii`` / ``*.nii.gz``: NIfTI with the layer's affine (the source volume's if known);
    - an existing OME-Zarr image: added or replaced as ``labels/<layer name>``;
    - a new ``*.zarr``: a single-level OME-Zarr of the labels with the layer's spacing, which
      :func:`napari_pvs.io.open_labels` (and ``napari-pvs evaluate``) read back.
    """
    path = Path(path)
    if isinstance(data, list):  # multiscale labels layer: the finest level is the data
        data = data[0]
    if getattr(data, "ndim", 0) != 3:
        raise ValueError(f"only 3D labels can be saved; this layer is {getattr(data, 'ndim', 0)}D")
    affine = layer_affine(meta)
    name = _safe_name(meta.get("name") or "labels")
    lower = path.name.lower()
    if lower.endswith(io.NIFTI_SUFFIXES):
        return str(io.save_nifti(path, data, affine, dtype=_label_dtype(data), overwrite=True))
    if not lower.endswith(".zarr"):
        raise ValueError(f"{path.name}: save labels as .zarr, .nii or .nii.gz")
    if path.exists():
        return str(io.write_labels(path, name, data, overwrite=True))
    spacing = tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    return str(
        io.save_ome_zarr(path, np.asarray(data), spacing, affine=affine, name=name, levels=1)
    )


def existing_label_target(path: str | Path, name: str) -> str | None:
    """What :func:`save_labels` would replace at ``path``: a sentence, or None if nothing.

    Callers ask the user before replacing (a phantom's ground truth, earlier corrections).
    """
    path = Path(path)
    if not path.exists():
        return None
    if path.name.lower().endswith(io.NIFTI_SUFFIXES):
        return f"the file {path}"
    if path.name.lower().endswith(".zarr"):
        try:
            names = io.open_volume(path, check_finite=False).label_names
        except (ValueError, FileNotFoundError):
            return f"{path}"
        label = _safe_name(name)
        return f"the label image labels/{label} in {path}" if label in names else None
    return f"{path}"


def _label_dtype(data) -> np.dtype:
    return np.dtype(np.uint8) if data.dtype == np.bool_ else np.dtype(data.dtype)


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "_-." else "_" for c in str(name)).strip("._")
    return cleaned or "labels"


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer entry point for labels layers."""
    return [save_labels(path, data, meta)]

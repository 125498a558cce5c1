"""Spacing, affines and 3D shape: the checks every reader and writer shares."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def check_spacing(spacing) -> tuple[float, float, float]:
    """Voxel spacing as three positive mm values; one number means isotropic."""
    values = (spacing,) * 3 if np.isscalar(spacing) else tuple(spacing)
    if len(values) != 3:
        raise ValueError(f"spacing must be one number or three (z, y, x) in mm, got {spacing!r}")
    out = tuple(float(v) for v in values)
    if not all(math.isfinite(v) and v > 0 for v in out):
        raise ValueError(f"spacing must be positive millimetres, got {spacing!r}")
    return out  # type: ignore[return-value]


def diagonal_affine(spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """The 4x4 affine of an axis-aligned grid: ``spacing`` on the diagonal, ``origin`` moved to."""
    affine = np.eye(4)
    affine[:3, :3] = np.diag([float(s) for s in spacing])
    affine[:3, 3] = [float(o) for o in origin]
    return affine


def check_affine(affine) -> np.ndarray:
    """A voxel-to-mm affine as a 4x4 float64 array; any other shape is refused."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    return affine


def _as_3d(array, what: str, axis_names: Sequence[str] | None = None):
    """Return ``(array3d, names3d)``, squeezing singleton extra axes; clear errors otherwise."""
    index, names = index_3d(array.shape, array.dtype, what, axis_names)
    return (array if index is None else array[index]), names


def index_3d(
    shape: Sequence[int], dtype, what: str, axis_names: Sequence[str] | None = None
) -> tuple[tuple[int | slice, ...] | None, list]:
    """The index that squeezes an array to 3D (None: it is 3D) and the kept axis names."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_) or np.issubdtype(
        dtype, np.complexfloating
    ):
        raise ValueError(
            f"{what} has dtype {dtype}, which is not a real numeric type; store the image as "
            "an integer or float array"
        )
    names = list(axis_names) if axis_names is not None else [None] * ndim
    if ndim == 3:
        return None, names
    if ndim < 3:
        raise ValueError(
            f"{what} is {ndim}D with shape {shape}; a 3D volume is expected "
            "(stack 2D slices into one 3D array first)"
        )
    singleton = [i for i, s in enumerate(shape) if s == 1]
    if ndim - len(singleton) == 3:
        keep = [i for i in range(ndim) if i not in singleton]
    elif ndim - len(singleton) < 3:
        keep = sorted(set(range(ndim)) - set(singleton[: ndim - 3]))
    else:
        raise ValueError(
            f"{what} is {ndim}D with shape {shape}; only a 3D volume is "
            "supported (a 4D array is accepted when its extra channel/time axis has length 1, "
            "which is squeezed). Extract one channel or time point, e.g. with "
            "nibabel's image.slicer[..., 0]"
        )
    index = tuple(slice(None) if i in keep else 0 for i in range(ndim))
    return index, [names[i] for i in keep]


def check_write_input(array, what: str) -> None:
    if getattr(array, "ndim", None) != 3:
        raise ValueError(
            f"{what} must be a 3D array; got shape {tuple(getattr(array, 'shape', ()))}"
        )
    _as_3d(array, what)

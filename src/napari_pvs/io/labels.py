"""Label values and label image names, checked where labels enter (evaluate, train, writers)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import numpy as np

#: The label values everything understands: 0 background, 1 PVS, 255 not labelled.
LABEL_VALUES = (0, 1, 255)

#: Label value meaning "not annotated" (ignored by training and by scoring).
UNLABELLED = 255

#: The label image that holds PVS labels (0/1, 255 = not labelled); its values are checked.
PVS_LABEL_NAME = "pvs"


class LabelWarning(UserWarning):
    """Labels that are valid but probably not what was meant (e.g. no PVS voxel at all)."""


def label_value_counts(labels, what: str = "labels") -> dict[int, int]:
    """How many voxels hold each value, read slab by slab (numpy, zarr or dask)."""
    shape = tuple(int(s) for s in labels.shape)
    if not shape:
        raise ValueError(f"{what} must be an array, got a scalar")
    plane = max(1, int(np.prod(shape[1:])))
    slab = max(1, (16 << 20) // plane)
    counts: dict[int, int] = {}
    for start in range(0, shape[0], slab):
        block = labels[start : start + slab]
        block = np.asarray(block.compute() if hasattr(block, "compute") else block)
        if np.issubdtype(block.dtype, np.floating):
            if not np.all(np.isfinite(block)):
                raise ValueError(f"{what} contain NaN or infinite values; labels must be integers")
        elif not (np.issubdtype(block.dtype, np.integer) or block.dtype == np.bool_):
            raise ValueError(f"{what} have dtype {block.dtype}; labels must be integers")
        if block.dtype in (np.uint8, np.bool_):  # the usual case: a histogram, no sort
            n = np.bincount(block.ravel().view(np.uint8), minlength=2)
            values = np.nonzero(n)[0]
            n = n[values]
        else:
            values, n = np.unique(block, return_counts=True)
        for value, count in zip(values.tolist(), n.tolist(), strict=True):
            key = int(value) if float(value).is_integer() else value
            counts[key] = counts.get(key, 0) + int(count)
    return counts


def check_label_values(
    labels, what: str = "labels", allowed: Sequence[int] = LABEL_VALUES, warn_empty: bool = True
) -> dict[int, int]:
    """Refuse labels holding values outside ``allowed`` (default 0, 1, 255), listing them.

    Returns the count of every value. With ``warn_empty`` a :class:`LabelWarning` says when no
    voxel is PVS (1): labels coded 0/255 only, or PVS coded as another value, would otherwise
    train or score nothing without a word.
    """
    counts = label_value_counts(labels, what)
    extra = sorted((v for v in counts if v not in allowed), key=float)
    if extra:
        shown = ", ".join(str(v) for v in extra[:10]) + (", ..." if len(extra) > 10 else "")
        meaning = {0: "0 background", 1: "1 PVS", 255: "255 not labelled"}
        expected = ", ".join(meaning.get(int(v), str(v)) for v in allowed)
        raise ValueError(
            f"{what} hold values {shown} besides {sorted(v for v in counts if v in allowed)}; "
            f"only {expected} are understood. Recode them (e.g. labels == 2 -> 1) and save again"
        )
    if warn_empty and not counts.get(1):
        note = (
            f" ({counts[UNLABELLED]} voxels are 255, which means not labelled, not PVS)"
            if counts.get(UNLABELLED)
            else ""
        )
        warnings.warn(
            f"{what} have no PVS voxel (value 1){note}; check the coding (1 = PVS, "
            "0 = background, 255 = not labelled)",
            LabelWarning,
            stacklevel=2,
        )
    return counts


def check_pvs_labels(name: str, label) -> None:
    """PVS labels are validated where they are written (other label images are free-form)."""
    if name == PVS_LABEL_NAME:
        check_label_values(label, f"label {name!r}", warn_empty=False)


def check_label_name(name: str) -> str:
    """A label image name must be a plain name: no '/', '\\', '..', nothing absolute."""
    text = str(name)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", text) or text in (".", "..") or ".." in text:
        raise ValueError(
            f"label name {text!r} is not allowed; use a plain name of letters, digits, '_', "
            "'-' or '.' (no '/', '..' or absolute paths)"
        )
    return text

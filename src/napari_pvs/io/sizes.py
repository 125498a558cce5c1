"""What a volume's declared shape may be: 3-D, not empty, not beyond what this machine could
plausibly hold (every reader checks these as soon as the shape is known, from metadata alone,
so a bad file gets one sentence before anything divides by an edge or builds work that grows
with the declared size), and, to be worked on, not degenerate (at least one smallest patch:
:func:`check_volume_shape`, re-exported by :mod:`napari_pvs.limits`).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: The smallest patch edge napari-pvs ranks, reviews or trains on (a few voxels of PVS width on
#: each side of a vessel; smaller patches carry no context). A volume holds at least one.
MIN_PATCH = 8
#: How much larger than this machine's disk plus RAM a declared (uncompressed) volume may be:
#: zarr stores compress, and chunks never written take no room, but a scan declaring more than
#: this cannot be segmented here (its prediction alone would not fit).
PLAUSIBLE_FACTOR = 16


def check_nonempty_shape(shape: Sequence[int], source: str | os.PathLike = "the volume") -> tuple:
    """A 3-D shape with every edge >= 1 (what every reader requires: nothing divides by 0)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(
            f"{source} has {len(shape)} dimensions {shape}; napari-pvs works on 3-D volumes"
        )
    if min(shape) < 1:
        raise ValueError(
            f"{source} is empty (shape {'x'.join(map(str, shape))}, an edge of 0 voxels); "
            "re-export the scan and try again"
        )
    return shape


def check_volume_shape(shape: Sequence[int], source: str | os.PathLike = "the volume") -> tuple:
    """A 3-D shape with every edge >= 1 and at least one smallest patch of voxels.

    Refuses zero-size and degenerate volumes (an empty file, a single voxel, a 2-D slice stored
    as 3-D with too few voxels to review) before anything divides by an edge or ranks nothing:
    the rule for a volume napari-pvs works on (Add, predict, convert).
    """
    shape = check_nonempty_shape(shape, source)
    if math.prod(shape) < MIN_PATCH**3:
        raise ValueError(
            f"{source} holds only {math.prod(shape)} voxels (shape {'x'.join(map(str, shape))}), "
            f"fewer than one {MIN_PATCH}^3 patch; it is not a scan napari-pvs can segment"
        )
    return shape


def physical_memory() -> int:
    """Bytes of RAM in this machine (a generous bound: other programs' use is not counted)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): assume 16 GiB
        return 16 * 2**30


def plausible_bytes(path: str | os.PathLike) -> int:
    """The most bytes a volume at ``path`` may declare: :data:`PLAUSIBLE_FACTOR` times the
    size of the disk holding it plus this machine's RAM."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        disk = shutil.disk_usage(folder).total
    except OSError:
        disk = 0
    return PLAUSIBLE_FACTOR * (disk + physical_memory())


def check_declared_size(
    shape: Sequence[int], dtype, path: str | os.PathLike, source: str | None = None
) -> None:
    """Refuse a volume whose declared size is beyond :func:`plausible_bytes` (a hostile or
    broken header), naming the size and the bound."""
    declared = math.prod(int(s) for s in shape) * np.dtype(dtype).itemsize
    bound = plausible_bytes(path)
    if declared > bound:
        raise ValueError(
            f"{source or path} declares {'x'.join(str(int(s)) for s in shape)} voxels of "
            f"{np.dtype(dtype)} ({declared / 2**40:.1f} TiB), more than this machine could "
            f"hold or process ({bound / 2**40:.1f} TiB: {PLAUSIBLE_FACTOR}x its disk and RAM); "
            "its header is probably damaged: re-export the scan"
        )

"""Checks of user-given sizes and names, made before any work, each refusal one sentence.

A strategy name, a count (``--n``), a patch edge (``--patch``), a window edge (``--window``) and
a volume's own shape are checked against what the model and the volume allow; the message names
the allowed range, so the user can fix the command at once instead of meeting a silent fallback,
a traceback or an hour of swapping. Cheap: a model's size divisor is read from its checkpoint
header (the model is built on the ``meta`` device, no weights are read). The volume shape
check and :data:`MIN_PATCH` live in :mod:`napari_pvs.io.sizes` (every reader applies them) and
are re-exported here. No Qt, no napari.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from napari_pvs.io.sizes import MIN_PATCH, check_volume_shape, physical_memory

#: Bytes of working memory per window voxel, for one window in a batch. Measured for the bundled
#: model in float32 (peak RSS growth from a 64^3 to a 96^3 window: about 480 bytes a voxel);
#: twice that leaves room for uncertainty samples and the blending buffers.
WINDOW_BYTES_PER_VOXEL = 1024

__all__ = [
    "MIN_PATCH",
    "WINDOW_BYTES_PER_VOXEL",
    "check_count",
    "check_patch",
    "check_strategy",
    "check_training_patch",
    "check_volume_shape",
    "check_window",
    "model_size_divisor",
    "patch_range",
    "physical_memory",
    "window_range",
]


def check_strategy(name: str, flag: str = "--strategy") -> str:
    """``name`` if ranking knows it (the list is read from :mod:`napari_pvs.ranking` now)."""
    from napari_pvs import ranking

    known = tuple(ranking.STRATEGIES)
    if name not in known:
        raise ValueError(f"{flag} {name!r} is not a strategy; choose one of {', '.join(known)}")
    return name


def check_count(n: int, flag: str = "--n") -> int:
    """A count of things to do (patches, samples, windows per batch): a whole number >= 1."""
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"{flag} must be a whole number of at least 1, got {n}")
    return int(n)


def model_size_divisor(model: str | os.PathLike | Sequence[str | os.PathLike]) -> int:
    """The edge every model input is padded to a multiple of (the least common multiple for an
    ensemble), read from the checkpoint header without importing torch: ``'default'`` or a
    checkpoint path (its tensors are checked against the model when it is loaded)."""
    if not isinstance(model, str | os.PathLike):
        return math.lcm(*(model_size_divisor(m) for m in model))
    from napari_pvs.models import default_checkpoint_path, size_divisor
    from napari_pvs.models.checkpoint_checks import read_header

    path = default_checkpoint_path() if str(model) == "default" else Path(model)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist; pass 'default' or a .safetensors file "
            "written by napari-pvs"
        )
    source = repr(str(path))
    meta, _ = read_header(path, source)
    try:
        return size_divisor(meta["model"]["name"], dict(meta["model"].get("config") or {}))
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


def patch_range(shape: Sequence[int], divisor: int = 1) -> tuple[int, int]:
    """(smallest, largest) patch edge: at least :data:`MIN_PATCH` and the model's divisor, at
    most the volume's smallest edge."""
    return max(MIN_PATCH, int(divisor)), min(int(s) for s in shape)


def check_patch(
    patch: int, shape: Sequence[int], divisor: int = 1, source: str | os.PathLike = "the volume"
) -> int:
    """A patch edge within :func:`patch_range` of the volume ``shape``."""
    low, high = patch_range(shape, divisor)
    if low > high:
        raise ValueError(
            f"{source} ({'x'.join(map(str, shape))}) is thinner than the smallest patch "
            f"({low} voxels); it cannot be ranked or reviewed in patches"
        )
    if isinstance(patch, bool) or int(patch) != patch or not low <= patch <= high:
        raise ValueError(
            f"--patch must be between {low} and {high} voxels for {source} "
            f"({'x'.join(map(str, shape))}), got {patch}"
        )
    return int(patch)


def check_training_patch(
    patch: int, shapes: Sequence[Sequence[int]], divisor: int = 1, default: int = 32
) -> int:
    """A training patch edge: at least :data:`MIN_PATCH` and twice the model's divisor (the
    training loop's floor), at most the largest volume edge rounded up to the divisor (or
    ``default``, whichever is larger: a larger patch is only padding and memory)."""
    divisor = max(1, int(divisor))
    largest = max((int(s) for shape in shapes for s in shape), default=default)
    low, high = max(MIN_PATCH, 2 * divisor), max(default, -(-largest // divisor) * divisor)
    if isinstance(patch, bool) or int(patch) != patch or not low <= patch <= high:
        raise ValueError(
            f"--patch must be between {low} and {high} voxels for this project's volumes and "
            f"model, got {patch}"
        )
    return int(patch)


def window_range(
    divisor: int = 1,
    shape: Sequence[int] | None = None,
    batch: int = 1,
    memory: int | None = None,
) -> tuple[int, int]:
    """(smallest, largest) window edge: at least the model's divisor; at most what ``batch``
    windows fit in ``memory`` (default: this machine's RAM) at :data:`WINDOW_BYTES_PER_VOXEL`,
    and, given the volume ``shape``, not beyond its largest edge (rounded up to the divisor) or
    the default window, whichever is larger (a larger window is only zero padding)."""
    from napari_pvs.models import DEFAULT_WINDOW

    divisor = max(1, int(divisor))
    memory = physical_memory() if memory is None else int(memory)
    by_memory = int((memory / (WINDOW_BYTES_PER_VOXEL * max(1, int(batch)))) ** (1 / 3))
    while (by_memory + 1) ** 3 * WINDOW_BYTES_PER_VOXEL * max(1, batch) <= memory:
        by_memory += 1  # the cube root in floating point may fall one short
    high = by_memory
    if shape is not None:
        largest = max(int(s) for s in shape)
        high = min(high, max(int(DEFAULT_WINDOW), -(-largest // divisor) * divisor))
    return divisor, high


def check_window(
    window: int,
    divisor: int = 1,
    shape: Sequence[int] | None = None,
    batch: int = 1,
    source: str | os.PathLike = "the volume",
    memory: int | None = None,
) -> int:
    """A window edge within :func:`window_range`."""
    low, high = window_range(divisor, shape, batch, memory)
    if isinstance(window, bool) or int(window) != window or not low <= window <= high:
        why = f" for {source} ({'x'.join(map(str, shape))})" if shape is not None else ""
        raise ValueError(
            f"--window must be between {low} and {high} voxels{why} with this model and "
            f"{physical_memory() // 2**30 if memory is None else memory // 2**30} GiB of memory "
            f"(batch {batch}), got {window}"
        )
    return int(window)

"""Lazy volume I/O: zarr, OME-Zarr and NIfTI in, OME-Zarr (and NIfTI) out.

Everything here is lazy: opening a volume reads metadata only (plus, for float data, a small
strided sample of the coarsest level to catch NaN/inf early), and writers stream chunk by chunk
from dask, so memory does not grow with the volume. Arrays keep the file's own voxel order:
zarr/OME-Zarr ``(z, y, x)``, NIfTI ``(i, j, k)`` with the header affine mapping ``(i, j, k)`` to
scanner mm. No Qt or napari here; the reader, writer, widgets and CLI are adapters over this.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import uuid
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from napari_pvs import atomic
from napari_pvs.display import DisplayLevel
from napari_pvs.intensity import strided_sample
from napari_pvs.progress import (
    CancelToken,
    ProgressCallback,
    check_cancelled,
    no_progress,
)

MODALITIES = ("T1", "T2", "unknown")
#: Key of our own metadata in zarr attributes (modality, full affine).
ATTRS_KEY = "napari_pvs"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DEFAULT_CHUNK = 64
#: Roughly how many bytes a writer keeps in flight per batch of chunks (bounds its memory).
WRITE_BATCH_BYTES = 64 << 20
#: Voxels read at open time to look for NaN/inf in float volumes (from the coarsest level).
FINITE_SAMPLE_VOXELS = 262_144

_UNIT_TO_MM = {
    "millimeter": 1.0,
    "micrometer": 1e-3,
    "nanometer": 1e-6,
    "centimeter": 10.0,
    "meter": 1e3,
    None: 1.0,
}
_MODALITY_HINT = re.compile(r"(?:^|[^a-z0-9])t([12])w?(?:$|[^a-z0-9])", re.IGNORECASE)


@dataclass
class Volume:
    """A lazy 3D volume with its geometry.

    ``data`` is ``levels[0]``; ``levels`` holds the multiscale pyramid finest first (one entry
    for single-resolution files). ``spacing`` is mm per array axis of ``data``; ``affine`` maps
    voxel indices (in array order) to world mm. ``label_names`` lists OME-Zarr label images
    stored with the volume (open them with :func:`open_labels`). ``display`` holds the same
    levels as :class:`~napari_pvs.display.DisplayLevel` views when they are plain store reads
    (zarr, OME-Zarr, an unscaled ``.nii``): what napari is given (see :meth:`display_levels`).
    """

    data: da.Array
    spacing: tuple[float, float, float]
    affine: np.ndarray
    modality: str = "unknown"
    source: str | None = None
    axes: tuple[str, str, str] = ("z", "y", "x")
    levels: list[da.Array] = field(default_factory=list)
    label_names: tuple[str, ...] = ()
    display: list[DisplayLevel] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.levels:
            self.levels = [self.data]
        if self.display and len(self.display) != len(self.levels):
            raise ValueError(f"{len(self.display)} display levels for {len(self.levels)} levels")

    def display_levels(self) -> list:
        """The levels as napari should read them: direct store views when there are, else dask."""
        return list(self.display) if self.display else list(self.levels)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)

    @property
    def level_spacings(self) -> list[tuple[float, float, float]]:
        """Spacing (mm) of every pyramid level, derived from the shape ratio to level 0."""
        out = []
        for level in self.levels:
            ratio = [s0 / max(s, 1) for s0, s in zip(self.data.shape, level.shape, strict=True)]
            out.append(tuple(float(sp * r) for sp, r in zip(self.spacing, ratio, strict=True)))
        return out


# --------------------------------------------------------------------------------------------
# damaged files: one place that turns read errors into one sentence


class DamagedFileError(ValueError):
    """A file that exists but cannot be read back: truncated, corrupt, or a bad header."""


#: Words in the messages of codec, gzip and JSON errors that mean the bytes are damaged.
_DAMAGE_WORDS = (
    "decompress",
    "compressed",
    "corrupt",
    "truncat",
    "crc check",
    "checksum",
    "end-of-stream",
    "not a gzipped",
    "invalid input data",
    "unterminated",
    "expecting",
    "invalid header",
    "unexpected end",
)


def _damage_reason(exc: BaseException) -> str | None:
    """Why ``exc`` means damaged bytes (short), or None when it is some other error."""
    text = " ".join(str(exc).split())
    if len(text) > 160:
        text = text[:157] + "..."
    if isinstance(exc, DamagedFileError):
        return text
    if isinstance(exc, EOFError):
        return f"it ends early, so it is truncated: {text}"
    if isinstance(exc, zlib.error | gzip.BadGzipFile):
        return f"corrupt compressed data: {text}"
    if isinstance(exc, json.JSONDecodeError | UnicodeDecodeError):
        return f"its metadata is not valid JSON: {text}"
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    if isinstance(exc, ImageFileError | HeaderDataError):
        return f"not a readable NIfTI file, bad header: {text}"
    if isinstance(exc, zarr.errors.MetadataValidationError | zarr.errors.NodeTypeValidationError):
        return f"invalid zarr metadata: {text}"
    if isinstance(exc, RuntimeError | ValueError | OSError | TypeError | KeyError) and any(
        word in text.lower() for word in _DAMAGE_WORDS
    ):
        return text
    return None


def damaged_file_error(
    path: str | Path | None, exc: BaseException, part: str | None = None
) -> DamagedFileError | None:
    """The one-sentence :class:`DamagedFileError` for ``exc`` raised reading ``path``, or None.

    Decompression errors (zstd, blosc, gzip/zlib), ``EOFError`` of a truncated ``.nii.gz``,
    bad NIfTI headers and unparsable zarr metadata map to a sentence naming the file and what
    to do; any other error gives None (the caller re-raises it). The CLI, the napari reader and
    every lazy chunk read share this. ``part`` names what inside ``path`` was being read.
    """
    if isinstance(exc, DamagedFileError):
        return exc
    reason = _damage_reason(exc)
    if reason is None:
        return None
    if part:
        reason = f"{part}: {reason}"
    where = str(path) if path is not None else "a file being read"
    return DamagedFileError(
        f"{where} is damaged and cannot be read ({reason}); restore it from a backup or "
        "re-create it (re-export, re-convert, or rerun the command that wrote it)"
    )


class _GuardedReads:
    """Array-like wrapper whose reads turn damaged-chunk errors into :class:`DamagedFileError`.

    Dask reads chunks lazily, long after opening, so the check must travel with each read.
    """

    def __init__(self, array, where: str, part: str | None = None) -> None:
        self.array = array
        self.where = where
        self.part = part
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.chunks = getattr(array, "chunks", None)  # (zarr) what one decode covers

    def __getitem__(self, key):
        try:
            return np.asarray(self.array[key])
        except Exception as exc:
            damaged = damaged_file_error(self.where, exc, self.part)
            if damaged is None:
                raise
            raise damaged from exc


def _guarded_reader(array: zarr.Array, store: str | Path) -> _GuardedReads:
    part = f"a chunk of array {array.path}" if array.path else "a chunk"
    return _GuardedReads(array, str(store), part)


def _guarded_dask(reader: _GuardedReads, chunks: Sequence[int]) -> da.Array:
    return da.from_array(
        reader,
        chunks=tuple(chunks),
        name=f"napari-pvs-zarr-{uuid.uuid4().hex}",
        meta=np.empty((0,) * reader.ndim, dtype=reader.dtype),
    )


def guarded_from_zarr(array: zarr.Array, store: str | Path) -> da.Array:
    """``da.from_zarr`` whose chunk reads name the store when a chunk is damaged."""
    return _guarded_dask(_guarded_reader(array, store), array.chunks)


def guarded_display(array: zarr.Array, store: str | Path) -> DisplayLevel:
    """A zarr array as napari should read it (direct reads, damaged chunks named), with its
    guarded dask array for computations (:meth:`DisplayLevel.to_dask`)."""
    reader = _guarded_reader(array, store)
    return DisplayLevel(reader, lazy=_guarded_dask(reader, array.chunks))


# --------------------------------------------------------------------------------------------
# label values: checked where labels enter (evaluate, train, writers)

#: The label values everything understands: 0 background, 1 PVS, 255 not labelled.
LABEL_VALUES = (0, 1, 255)
#: Label value meaning "not annotated" (ignored by training and by scoring).
UNLABELLED = 255


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


def check_label_name(name: str) -> str:
    """A label image name must be a plain name: no '/', '\\', '..', nothing absolute."""
    text = str(name)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", text) or text in (".", "..") or ".." in text:
        raise ValueError(
            f"label name {text!r} is not allowed; use a plain name of letters, digits, '_', "
            "'-' or '.' (no '/', '..' or absolute paths)"
        )
    return text


# --------------------------------------------------------------------------------------------
# validation helpers


def check_spacing(spacing) -> tuple[float, float, float]:
    """Voxel spacing as three positive mm values; one number means isotropic."""
    values = (spacing,) * 3 if np.isscalar(spacing) else tuple(spacing)
    if len(values) != 3:
        raise ValueError(f"spacing must be one number or three (z, y, x) in mm, got {spacing!r}")
    out = tuple(float(v) for v in values)
    if not all(math.isfinite(v) and v > 0 for v in out):
        raise ValueError(f"spacing must be positive millimetres, got {spacing!r}")
    return out  # type: ignore[return-value]


def normalize_modality(modality: str | None) -> str:
    """Map "T1"/"T1w"/"t2w"/None/... to one of :data:`MODALITIES`; reject anything else."""
    if modality is None:
        return "unknown"
    key = str(modality).strip().upper()
    if key in ("T1", "T1W"):
        return "T1"
    if key in ("T2", "T2W"):
        return "T2"
    if key in ("UNKNOWN", ""):
        return "unknown"
    raise ValueError(f"unknown modality {modality!r}; use 'T1', 'T2' or 'unknown'")


def modality_from_name(path: str | Path) -> str:
    """Guess the modality from a BIDS-like hint in the file name ("sub-01_T2w.nii.gz")."""
    name = Path(str(path).rstrip("/")).name
    match = _MODALITY_HINT.search(name)
    return f"T{match.group(1)}" if match else "unknown"


def _as_3d(array, what: str, axis_names: Sequence[str] | None = None):
    """Return ``(array3d, names3d)``, squeezing singleton extra axes; clear errors otherwise."""
    index, names = _index_3d(array.shape, array.dtype, what, axis_names)
    return (array if index is None else array[index]), names


def _index_3d(
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


def _zarr_level_3d(
    array: zarr.Array, store: str | Path, what: str, axis_names: Sequence[str] | None = None
) -> tuple[da.Array, DisplayLevel, list]:
    """One stored level squeezed to 3D: its dask array, its display view, its axis names."""
    index, names = _index_3d(array.shape, array.dtype, what, axis_names)
    reader = _guarded_reader(array, store)
    lazy = _guarded_dask(reader, array.chunks)
    if index is not None:
        lazy = lazy[index]
    return lazy, DisplayLevel(reader, lazy=lazy, index=index), names


def _check_finite_sample(array: da.Array, what: str) -> None:
    """Raise if a strided sample of a float array holds NaN/inf (never reads the whole array)."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    sample = strided_sample(array, FINITE_SAMPLE_VOXELS)
    if not np.all(np.isfinite(sample)):
        raise ValueError(
            f"{what} contains NaN or infinite voxels; replace them (for example with "
            "numpy.nan_to_num) and save the volume again"
        )


def _raise_if_nonfinite(block: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(block)):
        raise ValueError(
            "the volume contains NaN or infinite voxels in a chunk being read; replace them "
            "(for example with numpy.nan_to_num) and save the volume again"
        )
    return block


def finite_guard(array: da.Array) -> da.Array:
    """Wrap a float dask array so each chunk is checked for NaN/inf when it is computed.

    This is the lazy half of the NaN/inf check: the open-time check only samples, so a NaN
    missed by the sample raises a clear ``ValueError`` when its chunk is consumed.
    """
    if not np.issubdtype(array.dtype, np.floating):
        return array
    return array.map_blocks(_raise_if_nonfinite, dtype=array.dtype)


# --------------------------------------------------------------------------------------------
# opening


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _is_zarr_dir(path: Path) -> bool:
    return path.is_dir() and any(
        (path / marker).exists() for marker in ("zarr.json", ".zarray", ".zgroup")
    )


def is_supported_path(path: str | Path) -> bool:
    """True for paths :func:`open_volume` can read (zarr directories and .nii/.nii.gz files)."""
    path = Path(path)
    return (path.is_file() and _is_nifti(path)) or _is_zarr_dir(path)


def _check_path(path: str | Path) -> Path:
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
    path = _check_path(path)
    if path.is_file():
        if not _is_nifti(path):
            raise ValueError(
                f"{path.name}: unsupported file type; open a .nii/.nii.gz file or a .zarr directory"
            )
        volume = _open_nifti(path)
    else:
        volume = _open_zarr_dir(path)
    if modality is not None:
        volume.modality = normalize_modality(modality)
    if check_finite and np.issubdtype(volume.data.dtype, np.floating):
        _check_finite_sample(volume.levels[-1], f"volume {path}")
        volume.levels = [finite_guard(level) for level in volume.levels]
        volume.data = volume.levels[0]
        # what napari is given reads the store directly; computations through it stay checked
        if volume.display:
            pairs = zip(volume.display, volume.levels, strict=True)
            volume.display = [view.with_lazy(level) for view, level in pairs]
    return volume


def _open_nifti_array(path: Path):
    """Return ``(nibabel image, lazy dask array, direct reader or None)`` for a NIfTI file.

    Uncompressed ``.nii`` is wrapped as a true ``numpy.memmap`` (zero-copy random access).
    ``.nii.gz`` cannot be random-accessed: reading a chunk decompresses the file from its start
    up to that chunk, so chunks are whole ``k`` slabs (contiguous in the file) and large volumes
    should be converted once with ``napari-pvs convert`` (:func:`convert_to_ome_zarr`).
    """
    import nibabel as nib

    try:
        image = nib.load(str(path), mmap=True)
    except Exception as exc:  # nibabel raises many types for corrupt headers
        raise damaged_file_error(path, exc) or DamagedFileError(
            f"{path} is not a readable NIfTI file ({exc}); re-export the image"
        ) from exc
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise ValueError(f"{path.name}: not a NIfTI-1/2 image")
    header = image.header
    shape = tuple(int(s) for s in image.shape)
    on_disk = header.get_data_dtype()
    # nibabel moves scl_slope/scl_inter from the header to the proxy when loading
    slope = float(getattr(image.dataobj, "slope", 1.0))
    inter = float(getattr(image.dataobj, "inter", 0.0))
    scaled = (slope, inter) != (1.0, 0.0)
    compressed = path.name.lower().endswith(".gz")
    reader = None  # a .nii.gz decompresses from its start for every read: dask slabs suit it
    if compressed:
        proxy = _GuardedReads(image.dataobj, str(path))
        out_dtype = proxy[(slice(0, 1),) * len(shape)].dtype
        chunks = list(shape)
        if len(shape) >= 3:
            plane = max(1, shape[0] * shape[1] * on_disk.itemsize)
            chunks[2] = max(1, min(shape[2], (64 << 20) // plane))
        array = da.from_array(
            proxy, chunks=tuple(chunks), asarray=True, meta=np.empty((0,) * len(shape), out_dtype)
        )
        if scaled:
            array = array.astype(np.float32)
    else:
        offset = int(image.dataobj.offset)
        expected = offset + int(np.prod(shape)) * on_disk.itemsize
        if path.stat().st_size < expected:
            raise DamagedFileError(
                f"{path} is damaged and cannot be read (it is truncated: "
                f"{path.stat().st_size} bytes, its header promises {expected}); restore it "
                "from a backup or re-export the image"
            )
        memmap = np.memmap(path, dtype=on_disk, mode="r", offset=offset, shape=shape, order="F")
        array = da.from_array(memmap, chunks=_default_chunks(shape, on_disk.itemsize))
        if scaled:  # apply the header's intensity scaling lazily, per chunk, in float32
            array = (array * np.float32(slope) + np.float32(inter)).astype(np.float32)
        else:
            reader = memmap  # napari reads the plane it draws straight from the mapping
    return image, array, reader


def _default_chunks(shape: Sequence[int], itemsize: int) -> tuple[int, ...]:
    side = 128 if itemsize <= 2 else 96
    return tuple(min(int(s), side) for s in shape)


def _open_nifti(path: Path) -> Volume:
    import nibabel as nib

    image, array, reader = _open_nifti_array(path)
    index, _ = _index_3d(array.shape, array.dtype, f"NIfTI {path.name}")
    if index is not None:
        array = array[index]
    display = [] if reader is None else [DisplayLevel(reader, lazy=array, index=index)]
    affine = np.asarray(image.affine, dtype=np.float64)
    spacing = tuple(float(v) for v in nib.affines.voxel_sizes(affine)[:3])
    return Volume(
        data=array,
        spacing=spacing,
        affine=affine,
        modality=modality_from_name(path),
        source=str(path),
        axes=("i", "j", "k"),
        display=display,
    )


def _open_zarr(path: Path):
    if not _is_zarr_dir(path):
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


def _ome_attrs(attrs: Mapping) -> Mapping:
    """The OME-NGFF attribute dict for v0.5 (under "ome") or v0.4 (top level)."""
    return attrs["ome"] if isinstance(attrs.get("ome"), Mapping) else attrs


def _ours(attrs: Mapping) -> Mapping:
    return attrs.get(ATTRS_KEY, {}) if isinstance(attrs.get(ATTRS_KEY, {}), Mapping) else {}


def _is_prediction_group(node) -> bool:
    """Whether a zarr node is a ``napari-pvs predict`` store (probability + segmentation)."""
    return isinstance(node, zarr.Group) and {"probability", "segmentation"} <= {
        name for name, _ in node.arrays()
    }


def open_prediction(path: str | Path) -> zarr.Group:
    """Open a ``napari-pvs predict`` store read-only, with a clear error when it is not one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no prediction store at {path}; run 'napari-pvs predict' first")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:
        raise ValueError(f"{path} is not a zarr group of predictions ({exc})") from exc
    if "probability" not in group:
        raise ValueError(
            f"{path} holds no 'probability' array; point to the output of 'napari-pvs predict'"
        )
    return group


PREDICTION_LEVELS = "levels"
"""Group of a prediction store holding coarser display levels: ``levels/<array>/<k>``, level
``k`` halving level ``k - 1`` (level 0 is the array itself)."""


def prediction_levels(
    group: zarr.Group, name: str, store: str | Path, display: bool = False
) -> list:
    """One prediction array as a display pyramid, finest first: ``[name]`` plus the coarser
    levels the store holds (a store without them, or a small one, gives one level).

    Coarser levels exist for display only: they are max-pooled, so a PVS one voxel wide stays
    visible at every zoom, and the full-resolution array stays the one every figure uses.
    ``store`` is the store's path, named when a chunk turns out damaged. ``display``: the
    levels as :class:`~napari_pvs.display.DisplayLevel` views (what napari should be given)
    instead of dask arrays.
    """
    read = guarded_display if display else guarded_from_zarr
    levels = [read(group[name], store)]
    pyramid = group.get(PREDICTION_LEVELS)
    stored = pyramid.get(name) if isinstance(pyramid, zarr.Group) else None
    if not isinstance(stored, zarr.Group) or not stored.attrs.get("complete"):
        return levels  # none, or being (re)written: the full array alone is always right
    k = 1
    while isinstance(stored.get(str(k)), zarr.Array):
        levels.append(read(stored[str(k)], store))
        k += 1
    return levels


def is_prediction_store(path: str | Path) -> bool:
    """Whether ``path`` is a ``napari-pvs predict`` output store (without reading any data)."""
    path = Path(path)
    if not path.is_dir():
        return False
    try:
        return _is_prediction_group(zarr.open(str(path), mode="r"))
    except Exception:  # not a zarr store at all: the caller's own opener reports why
        return False


def _open_zarr_dir(path: Path) -> Volume:
    node = _open_zarr(path)
    attrs = dict(node.attrs)
    ours = _ours(attrs)
    stored = ours.get("modality")
    modality = stored if stored not in (None, "unknown") else modality_from_name(path)
    if isinstance(node, zarr.Array):
        return _plain_array_volume(node, path, modality, ours)
    ome = _ome_attrs(attrs)
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
            label_names=_label_names(node),
            display=display,
        )
    arrays = [name for name, _ in node.arrays()]
    if len(arrays) == 1:
        return _plain_array_volume(node[arrays[0]], path, modality, ours)
    if _is_prediction_group(node):  # opens as its probability map
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
        else _diagonal_affine(spacing, (0.0, 0.0, 0.0))
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


def _diagonal_affine(spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.diag([float(s) for s in spacing])
    affine[:3, 3] = [float(o) for o in origin]
    return affine


def _transform(transforms: Sequence[Mapping], ndim: int) -> tuple[np.ndarray, np.ndarray]:
    scale, translation = np.ones(ndim), np.zeros(ndim)
    for t in transforms or ():
        if t.get("type") == "scale" and "scale" in t:
            scale = scale * np.asarray(t["scale"], dtype=np.float64)
        elif t.get("type") == "translation" and "translation" in t:
            translation = translation + np.asarray(t["translation"], dtype=np.float64)
    return scale, translation


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
    scale, translation = _transform(datasets[0].get("coordinateTransformations"), ndim)
    global_scale, global_translation = _transform(multiscale.get("coordinateTransformations"), ndim)
    scale, translation = scale * global_scale, translation * global_scale + global_translation
    unit_mm = np.array([_UNIT_TO_MM.get(a.get("unit"), 1.0) for a in axes_meta])
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
    return levels, display, spacing, _diagonal_affine(spacing, origin), axes


def _label_names(image_group: zarr.Group) -> tuple[str, ...]:
    try:
        labels = image_group["labels"]
    except KeyError:
        return ()
    if not isinstance(labels, zarr.Group):
        return ()
    names = _ome_attrs(dict(labels.attrs)).get("labels")
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


def open_labels(path: str | Path, name: str | None = None) -> Volume:
    """Open a label image lazily: OME-Zarr ``labels/NAME``, a zarr array/group, or NIfTI.

    For an OME-Zarr image with labels, ``name`` picks one (default: the only one, or ``pvs``).
    A ``napari-pvs predict`` store opens as its ``segmentation``. A path that points into the
    store (``image.zarr/labels/pvs``) also works. The returned :class:`Volume` has integer (or
    bool) ``data``; NaN/inf checks do not apply.
    """
    path = _check_path(path)
    if path.is_file():
        volume = open_volume(path, check_finite=False)
    else:
        node = _open_zarr(path)
        ome = _ome_attrs(dict(node.attrs))
        names = _label_names(node) if isinstance(node, zarr.Group) else ()
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
            image_volume = _open_zarr_dir(path)
            volume = _open_zarr_dir(path / "labels" / name)
            volume.affine = image_volume.affine
            volume.modality = image_volume.modality
        elif name is not None:
            raise ValueError(f"{path}: has no OME-Zarr labels, so there is no {name!r} to open")
        elif _is_prediction_group(node):  # its label image is the segmentation
            volume = _open_zarr_dir(path / "segmentation")
        else:
            volume = _open_zarr_dir(path)
    if np.issubdtype(volume.data.dtype, np.floating):
        raise ValueError(
            f"{path}: labels have float dtype {volume.data.dtype}; threshold or cast them to an "
            "integer type (e.g. uint8 0/1) first"
        )
    return volume


# --------------------------------------------------------------------------------------------
# writing


def _as_dask(array, chunks: int | Sequence[int]) -> da.Array:
    chunk_tuple = (chunks,) * 3 if isinstance(chunks, int) else tuple(chunks)
    if isinstance(array, da.Array):
        return array.rechunk(
            tuple(min(c, s) for c, s in zip(chunk_tuple, array.shape, strict=True))
        )
    return da.from_array(
        array, chunks=tuple(min(c, s) for c, s in zip(chunk_tuple, array.shape, strict=True))
    )


def _downsample_factors(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(2 if s >= 2 else 1 for s in shape)


def pyramid_shapes(shape: Sequence[int], levels: int) -> list[tuple[int, ...]]:
    """Shapes of a pyramid that halves every axis longer than 1 per level (floor)."""
    shapes = [tuple(int(s) for s in shape)]
    for _ in range(levels - 1):
        prev = shapes[-1]
        if all(s < 2 for s in prev):
            break
        shapes.append(tuple(s // f for s, f in zip(prev, _downsample_factors(prev), strict=True)))
    return shapes


def downsample(level: da.Array, chunks: tuple[int, ...], how: str) -> da.Array:
    """Halve every axis longer than 1 (floor), chunked ``chunks``.

    ``how``: ``"mean"`` block mean (images; integers rounded back), ``"stride"`` every other
    voxel (label images: values stay valid labels), ``"max"`` block maximum (display levels of
    sparse bright structures: a PVS one voxel wide survives every halving).
    """
    if how not in ("mean", "stride", "max"):
        raise ValueError(f"how must be 'mean', 'stride' or 'max', got {how!r}")
    factors = _downsample_factors(level.shape)
    even = tuple(slice(0, (s // f) * f) for s, f in zip(level.shape, factors, strict=True))
    level = level[even]
    if how == "stride":
        out = level[tuple(slice(None, None, f) for f in factors)]
    else:
        level = level.rechunk(
            tuple(min(c * f, s) for c, f, s in zip(chunks, factors, level.shape, strict=True))
        )
        if how == "max":
            out = da.coarsen(np.max, level, dict(enumerate(factors)))
        else:
            mean = da.coarsen(np.mean, level.astype(np.float32), dict(enumerate(factors)))
            if np.issubdtype(level.dtype, np.integer):
                info = np.iinfo(level.dtype)
                mean = da.clip(da.round(mean), info.min, info.max)
            out = mean.astype(level.dtype)
    return out.rechunk(tuple(min(c, s) for c, s in zip(chunks, out.shape, strict=True)))


def store_chunked(
    source: da.Array,
    target: zarr.Array,
    progress: ProgressCallback,
    cancel: CancelToken | None,
    done: list[int],
    total: int,
    message: str,
    batch: int = 8,
) -> None:
    """Write ``source`` into ``target`` a few chunks at a time, reporting progress.

    Each batch computes at most ``batch`` chunks (in parallel), so memory is bounded by the
    chunk size, not the volume. ``done`` is a one-element counter shared across calls.
    """
    source = source.rechunk(target.chunks)
    slices = list(da.core.slices_from_chunks(source.chunks))
    for start in range(0, len(slices), batch):
        check_cancelled(cancel)
        regions = slices[start : start + batch]
        da.store([source[r] for r in regions], [target] * len(regions), regions=regions, lock=False)
        done[0] += len(regions)
        progress(done[0], total, message)


def _axes_meta(axes: Sequence[str]) -> list[dict]:
    return [{"name": str(a), "type": "space", "unit": "millimeter"} for a in axes]


def _multiscales_meta(
    name: str,
    shapes: list[tuple[int, ...]],
    spacing: Sequence[float],
    origin: Sequence[float],
    axes: Sequence[str],
    version: str,
) -> dict:
    datasets = []
    for i, shape in enumerate(shapes):
        ratio = [s0 / s for s0, s in zip(shapes[0], shape, strict=True)]
        datasets.append(
            {
                "path": str(i),
                "coordinateTransformations": [
                    {
                        "type": "scale",
                        "scale": [float(sp * r) for sp, r in zip(spacing, ratio, strict=True)],
                    },
                    {
                        "type": "translation",
                        # level voxel centres sit at the centre of the voxels they average
                        "translation": [
                            float(o + sp * (r - 1) / 2)
                            for o, sp, r in zip(origin, spacing, ratio, strict=True)
                        ],
                    },
                ],
            }
        )
    meta = {"name": name, "axes": _axes_meta(axes), "datasets": datasets}
    if version == "0.4":
        meta["version"] = "0.4"
    return meta


def _set_ome_attrs(group: zarr.Group, ome: dict, version: str, extra: dict | None = None) -> None:
    attrs = dict(ome) if version == "0.4" else {"ome": {"version": version, **ome}}
    if extra:
        attrs.update(extra)
    group.attrs.update(attrs)


def _write_multiscale(
    group: zarr.Group,
    array: da.Array,
    chunks: tuple[int, ...],
    n_levels: int,
    is_label: bool,
    progress: ProgressCallback,
    cancel: CancelToken | None,
    counter: list[int],
    total: int,
    message: str,
) -> list[tuple[int, ...]]:
    """Write a pyramid into ``group/0, 1, ...``, each level computed from the stored one above."""
    shapes = pyramid_shapes(array.shape, n_levels)
    level = array
    for i, shape in enumerate(shapes):
        if i > 0:
            above = da.from_zarr(group[str(i - 1)])
            level = downsample(above, chunks, "stride" if is_label else "mean")
        assert tuple(level.shape) == shape
        target = group.create_array(
            str(i),
            shape=shape,
            chunks=tuple(min(c, s) for c, s in zip(chunks, shape, strict=True)),
            dtype=level.dtype,
            fill_value=0,
            overwrite=True,
            # OME-Zarr 0.4 requires "/" chunk keys in zarr v2 (0.5 uses the v3 default, "/")
            chunk_key_encoding={"name": "v2", "separator": "/"}
            if group.metadata.zarr_format == 2
            else {"name": "default", "separator": "/"},
        )
        # bytes in flight per output chunk: the chunk itself, or for a downsampled level the
        # 2x2x2 input chunks plus their float32 copy (about 3 x 8 chunk sizes)
        in_flight = int(np.prod(target.chunks)) * level.dtype.itemsize * (1 if i == 0 else 24)
        batch = int(min(32, max(2, WRITE_BATCH_BYTES // in_flight)))
        store_chunked(
            level, target, progress, cancel, counter, total, f"{message} level {i}", batch
        )
    return shapes


def _n_chunks(shape: Sequence[int], chunks: Sequence[int]) -> int:
    return int(np.prod([math.ceil(s / min(c, s)) for s, c in zip(shape, chunks, strict=True)]))


def _check_write_input(array, what: str) -> None:
    if getattr(array, "ndim", None) != 3:
        raise ValueError(
            f"{what} must be a 3D array; got shape {tuple(getattr(array, 'shape', ()))}"
        )
    _as_3d(array, what)


def _chunk_tuple(chunks: int | Sequence[int]) -> tuple[int, int, int]:
    chunk_tuple = (int(chunks),) * 3 if isinstance(chunks, int | np.integer) else tuple(chunks)
    if len(chunk_tuple) != 3 or any(c < 1 for c in chunk_tuple):
        raise ValueError(f"chunks must be a positive int or 3 positive ints, got {chunks!r}")
    return chunk_tuple


#: The label image that holds PVS labels (0/1, 255 = not labelled); its values are checked.
PVS_LABEL_NAME = "pvs"


def _check_pvs_labels(name: str, label) -> None:
    """PVS labels are validated where they are written (other label images are free-form)."""
    if name == PVS_LABEL_NAME:
        check_label_values(label, f"label {name!r}", warn_empty=False)


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
    if ome_version not in ("0.4", "0.5"):
        raise ValueError(f"ome_version must be '0.4' or '0.5', got {ome_version!r}")
    if levels < 1:
        raise ValueError(f"levels must be at least 1, got {levels}")
    _check_write_input(image, "image")
    spacing = check_spacing(spacing)
    if len(axes) != 3:
        raise ValueError(f"axes must name 3 axes, got {axes!r}")
    modality = normalize_modality(modality)
    chunk_tuple = _chunk_tuple(chunks)
    labels = dict(labels or {})
    for label_name, label in labels.items():
        check_label_name(label_name)
        _check_write_input(label, f"label {label_name!r}")
        if tuple(label.shape) != tuple(image.shape):
            raise ValueError(
                f"label {label_name!r} has shape {tuple(label.shape)} but the image has "
                f"{tuple(image.shape)}; labels must match the image voxel for voxel"
            )
    atomic.check_output(path, inputs=inputs, overwrite=overwrite, flag="overwrite=True")
    if path.exists() and not (_is_zarr_dir(path) or (path.is_dir() and not any(path.iterdir()))):
        raise FileExistsError(f"{path} exists and is not a zarr store; refusing to replace it")
    if affine is not None:
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    for label_name, label in labels.items():
        _check_pvs_labels(label_name, label)
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
        _set_ome_attrs(
            root,
            {"multiscales": [_multiscales_meta(name, shapes, spacing, origin, axes, ome_version)]},
            ome_version,
            {ATTRS_KEY: ours},
        )
        _write_multiscale(
            root, image_d, chunk_tuple, levels, False, progress, cancel, counter, total, "image"
        )
        if labels:
            labels_group = root.require_group("labels")
            _set_ome_attrs(labels_group, {"labels": list(labels)}, ome_version)
            for label_name, label in labels.items():
                _write_label_image(
                    labels_group.require_group(label_name),
                    label_name,
                    _as_dask(label, chunk_tuple),
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


def _check_label_name(name: str) -> None:
    check_label_name(name)


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
    _set_ome_attrs(
        group,
        {
            "multiscales": [_multiscales_meta(name, shapes, spacing, origin, axes, version)],
            "image-label": image_label,
        },
        version,
    )
    _write_multiscale(
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
        _check_pvs_labels(name, labels)
        return save_nifti(
            path, labels, affine if affine is not None else np.eye(4), overwrite=overwrite
        )
    check_label_name(name)
    _check_write_input(labels, f"label {name!r}")
    image = open_volume(_check_path(path), check_finite=False)
    if image.levels[0].ndim != 3 or len(image.levels) < 1:
        raise ValueError(f"{path}: not an OME-Zarr image")
    if tuple(labels.shape) != image.shape:
        raise ValueError(
            f"labels {name!r} have shape {tuple(labels.shape)} but the image in {path} has "
            f"{image.shape}; labels must match the image voxel for voxel"
        )
    root = zarr.open_group(str(path), mode="r")
    ome = _ome_attrs(dict(root.attrs))
    if "multiscales" not in ome:
        raise ValueError(f"{path}: not an OME-Zarr multiscale image; save it with save_ome_zarr")
    if name in image.label_names and not overwrite:
        raise FileExistsError(
            f"{path} already has a label image {name!r}; pass overwrite=True (or choose another "
            "name) to replace it"
        )
    _check_pvs_labels(name, labels)
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
    if _is_zarr_dir(labels_dir):
        # The new label image is complete before it replaces the old one (one swap), and the
        # lazy labels may read the very arrays being replaced: they are still there meanwhile.
        with atomic.atomic_output(labels_dir / name, overwrite=True, kind="dir") as temp:
            group = zarr.open_group(str(temp), mode="w", zarr_format=zarr_format)
            _write_label_image(group, name, label, *args, [0], total)
        listed = list(_ome_attrs(dict(zarr.open_group(str(labels_dir)).attrs)).get("labels", []))
        if name not in listed:  # zarr writes metadata by rename; make it durable too
            _set_ome_attrs(zarr.open_group(str(labels_dir), mode="r+"), {"labels": [*listed, name]},
                           version)  # fmt: skip
            atomic.fsync_files(_metadata_files(labels_dir))
            atomic.fsync_folder(labels_dir)
    else:
        with atomic.atomic_output(labels_dir, overwrite=True, kind="dir") as temp:
            group = zarr.open_group(str(temp), mode="w", zarr_format=zarr_format)
            _set_ome_attrs(group, {"labels": [name]}, version)
            _write_label_image(group.require_group(name), name, label, *args, [0], total)
    return path


def save_nifti(
    path: str | Path,
    array,
    affine: np.ndarray,
    *,
    dtype=None,
    overwrite: bool = False,
    inputs: Sequence[str | Path | None] = (),
) -> Path:
    """Write a 3D array as NIfTI-1 with the given affine (orientation and spacing kept).

    The array is written in its own voxel order, which must be the order the affine describes
    (NIfTI ``i, j, k``). Dask arrays are computed here: NIfTI is for moderate sizes; use
    OME-Zarr for volumes that do not fit in memory. Written to a temporary sibling, fsynced and
    renamed: a killed write never leaves a truncated file under ``path``; an existing ``path``
    is replaced only with ``overwrite``, never when it is one of ``inputs``.
    """
    import nibabel as nib

    path = Path(path)
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{path.name}: a NIfTI file name must end in .nii or .nii.gz")
    _check_write_input(array, "array")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    atomic.check_output(path, inputs=inputs, overwrite=overwrite, flag="overwrite=True")
    data = np.asarray(array.compute() if hasattr(array, "compute") else array)
    if dtype is not None:
        data = data.astype(dtype)
    elif data.dtype == np.bool_:
        data = data.astype(np.uint8)
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic.atomic_output(path, inputs=inputs, overwrite=overwrite, kind="file") as temp:
        nib.save(image, str(temp))  # the temporary name keeps the suffix: same format
    return path


def convert_to_ome_zarr(
    src: str | Path,
    dst: str | Path,
    *,
    levels: int = 3,
    chunks: int | Sequence[int] = DEFAULT_CHUNK,
    modality: str | None = None,
    ome_version: str = "0.4",
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> Path:
    """Convert a NIfTI (or any volume :func:`open_volume` reads) to a chunked OME-Zarr.

    Streams chunk by chunk, so memory stays bounded by a few chunks (plus, for ``.nii.gz``, one
    decompressed ``k`` slab). The voxel order stays the NIfTI's ``(i, j, k)`` and the full
    affine is kept, so labels predicted on the OME-Zarr map back onto the NIfTI exactly.
    Raises :class:`napari_pvs.progress.Cancelled` if cancelled. The output is built under a
    temporary name: a failed or cancelled conversion leaves nothing new, and an existing
    ``dst`` (replaced only with ``overwrite``) exactly as it was.
    """
    dst = Path(dst)
    atomic.check_output(dst, inputs=[src], overwrite=overwrite, flag="overwrite=True")
    volume = open_volume(src, modality=modality)
    return save_ome_zarr(
        dst,
        volume.data,
        volume.spacing,
        modality=volume.modality,
        levels=levels,
        chunks=chunks,
        axes=volume.axes,
        affine=volume.affine,
        name=Path(src).name,
        ome_version=ome_version,
        overwrite=overwrite,
        inputs=[src],
        progress=progress,
        cancel=cancel,
    )


def describe(volume: Volume) -> dict:
    """A JSON-able summary (shape, spacing, modality, levels, dtype) for the CLI and widgets."""
    return {
        "source": volume.source,
        "shape": list(volume.shape),
        "dtype": str(volume.data.dtype),
        "spacing_mm": [round(s, 6) for s in volume.spacing],
        "axes": list(volume.axes),
        "modality": volume.modality,
        "levels": [list(map(int, level.shape)) for level in volume.levels],
        "labels": list(volume.label_names),
    }

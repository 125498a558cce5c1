"""Damaged files: the one place that turns read errors into one sentence.

Opening a file and every lazy chunk read (dask computes chunks long after opening) share
:func:`damaged_file_error`; :class:`GuardedReads` carries the check with each read.
"""

from __future__ import annotations

import gzip
import json
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from napari_pvs.display import DisplayLevel


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


class GuardedReads:
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


def guarded_reader(array: zarr.Array, store: str | Path) -> GuardedReads:
    """Reads of a zarr array that name ``store`` and the array when a chunk is damaged."""
    part = f"a chunk of array {array.path}" if array.path else "a chunk"
    return GuardedReads(array, str(store), part)


def guarded_dask(reader: GuardedReads, chunks: Sequence[int]) -> da.Array:
    """A dask array over guarded reads, chunked ``chunks``, under a fresh unique name."""
    return da.from_array(
        reader,
        chunks=tuple(chunks),
        name=f"napari-pvs-zarr-{uuid.uuid4().hex}",
        meta=np.empty((0,) * reader.ndim, dtype=reader.dtype),
    )


def guarded_from_zarr(array: zarr.Array, store: str | Path) -> da.Array:
    """``da.from_zarr`` whose chunk reads name the store when a chunk is damaged."""
    return guarded_dask(guarded_reader(array, store), array.chunks)


def guarded_display(array: zarr.Array, store: str | Path) -> DisplayLevel:
    """A zarr array as napari should read it (direct reads, damaged chunks named), with its
    guarded dask array for computations (:meth:`DisplayLevel.to_dask`)."""
    reader = guarded_reader(array, store)
    return DisplayLevel(reader, lazy=guarded_dask(reader, array.chunks))

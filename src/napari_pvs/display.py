"""Arrays as napari reads them: lazy views that read their store once, when napari draws.

napari slices a layer in two steps (the displayed extent, then the current plane) and then
asks numpy for the values. Given a dask array, every store chunk the plane touches becomes a
task, and the decoded chunks stay in napari's dask cache (a quarter of the machine's memory by
default): at 1024^3 a plane of 48^3 chunks costs three times the read itself and hundreds of
MB. Given a zarr array, napari's first step would read the whole displayed extent, every plane
of it. A :class:`DisplayLevel` only composes indices until the values are asked for, then reads
its reader once (zarr decodes the touched chunks concurrently and keeps none of them).

Scrolling reads the next plane, which lies in the same chunks: every store chunk is decoded
whole, so a plane of 48^3 chunks costs as much as the 48 planes around it. A plane not in
memory is read alone (opening stays as fast as one read), and its whole slab (the drawn extent,
one chunk deep) is then read in a background thread and kept in a small shared cache
(:data:`SLAB_CACHE_BYTES`, least recently used out first): the planes after it are copies from
memory, and a plane asked for while its slab is on its way waits for that read rather than
decoding the same chunks again. Scrolling on, the next slab along the way is read ahead the
same way, so a chunk border is crossed without a stall (at 1024^3 a slab of three layers took
1.2 s on the GUI thread).

A multiscale layer's first plane is read on the GUI thread, in one event-loop turn, at the
level napari picks for the canvas: at 1024^3 on a 600-pixel canvas that is full resolution, a
plane that decodes 64 chunks of 128^3 or 484 of 48^3 (54-67 M voxels: 90-290 ms on a busy
core). :func:`first_level` names the finest level whose whole plane decodes at most
:data:`FIRST_PLANE_VOXELS` (32 M: 30-90 ms); the widgets show a layer at that level first and
let napari choose again once the user zooms.

Computations (prediction, ranking, saving) use :meth:`DisplayLevel.to_dask` or :func:`as_dask`,
which give the same values as a dask array chunked like the store.
"""

from __future__ import annotations

import contextlib
import operator
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import dask.array as da
import numpy as np

#: A view is materialised for an index napari's slicing never uses (arrays, ``None``) only up to
#: this size; a bigger one asks for the dask array instead of reading a whole level unasked.
MAX_FANCY_BYTES = 256 << 20
#: Decoded slabs kept for scrolling, all layers together; a slab bigger than this is never kept
#: (its planes are read one by one, as on first display).
SLAB_CACHE_BYTES = 192 << 20
#: Background slab reads that may wait at once (all layers together); more are not started.
MAX_READS_AHEAD = 8
#: The most voxels reading a layer's first plane (whole, at the level it is first shown) may
#: decode: about 30-90 ms on one busy core (see :func:`first_level`). Voxels, not bytes: the
#: time went with them (a uint8 plane of 54 M voxels took as long as a float16 one).
FIRST_PLANE_VOXELS = 32 << 20


class _SlabCache:
    """Decoded chunk slabs by (reader, slab key), least recently used evicted past a budget.

    Readers are held weakly: when a layer goes and its reader with it, so do its slabs (and
    its ``id`` can only be reused after that; a background read holds its reader until it
    ends). ``_last`` remembers, per reader and way (axis and drawn extent), the plane drawn
    before, so that scrolling (the next or previous plane) reads the next slab ahead. Slabs are
    read in one background thread, at most :data:`MAX_READS_AHEAD` waiting.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._slabs: OrderedDict[tuple[int, tuple], np.ndarray] = OrderedDict()
        self._last: dict[tuple, int] = {}
        self._watched: set[int] = set()
        self._bytes = 0
        self._lock = threading.RLock()
        #: background slab reads on their way, by (reader id, slab key)
        self._pending: dict[tuple[int, tuple], Future] = {}
        self._reader_thread: ThreadPoolExecutor | None = None
        #: set when the interpreter exits: no read is started any more
        self._closed = False

    def _watch(self, reader: Any) -> int:
        ident = id(reader)
        if ident not in self._watched:
            self._watched.add(ident)
            weakref.finalize(reader, self._forget, ident)
        return ident

    def _forget(self, ident: int) -> None:
        with self._lock:
            self._watched.discard(ident)
            for last in [k for k in self._last if k[0] == ident]:
                del self._last[last]
            for key in [k for k in self._slabs if k[0] == ident]:
                self._bytes -= self._slabs.pop(key).nbytes

    def get(self, reader: Any, key: tuple) -> np.ndarray | None:
        """The slab ``key`` of ``reader`` if it is in memory, or once its background read
        (already on its way) has finished; None otherwise (or when that read failed: the
        caller's own read then says why)."""
        with self._lock:
            pending = self._pending.get((id(reader), key))
        if pending is not None:
            try:
                pending.result()
            except Exception:  # the caller reads again and reports it
                return None
        with self._lock:
            slab = self._slabs.get((id(reader), key))
            if slab is not None:
                self._slabs.move_to_end((id(reader), key))
            return slab

    def read_ahead(self, reader: Any, key: tuple, index: tuple) -> Future | None:
        """Read ``reader[index]`` (slab ``key``) in the background thread and keep it, unless
        it is in memory already, or :data:`MAX_READS_AHEAD` reads wait. Returns the read on
        its way (this one or an earlier one), None when none is."""
        with self._lock:
            ident = self._watch(reader)
            if (ident, key) in self._pending:
                return self._pending[(ident, key)]
            if (ident, key) in self._slabs or self._closed:
                return None
            if len(self._pending) >= MAX_READS_AHEAD:
                return None
            if self._reader_thread is None:
                self._reader_thread = ThreadPoolExecutor(1, thread_name_prefix="napari-pvs-slabs")

            def read() -> None:
                try:
                    self.put(reader, key, np.asarray(reader[index]))
                finally:
                    with self._lock:
                        self._pending.pop((ident, key), None)

            future = self._pending[(ident, key)] = self._reader_thread.submit(read)
            return future

    def moved(self, reader: Any, way: tuple, plane: int) -> int:
        """Record that ``plane`` was drawn along ``way`` (the axis and the drawn extent); +1 or
        -1 when it is the next or the previous plane of the last one drawn that way (the user
        scrolls), else 0."""
        with self._lock:
            last_key = (self._watch(reader), way)
            last, self._last[last_key] = self._last.get(last_key), plane
        if last is None or abs(plane - last) != 1:
            return 0
        return plane - last

    def wait_idle(self) -> None:
        """Wait until every background read has finished (tests, and :meth:`clear`)."""
        while True:
            with self._lock:
                pending = list(self._pending.values())
            if not pending:
                return
            for future in pending:
                with contextlib.suppress(Exception):  # a failed read left nothing behind
                    future.result()

    def put(self, reader: Any, key: tuple, slab: np.ndarray) -> None:
        if slab.nbytes > self.budget:
            return
        with self._lock:
            ident = self._watch(reader)
            old = self._slabs.pop((ident, key), None)
            self._bytes += slab.nbytes - (old.nbytes if old is not None else 0)
            self._slabs[(ident, key)] = slab
            while self._bytes > self.budget:
                self._bytes -= self._slabs.popitem(last=False)[1].nbytes

    def close(self) -> None:
        """Start no more reads, drop those not started and let the one running finish:
        called as the interpreter exits, before the thread pools (zarr's included) stop
        taking work, so that a read in flight neither fails nor prints zarr's errors on the
        way out."""
        with self._lock:
            self._closed = True
            for key, future in list(self._pending.items()):
                if future.cancel():
                    del self._pending[key]
        self.wait_idle()

    def clear(self) -> None:
        self.wait_idle()
        with self._lock:
            self._slabs.clear()
            self._last.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes


#: The one cache every display view shares (see the module docstring).
slab_cache = _SlabCache(SLAB_CACHE_BYTES)
# Thread pools stop taking work in threading's exit hooks, run last-registered first: this one
# (registered after concurrent.futures') lets a slab read on its way finish before they stop.
getattr(threading, "_register_atexit", lambda hook: None)(slab_cache.close)


class DisplayLevel:
    """A lazy, read-only view of one pyramid level for napari (integer and slice indexing).

    ``reader`` returns numpy values for a basic index (a zarr array or a NIfTI memmap behind
    :mod:`napari_pvs.io`'s damaged-file guard); ``index`` selects the view of it shown (a
    squeezed channel axis); ``lazy`` is that view as a dask array chunked like the store, for
    computations (None: one is built from the reader on demand). ``dtype`` casts what is read
    (float16 predictions are drawn as float32: vispy has no float16 textures).
    """

    def __init__(
        self,
        reader: Any,
        lazy: da.Array | None = None,
        dtype: np.dtype | type | None = None,
        index: Sequence[int | slice] | None = None,
    ) -> None:
        self.reader = reader
        axes: tuple[int | range, ...] = tuple(range(int(n)) for n in reader.shape)
        if index is not None:
            axes = _compose(axes, _expand(index, len(axes)))
        self._set_view(axes, np.dtype(dtype if dtype is not None else reader.dtype), lazy)

    def _set_view(self, axes: tuple[int | range, ...], dtype: np.dtype, lazy) -> None:
        self._axes = axes
        self.shape = tuple(len(axis) for axis in axes if isinstance(axis, range))
        self.dtype = dtype
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.nbytes = self.size * dtype.itemsize
        if lazy is not None and tuple(lazy.shape) != self.shape:
            raise ValueError(f"lazy array of shape {lazy.shape} for a view of shape {self.shape}")
        self._lazy = lazy

    def _view(self, axes: tuple[int | range, ...], dtype: np.dtype, lazy=None) -> DisplayLevel:
        view = DisplayLevel.__new__(DisplayLevel)
        view.reader = self.reader
        view._set_view(axes, dtype, lazy)
        return view

    def __repr__(self) -> str:
        return f"DisplayLevel(shape={self.shape}, dtype={self.dtype})"

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d view")
        return self.shape[0]

    def __getitem__(self, key: Any) -> DisplayLevel | np.ndarray:
        try:
            expanded = _expand(key, self.ndim)
        except TypeError:  # arrays, None, booleans: not what napari's slicing sends
            if self.nbytes > MAX_FANCY_BYTES:
                raise TypeError(
                    f"a display view of {self.nbytes >> 20} MB takes only integer and slice "
                    "indices; index its to_dask() array instead"
                ) from None
            return np.asarray(self)[key]
        view = self._view(_compose(self._axes, expanded), self.dtype)
        if view.ndim == 0:  # a single voxel (napari's status bar): the value itself
            return np.asarray(view)[()]
        return view

    def _reader_key(self) -> tuple[tuple, list[int]]:
        """The reader's index of this view, and the view's axes it gives reversed."""
        key, flip, out_axis = [], [], 0
        for axis in self._axes:
            if isinstance(axis, int):
                key.append(axis)
                continue
            if axis.step < 0:  # stores read forward: read the same voxels, then reverse
                flip.append(out_axis)
                axis = axis[::-1]
            key.append(slice(axis.start, axis.start + len(axis) * axis.step, axis.step))
            out_axis += 1
        return tuple(key), flip

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        key, flip = self._reader_key()
        values = self._read(key)
        if flip:
            values = np.flip(values, axis=tuple(flip))
        values = values.astype(dtype or self.dtype, copy=False)
        return np.array(values, copy=True) if copy else values

    def _read(self, key: tuple) -> np.ndarray:
        """``reader[key]``; a plane of a chunked store through the slab cache."""
        slab = self._slab_of(key)
        if slab is None:
            return np.asarray(self.reader[key])
        axis, plane, start, stop, slab_key = slab
        cached = slab_cache.get(self.reader, slab_key)
        if cached is None:
            values = np.asarray(self.reader[key])  # the plane alone, now
            slab_cache.read_ahead(self.reader, slab_key, _along(key, axis, start, stop))
        else:
            position = sum(isinstance(k, slice) for k in key[:axis])  # the slab axis in it
            # an integer drops the axis, a one-long slice (napari's) keeps it
            which = plane - start if isinstance(key[axis], int) else [plane - start]
            values = np.take(cached, which, axis=position)
        step = slab_cache.moved(self.reader, (axis, slab_key[2]), plane)
        depth, edge = int(self.reader.chunks[axis]), int(self.reader.shape[axis])
        ahead = start + depth if step > 0 else start - depth
        if step and 0 <= ahead < edge:  # scrolling: the next slab along the way, meanwhile
            after = min(ahead + depth, edge)
            slab_cache.read_ahead(self.reader, (axis, ahead, slab_key[2]),
                                  _along(key, axis, ahead, after))  # fmt: skip
        return values

    def _slab_of(self, key: tuple) -> tuple[int, int, int, int, tuple] | None:
        """For a plane (one voxel deep along exactly one axis chunked deeper than 1, written
        as an integer or as napari's one-long slice): that axis, the plane, the chunk's bounds
        along the axis and the slab's cache key; None for anything else."""
        chunks = getattr(self.reader, "chunks", None)
        if not chunks or len(chunks) != len(key):
            return None
        shape = [int(n) for n in self.reader.shape]
        bounds = [
            k if isinstance(k, int) else k.indices(n) for k, n in zip(key, shape, strict=True)
        ]
        lengths = [1 if isinstance(b, int) else len(range(*b)) for b in bounds]
        thin = [i for i, n in enumerate(lengths) if n == 1 and int(chunks[i]) > 1]
        if len(thin) != 1 or sum(n > 1 for n in lengths) < 2:
            return None
        axis = thin[0]
        plane = bounds[axis] if isinstance(bounds[axis], int) else bounds[axis][0]
        depth = int(chunks[axis])
        start = plane // depth * depth
        stop = min(start + depth, shape[axis])
        voxels = (stop - start) * int(np.prod(lengths)) // lengths[axis]
        if voxels * np.dtype(self.reader.dtype).itemsize > slab_cache.budget:
            return None  # never kept: read plane by plane
        return axis, plane, start, stop, (axis, start, tuple(bounds[:axis] + bounds[axis + 1 :]))

    def astype(self, dtype: Any) -> DisplayLevel:
        """The same view, read as ``dtype``."""
        lazy = self._lazy.astype(dtype) if self._lazy is not None else None
        return self._view(self._axes, np.dtype(dtype), lazy)

    def with_lazy(self, lazy: da.Array) -> DisplayLevel:
        """The same view whose computations use ``lazy`` (the same values, e.g. checked)."""
        return self._view(self._axes, self.dtype, lazy)

    def to_dask(self) -> da.Array:
        """The same values as a dask array, for computations that go through every chunk."""
        if self._lazy is not None:
            return self._lazy
        meta = np.empty((0,) * self.ndim, self.dtype)
        return da.from_array(self, chunks="auto", asarray=True, meta=meta)


def prefetch_plane(level: Any, axis: int, plane: int) -> Future | None:
    """Start reading, in the slab cache's background thread, the slab that the whole plane
    ``plane`` of ``level`` along ``axis`` lies in, so that napari's first read of that plane
    on the GUI thread is a copy from memory. Returns the read on its way; None when there is
    nothing to wait for (not a display view, not read by slabs, or in memory already)."""
    if not isinstance(level, DisplayLevel) or not 0 <= plane < level.shape[axis]:
        return None
    view = level[tuple(plane if i == axis else slice(None) for i in range(level.ndim))]
    if not isinstance(view, DisplayLevel):
        return None
    key, _ = view._reader_key()
    slab = view._slab_of(key)
    if slab is None:
        return None
    along, _, start, stop, slab_key = slab
    return slab_cache.read_ahead(view.reader, slab_key, _along(key, along, start, stop))


def store_chunks(level: Any) -> tuple[int, ...] | None:
    """The edges of the chunks a read of ``level`` decodes whole (a display view's store
    chunks, a dask array's chunks); None for memory (numpy), which reads only what is asked."""
    if isinstance(level, DisplayLevel):
        chunks = getattr(level.reader, "chunks", None)
        if not chunks or len(chunks) != len(level._axes):
            return None
        return tuple(
            int(c) for c, axis in zip(chunks, level._axes, strict=True) if isinstance(axis, range)
        )
    if isinstance(level, da.Array):
        return tuple(int(c) for c in level.chunksize)
    return None


def plane_read_voxels(level: Any, axis: int) -> int:
    """Voxels decoded to read the whole plane of ``level`` one voxel deep along ``axis``:
    every chunk the plane touches, whole (the plane itself when nothing is chunked)."""
    shape = [int(n) for n in level.shape]
    chunks = store_chunks(level)
    voxels = 1
    for i, n in enumerate(shape):
        if chunks is None:
            voxels *= 1 if i == axis else n
        elif i == axis:
            voxels *= min(chunks[i], n)
        else:
            voxels *= -(-n // chunks[i]) * chunks[i]
    return voxels


def first_level(levels: Sequence[Any], axis: int, budget: int | None = None) -> int:
    """The finest of ``levels`` (finest first) whose whole plane along ``axis`` decodes at
    most ``budget`` voxels (default :data:`FIRST_PLANE_VOXELS`, read at each call); the
    coarsest when none does."""
    budget = FIRST_PLANE_VOXELS if budget is None else budget
    for index, level in enumerate(levels):
        if plane_read_voxels(level, axis) <= budget:
            return index
    return len(levels) - 1


def as_dask(data: Any) -> da.Array:
    """A layer's data (dask, :class:`DisplayLevel` or numpy) as a dask array."""
    if isinstance(data, da.Array):
        return data
    if isinstance(data, DisplayLevel):
        return data.to_dask()
    return da.asarray(data)


def _along(key: tuple, axis: int, start: int, stop: int) -> tuple:
    """``key`` with ``start:stop`` along ``axis``: the slab of a plane's index."""
    wide = list(key)
    wide[axis] = slice(start, stop)
    return tuple(wide)


def _expand(key: Any, ndim: int) -> tuple[int | slice, ...]:
    """A basic index as one int or slice per axis; TypeError for anything else."""
    parts = key if isinstance(key, tuple) else (key,)
    if sum(part is Ellipsis for part in parts) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    out: list[int | slice] = []
    for part in parts:
        if part is Ellipsis:
            out.extend([slice(None)] * (ndim - (len(parts) - 1)))
        elif isinstance(part, slice):
            out.append(part)
        elif isinstance(part, bool | np.bool_):
            raise TypeError("boolean index")
        else:
            out.append(operator.index(part))  # TypeError for arrays, None, floats
    if len(out) > ndim:
        raise IndexError(f"too many indices: {len(out)} for a {ndim}-d view")
    return (*out, *[slice(None)] * (ndim - len(out)))


def _compose(axes: tuple[int | range, ...], key: tuple[int | slice, ...]):
    kept = [i for i, axis in enumerate(axes) if isinstance(axis, range)]
    out = list(axes)
    for i, part in zip(kept, key, strict=True):
        out[i] = out[i][part]
    return tuple(out)

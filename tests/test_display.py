"""DisplayLevel: the lazy views napari is given, against numpy on the same indices."""

from __future__ import annotations

import gc
import threading

import dask.array as da
import numpy as np
import pytest
import zarr

from napari_pvs import display, io
from napari_pvs.display import (
    MAX_FANCY_BYTES,
    DisplayLevel,
    as_dask,
    first_level,
    plane_read_voxels,
    slab_cache,
)


@pytest.fixture(autouse=True)
def empty_slab_cache():
    slab_cache.clear()
    yield
    slab_cache.clear()


class CountingReader:
    """A numpy array that records every read (the key); ``chunks`` as a store would have."""

    def __init__(self, array: np.ndarray, chunks: tuple[int, ...] | None = None) -> None:
        self.array, self.shape, self.dtype = array, array.shape, array.dtype
        self.chunks = chunks
        self.reads: list[tuple] = []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.array[key]


def random_part(rng: np.random.Generator, n: int):
    kind = rng.integers(4)
    if kind == 0 and n > 0:
        return int(rng.integers(-n, n))
    start, stop = (int(v) if rng.random() < 0.8 else None for v in rng.integers(-n - 2, n + 2, 2))
    step = int(rng.choice([1, 1, 2, 3, -1, -2]))
    return slice(start, stop, step)


def random_key(rng: np.random.Generator, shape: tuple[int, ...]):
    parts = [random_part(rng, n) for n in shape]
    if rng.random() < 0.3 and len(parts) > 1:  # an Ellipsis in place of the trailing parts
        cut = int(rng.integers(0, len(parts)))
        return (*parts[:cut], Ellipsis)
    return tuple(parts)


def test_views_compose_like_numpy_and_read_only_what_is_drawn():
    rng = np.random.default_rng(0)
    array = rng.random((9, 11, 7)).astype(np.float16)
    for _ in range(400):
        reader = CountingReader(array)
        view, expected = DisplayLevel(reader), array
        for _ in range(int(rng.integers(1, 4))):  # napari indexes twice: extent, then plane
            if view.ndim == 0:
                break
            key = random_key(rng, view.shape)
            view, expected = view[key], expected[key]
            assert not reader.reads or np.ndim(view) == 0  # nothing read before values are asked
            if np.ndim(expected) == 0:
                break
            assert view.shape == expected.shape and view.ndim == expected.ndim
        np.testing.assert_array_equal(np.asarray(view), expected)
        assert len(reader.reads) == 1  # one store read per drawn view
        read = np.asarray(array[reader.reads[0]])
        assert read.size == np.asarray(expected).size  # and only the voxels shown


def test_napari_two_step_slice_reads_one_plane_of_the_store(tmp_path):
    data = np.arange(24 * 20 * 16, dtype=np.uint16).reshape(24, 20, 16)
    store = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=data.shape, chunks=(8, 8, 8),
                            dtype=data.dtype)  # fmt: skip
    store[...] = data
    view = io.guarded_display(store, tmp_path / "a.zarr")
    extent = view[:, 2:18, 0:16]  # napari: the displayed extent first (lazy) ...
    plane = np.asarray(extent[5])  # ... then the plane at the dims point
    np.testing.assert_array_equal(plane, data[5, 2:18, 0:16])
    np.testing.assert_array_equal(view.to_dask().compute(), data)  # computations: dask, same
    assert view.to_dask().chunks == ((8, 8, 8), (8, 8, 4), (8, 8))  # the store's chunks
    assert view[3, 4, 5] == data[3, 4, 5]  # a single voxel (the status bar) is its value


def test_astype_casts_reads_and_dask(tmp_path):
    data = np.linspace(0, 1, 4 * 5 * 6, dtype=np.float16).reshape(4, 5, 6)
    view = DisplayLevel(data, lazy=da.from_array(data, chunks=2)).astype(np.float32)
    assert view.dtype == np.float32 and np.asarray(view[1:3]).dtype == np.float32
    np.testing.assert_array_equal(np.asarray(view[1:3]), data[1:3].astype(np.float32))
    assert view.to_dask().dtype == np.float32
    np.testing.assert_array_equal(view.to_dask().compute(), data.astype(np.float32))


def test_as_dask_for_every_layer_data_kind():
    data = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    for layer_data in (data, da.from_array(data, chunks=2), DisplayLevel(data)[1:, ::2]):
        expected = data if not isinstance(layer_data, DisplayLevel) else data[1:, ::2]
        out = as_dask(layer_data)
        assert isinstance(out, da.Array)
        np.testing.assert_array_equal(out.compute(), expected)


def test_fancy_indices_read_small_views_and_refuse_large_ones():
    data = np.arange(60).reshape(3, 4, 5)
    view = DisplayLevel(data)
    np.testing.assert_array_equal(view[[0, 2]], data[[0, 2]])
    np.testing.assert_array_equal(view[data > 30], data[data > 30])
    with pytest.raises(IndexError):
        view[3]
    with pytest.raises(IndexError, match="too many indices"):
        view[0, 0, 0, 0]

    class Huge:
        shape, dtype = (4096, 4096, 4096), np.dtype(np.uint16)

    assert DisplayLevel(Huge()).nbytes > MAX_FANCY_BYTES
    with pytest.raises(TypeError, match="to_dask"):
        DisplayLevel(Huge())[[1, 2]]


def test_squeezed_channel_axis_and_opened_volumes_match_their_levels(tmp_path):
    image = np.random.default_rng(3).integers(0, 900, (1, 20, 24, 28)).astype(np.uint16)
    store = zarr.open_array(str(tmp_path / "c.zarr"), mode="w", shape=image.shape,
                            chunks=(1, 8, 8, 8), dtype=image.dtype)  # fmt: skip
    store[...] = image
    volume = io.open_volume(tmp_path / "c.zarr")
    (view,) = volume.display_levels()
    assert isinstance(view, DisplayLevel) and view.shape == (20, 24, 28)
    np.testing.assert_array_equal(np.asarray(view[:, 3]), image[0, :, 3])
    assert view.to_dask() is volume.data  # computations get the volume's own dask array

    pyramid = io.save_ome_zarr(tmp_path / "p.ome.zarr", image[0], levels=3, chunks=8)
    opened = io.open_volume(pyramid)
    assert len(opened.display) == 3
    for shown, level in zip(opened.display_levels(), opened.levels, strict=True):
        np.testing.assert_array_equal(np.asarray(shown[2]), level[2].compute())


def test_the_reader_gives_label_images_as_direct_views_too(tmp_path):
    """napari slices the reader's label images through direct store views, like its image
    (a dask label image ran dask's scheduler on the GUI thread at every plane)."""
    from napari_pvs._reader import volume_layer_data

    image = np.random.default_rng(4).integers(0, 900, (20, 24, 28)).astype(np.uint16)
    pvs = (image > 800).astype(np.uint8)
    store = io.save_ome_zarr(tmp_path / "l.ome.zarr", image, chunks=8, labels={"pvs": pvs})
    layers = volume_layer_data(io.open_volume(store))
    (labels,) = [data for data, _kwargs, kind in layers if kind == "labels"]
    assert len(labels) == 3 and all(isinstance(level, DisplayLevel) for level in labels)
    np.testing.assert_array_equal(np.asarray(labels[0][:, 5]), pvs[:, 5])


def test_a_damaged_chunk_is_named_when_napari_reads_it(tmp_path):
    store = io.save_ome_zarr(tmp_path / "d.ome.zarr", np.ones((16, 16, 16), np.uint16) * 7,
                             levels=1, chunks=8)  # fmt: skip
    chunk = next(p for p in sorted((store / "0").rglob("*")) if p.is_file() and "." not in p.name)
    chunk.write_bytes(b"x" * 40)
    (view,) = io.open_volume(store).display_levels()
    with pytest.raises(io.DamagedFileError, match=r"d\.ome\.zarr is damaged"):
        np.asarray(view[0])


def test_a_plane_is_read_alone_then_its_slab_and_the_next_one_in_the_background():
    data = np.random.default_rng(5).random((28, 30, 26)).astype(np.float16)
    reader = CountingReader(data, chunks=(8, 8, 8))
    view = DisplayLevel(reader).astype(np.float32)
    extent = (slice(None), slice(2, 28), slice(0, 26))  # napari: the drawn extent, then planes
    rows = (slice(2, 28, 1), slice(0, 26, 1))
    np.testing.assert_array_equal(np.asarray(view[extent][9]), data[9, 2:28].astype(np.float32))
    slab_cache.wait_idle()
    # the first look reads the plane alone, now; its slab (8..16) comes in the background
    assert reader.reads == [(9, *rows), (slice(8, 16), *rows)]
    for z in (10, 11, 12):  # scrolling on: planes from memory, the next slab read ahead
        np.testing.assert_array_equal(np.asarray(view[extent][z]), data[z, 2:28].astype(np.float32))
    slab_cache.wait_idle()
    assert reader.reads[2:] == [(slice(16, 24), *rows)]  # once, however many planes asked
    for z in range(13, 20):  # across the chunk border: no read on the way, the next ahead
        np.testing.assert_array_equal(np.asarray(view[extent][z]), data[z, 2:28].astype(np.float32))
    slab_cache.wait_idle()
    assert reader.reads[3:] == [(slice(24, 28), *rows)]  # the last slab, clipped at the edge
    for z in (27, 26, 25, 24, 23):  # and back: every plane from memory
        np.testing.assert_array_equal(np.asarray(view[extent][z]), data[z, 2:28].astype(np.float32))
    slab_cache.wait_idle()
    assert len(reader.reads) == 4
    # another view axis (a sagittal plane) is another way, with slabs of its own
    for x in (3, 4):
        np.testing.assert_array_equal(np.asarray(view[:, 1:20, x]), data[:, 1:20, x])
    slab_cache.wait_idle()
    assert reader.reads[4:] == [(slice(0, 28, 1), slice(1, 20, 1), 3),
                                (slice(0, 28, 1), slice(1, 20, 1), slice(0, 8)),
                                (slice(0, 28, 1), slice(1, 20, 1), slice(8, 16))]  # fmt: skip
    # napari asks for its plane as a one-long slice (the axis kept): the same cache serves it
    for z in (17, 18, 19):
        plane = np.asarray(view[extent][z : z + 1])
        np.testing.assert_array_equal(plane, data[z : z + 1, 2:28].astype(np.float32))
    # a jump (not the next plane): that plane's slab only, nothing read ahead
    slab_cache.clear()
    reader.reads.clear()
    np.asarray(view[extent][3])
    slab_cache.wait_idle()
    assert reader.reads == [(3, *rows), (slice(0, 8), *rows)]


def test_a_plane_asked_while_its_slab_is_on_its_way_waits_for_that_read():
    data = np.arange(16 * 8 * 8, dtype=np.float32).reshape(16, 8, 8)
    release = threading.Event()

    class SlowSlabs(CountingReader):
        def __getitem__(self, key):
            if isinstance(key[0], slice):
                release.wait(10)  # the background slab read is slow
            return super().__getitem__(key)

    reader = SlowSlabs(data, chunks=(8, 8, 8))
    view = DisplayLevel(reader)
    np.testing.assert_array_equal(np.asarray(view[2]), data[2])  # the slab now on its way
    threading.Timer(0.2, release.set).start()
    np.testing.assert_array_equal(np.asarray(view[5]), data[5])  # waits, reads nothing more
    assert reader.reads == [(2, slice(0, 8, 1), slice(0, 8, 1)),
                            (slice(0, 8), slice(0, 8, 1), slice(0, 8, 1))]  # fmt: skip


def test_slabs_over_the_budget_are_never_read_and_the_cache_stays_within_it(monkeypatch):
    data = np.arange(16 * 16 * 16, dtype=np.float32).reshape(16, 16, 16)
    monkeypatch.setattr(slab_cache, "budget", 3 * 8 * 16 * 16 * 4)  # three 8-deep slabs
    readers = [CountingReader(data, chunks=(8, 8, 8)) for _ in range(5)]
    for reader in readers:
        for z in (0, 1, 2):
            np.testing.assert_array_equal(np.asarray(DisplayLevel(reader)[z]), data[z])
    assert slab_cache.nbytes <= slab_cache.budget  # the oldest slabs went
    assert slab_cache.get(readers[0], (0, 0, ((0, 16, 1), (0, 16, 1)))) is None
    assert slab_cache.get(readers[-1], (0, 0, ((0, 16, 1), (0, 16, 1)))) is not None
    monkeypatch.setattr(slab_cache, "budget", 8 * 16 * 16 * 4 - 1)  # one slab is too big now
    big = CountingReader(data, chunks=(8, 8, 8))
    for z in (0, 1, 2):
        np.asarray(DisplayLevel(big)[z])
    assert all(isinstance(read[0], int) for read in big.reads)  # planes only, never the slab


def test_a_layer_that_goes_takes_its_slabs_with_it():
    data = np.ones((16, 16, 16), np.float32)
    reader = CountingReader(data, chunks=(8, 8, 8))
    view = DisplayLevel(reader)
    for z in (0, 1):
        np.asarray(view[z])
    assert slab_cache.nbytes == 8 * 16 * 16 * 4  # kept for scrolling
    del view, reader
    gc.collect()
    assert slab_cache.nbytes == 0  # the reader is gone, and its decoded slab with it


def test_plane_read_voxels_counts_every_whole_chunk_a_plane_touches(tmp_path):
    store = zarr.create_array(
        str(tmp_path / "a.zarr"), shape=(100, 70, 50), chunks=(48, 32, 16), dtype=np.uint16
    )
    level = DisplayLevel(store)
    # across z: one chunk deep (48), 3 x 4 chunks in-plane (96 x 64)
    assert plane_read_voxels(level, 0) == 48 * 96 * 64
    assert plane_read_voxels(level, 2) == 144 * 96 * 16  # 3 x 3 chunks (144 x 96) across x
    # a dask level decodes its own chunks; memory reads only the plane
    lazy = da.zeros((100, 70, 50), chunks=(10, 70, 50), dtype=np.uint8)
    assert plane_read_voxels(lazy, 0) == 10 * 70 * 50
    assert plane_read_voxels(np.zeros((100, 70, 50), np.float32), 1) == 100 * 50
    # a squeezed channel axis is not counted
    channels = zarr.create_array(
        str(tmp_path / "c.zarr"), shape=(1, 40, 30, 20), chunks=(1, 8, 30, 20), dtype=np.uint8
    )
    assert plane_read_voxels(DisplayLevel(channels, index=(0,)), 0) == 8 * 30 * 20


def test_first_level_is_the_finest_whose_plane_fits_the_budget(tmp_path, monkeypatch):
    stores = [
        zarr.create_array(
            str(tmp_path / f"{n}.zarr"), shape=(n,) * 3, chunks=(32,) * 3, dtype=np.uint16
        )
        for n in (256, 128, 64)
    ]
    levels = [DisplayLevel(store) for store in stores]
    costs = [plane_read_voxels(level, 0) for level in levels]
    assert costs == [32 * 256 * 256, 32 * 128 * 128, 32 * 64 * 64]
    assert first_level(levels, 0, budget=costs[0]) == 0
    assert first_level(levels, 0, budget=costs[0] - 1) == 1
    assert first_level(levels, 0, budget=costs[2]) == 2
    assert first_level(levels, 0, budget=1) == 2  # nothing fits: the coarsest
    monkeypatch.setattr(display, "FIRST_PLANE_VOXELS", costs[1])  # the default, read per call
    assert first_level(levels, 0) == 1


def test_close_drops_the_reads_not_started_and_lets_the_running_one_finish():
    """At exit (``close``, before the thread pools stop) the slab read on its way finishes,
    those still waiting are dropped and no new one starts."""
    cache = display._SlabCache(1 << 20)
    started, release = threading.Event(), threading.Event()

    class Slow(CountingReader):
        def __getitem__(self, key):
            started.set()
            release.wait(10)
            return super().__getitem__(key)

    reader = Slow(np.ones((16, 8, 8), np.float32), chunks=(8, 8, 8))
    cache.read_ahead(reader, ("first",), (slice(0, 8),))
    cache.read_ahead(reader, ("second",), (slice(8, 16),))
    assert started.wait(5)
    threading.Timer(0.2, release.set).start()
    cache.close()
    assert reader.reads == [(slice(0, 8),)]  # the second never read
    assert cache.get(reader, ("first",)) is not None and cache.get(reader, ("second",)) is None
    cache.read_ahead(reader, ("third",), (slice(0, 4),))
    cache.wait_idle()
    assert reader.reads == [(slice(0, 8),)]  # closed: nothing new starts


def test_prefetch_reads_a_whole_planes_slab_so_the_plane_comes_from_memory():
    data = np.random.default_rng(3).random((20, 12, 10)).astype(np.float32)
    reader = CountingReader(data, chunks=(8, 4, 4))
    view = DisplayLevel(reader)
    read = display.prefetch_plane(view, 0, 9)
    assert read is not None
    read.result()
    assert reader.reads == [(slice(8, 16), slice(0, 12, 1), slice(0, 10, 1))]
    assert display.prefetch_plane(view, 0, 10) is None  # the same slab, in memory already
    # napari's two-step read of that plane, and of another plane of the slab: no read at all
    np.testing.assert_array_equal(np.asarray(view[:, 0:12, 0:10][9]), data[9])
    np.testing.assert_array_equal(np.asarray(view[15]), data[15])
    assert len(reader.reads) == 1
    # along another axis, a plane outside the level, and memory: their own answers
    display.prefetch_plane(view, 2, 3).result()
    assert reader.reads[1] == (slice(0, 20, 1), slice(0, 12, 1), slice(0, 4))
    assert display.prefetch_plane(view, 0, 20) is None
    assert display.prefetch_plane(data, 0, 3) is None


def test_prefetch_of_a_slab_on_its_way_gives_that_read():
    data = np.zeros((16, 8, 8), np.float32)
    release = threading.Event()

    class SlowReader(CountingReader):
        def __getitem__(self, key):
            release.wait(10)
            return super().__getitem__(key)

    view = DisplayLevel(SlowReader(data, chunks=(8, 8, 8)))
    first = display.prefetch_plane(view, 0, 2)
    assert display.prefetch_plane(view, 0, 5) is first and not first.done()
    release.set()
    first.result()
    assert len(view.reader.reads) == 1

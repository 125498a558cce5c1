"""Chunk files written outside zarr's event loop are the files zarr writes, byte for byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

import tiny_models
from napari_pvs.inference import Predictor
from napari_pvs.inference.chunkfiles import ChunkFiles


def chunk_boxes(shape, chunks):
    grid = [range(-(-s // c)) for s, c in zip(shape, chunks, strict=True)]
    for index in np.ndindex(*(len(g) for g in grid)):
        yield (
            index,
            tuple(
                slice(i * c, min(s, (i + 1) * c))
                for i, c, s in zip(index, chunks, shape, strict=True)
            ),
        )


def stored_files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    }


@pytest.mark.parametrize(
    ("dtype", "compressors", "fill_value"),
    [
        ("float16", "auto", 0),  # the probability and uncertainty arrays
        ("uint8", "auto", 0),  # the segmentation
        ("uint8", None, 0),  # the done flags: uncompressed
        ("float32", ZstdCodec(level=5, checksum=True), 0),
        ("int16", None, -1),  # another fill value
    ],
)
def test_chunk_files_are_the_bytes_zarr_writes(tmp_path, dtype, compressors, fill_value):
    shape, chunks = (20, 17, 9), (8, 8, 8)  # edge chunks on every axis
    rng = np.random.default_rng(0)
    values = (rng.random(shape) * 50).astype(dtype)
    values[:8, :8, :8] = fill_value  # a chunk of only the fill value is not stored
    stores = {}
    for name in ("zarr", "ours"):
        stores[name] = zarr.create_array(
            str(tmp_path / name),
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            fill_value=fill_value,
            compressors=compressors,
        )
    files = ChunkFiles.of(stores["ours"])
    assert files is not None
    # a stale file of the all-fill chunk, as an earlier interrupted run could leave: removed
    files.write((0, 0, 0), np.ones(chunks, dtype))
    # values in another dtype are cast first: a chunk that is all fill only once cast is not
    # stored either (zarr compares after casting)
    if dtype == "float16":
        files.write((0, 1, 0), np.full(chunks, 1e-9))
        assert not files.path((0, 1, 0)).exists()
    for index, box in chunk_boxes(shape, chunks):
        stores["zarr"][box] = values[box]
        files.write(index, values[box])

    written = stored_files(tmp_path / "ours")
    assert written == stored_files(tmp_path / "zarr")
    assert "c/0/0/0" not in written and len(written) == 3 * 3 * 2 - 1
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "ours"))[...], values)


def test_arrays_zarr_must_write_are_left_to_it(tmp_path):
    def array(name, **options):
        return zarr.create_array(
            str(tmp_path / name), shape=(8, 8, 8), chunks=(4, 4, 4), dtype="float32", **options
        )

    assert ChunkFiles.of(array("plain")) is not None
    assert ChunkFiles.of(array("blosc", compressors=BloscCodec())) is None
    assert ChunkFiles.of(array("sharded", shards=(8, 8, 8))) is None
    assert ChunkFiles.of(array("nan", fill_value=np.nan)) is None
    in_memory = zarr.create_array(
        zarr.storage.MemoryStore(), shape=(8, 8, 8), chunks=(4, 4, 4), dtype="float32"
    )
    assert ChunkFiles.of(in_memory) is None
    with pytest.raises(ValueError, match="exceed the chunk"):
        ChunkFiles.of(array("small")).write((0, 0, 0), np.zeros((5, 4, 4), np.float32))


def test_prediction_through_zarr_writes_the_same_store(tmp_path, monkeypatch):
    """With every array left to zarr (as for a layout ChunkFiles does not write), a
    prediction's files are byte-identical to the direct writer's."""
    rng = np.random.default_rng(1)
    volume = rng.normal(100.0, 20.0, (30, 26, 22)).astype(np.float32)
    options = dict(window=16, overlap=0.25, chunks=12, device="cpu", mc_samples=2, lanes=1)
    Predictor(tiny_models.tiny_unet(dropout=0.5), **options).predict(volume, tmp_path / "direct")
    monkeypatch.setattr(ChunkFiles, "of", classmethod(lambda cls, array: None))
    Predictor(tiny_models.tiny_unet(dropout=0.5), **options).predict(volume, tmp_path / "zarr")
    direct, through_zarr = stored_files(tmp_path / "direct"), stored_files(tmp_path / "zarr")
    assert len(direct) > 40 and direct.keys() == through_zarr.keys()
    assert direct == through_zarr
    assert not [p for p in (tmp_path / "direct").rglob("*") if ".napari-pvs-tmp-" in p.name]

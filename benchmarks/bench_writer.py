"""Storing a prediction's chunks: through zarr's event loop, and as chunk files written directly.

The writer's work alone, as :class:`napari_pvs.inference.writer.ChunkWriter` does it for a 256^3
prediction (48^3 output chunks: a float16 probability and a uint8 segmentation per chunk,
stored in groups of 8, flushed, then a done flag per chunk), once through zarr (``setitem`` of
a whole group in one call into its event loop: ``ChunkWriter(direct=False)``) and once through
:class:`napari_pvs.inference.chunkfiles.ChunkFiles` (the default). The probability is a smooth
map with a little noise, so compression costs about what it does on a real prediction. Prints
wall and CPU seconds per store and the CPU ratio against zarr, measured in the same run, and
checks that both stores hold the same bytes. The CPU is what the network lanes lose to it.

Run: ``.venv/bin/python benchmarks/bench_writer.py [--size 256] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from napari_pvs.inference.store import DONE_ARRAY
from napari_pvs.inference.writer import ChunkWriter

CHUNK = 48


def prediction(size: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth probability map (float16) and its segmentation at 0.5."""
    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[:size, :size, :size]
    field = np.sin(z / 7.0) * np.cos(y / 5.0) * np.sin(x / 9.0) + rng.normal(0, 0.05, (size,) * 3)
    probability = (1 / (1 + np.exp(-(field - 0.6) * 12))).astype(np.float16)
    return probability, (probability >= 0.5).astype(np.uint8)


def new_store(root: Path, size: int) -> zarr.Group:
    shutil.rmtree(root, ignore_errors=True)
    group = zarr.open_group(str(root), mode="w")
    for name, dtype in (("probability", "float16"), ("segmentation", "uint8")):
        group.create_array(name, shape=(size,) * 3, chunks=(CHUNK,) * 3, dtype=dtype, fill_value=0)
    grid = -(-size // CHUNK)
    group.create_array(
        DONE_ARRAY, shape=(grid,) * 3, chunks=(1, 1, 1), dtype="uint8", compressors=None
    )
    return group


def store(root: Path, size: int, arrays: dict[str, np.ndarray], direct: bool) -> None:
    """Every chunk of ``arrays`` stored by the run's writer, as a prediction stores them."""
    group = new_store(root, size)
    writer = ChunkWriter(group, root, tuple(arrays), 0.5, None, direct=direct)
    grid = -(-size // CHUNK)
    for chunk in np.ndindex(grid, grid, grid):
        box = tuple(slice(c * CHUNK, min(size, (c + 1) * CHUNK)) for c in chunk)
        writer.add(chunk, box, {name: values[box] for name, values in arrays.items()})
    writer.mark_done()


def stored_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many per path")
    args = parser.parse_args()
    probability, segmentation = prediction(args.size)
    arrays = {"probability": probability, "segmentation": segmentation}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for direct in (False, True):
            label = "chunk files (ChunkFiles)" if direct else "zarr event loop (setitem)"
            best = (float("inf"), float("inf"))
            for _ in range(args.repeats):
                root = Path(tmp) / label.split()[0]
                cpu, start = os.times(), time.perf_counter()
                store(root, args.size, arrays, direct)
                wall, end = time.perf_counter() - start, os.times()
                best = min(best, (wall, end.user + end.system - cpu.user - cpu.system))
            results[label] = best
        same = stored_bytes(Path(tmp) / "zarr") == stored_bytes(Path(tmp) / "chunk")
    grid = -(-args.size // CHUNK)
    print(f"{args.size}^3, {grid**3} chunks of {CHUNK}^3 x 2 arrays + done flags, best of "
          f"{args.repeats}; same bytes in both stores: {'yes' if same else 'NO'}")  # fmt: skip
    reference = results["zarr event loop (setitem)"]
    print(f"{'path':28s} {'wall s':>7s} {'CPU s':>7s} {'CPU ratio':>9s}")
    for label, (wall, cpu) in results.items():
        print(f"{label:28s} {wall:7.2f} {cpu:7.2f} {cpu / reference[1]:9.2f}")


if __name__ == "__main__":
    main()

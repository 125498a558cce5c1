"""Time patch ranking of a 256^3 prediction store (goal: under 1 s), per strategy.

Writes a synthetic prediction store (float16 probability/entropy/mutual information, uint8
segmentation, 48^3 chunks as the inferer writes them) once, then times ``rank_patches`` for every
strategy, with and without an exclusion label store, against the time to read the maps it needs
(the floor for any reduction over zarr). Usage: python benchmarks/bench_ranking.py [--size 256]
"""

from __future__ import annotations

import os

# Busy-waiting OpenMP threads make torch 10-20x slower when the CPU is shared; passive waiting
# costs nothing on a quiet machine. Set before torch is imported; worker processes inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import time
from pathlib import Path

import numpy as np
import zarr

from napari_pvs.ranking import STRATEGIES, rank_patches


def make_store(path: Path, size: int) -> Path:
    if (path / "zarr.json").exists():
        return path
    rng = np.random.default_rng(0)
    shape = (size,) * 3
    probability = rng.beta(0.3, 3.0, shape).astype(np.float16)
    group = zarr.open_group(str(path), mode="w")
    chunks = (48, 48, 48)
    group.create_array("probability", data=probability, chunks=chunks)
    group.create_array("segmentation", data=(probability > 0.5).astype(np.uint8), chunks=chunks)
    p = probability.astype(np.float32).clip(1e-6, 1 - 1e-6)
    entropy = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    group.create_array("entropy", data=entropy.astype(np.float16), chunks=chunks)
    mi = (entropy * rng.uniform(0, 0.3, shape)).astype(np.float16)
    group.create_array("mutual_information", data=mi, chunks=chunks)
    labels = np.full(shape, 255, np.uint8)
    labels[: size // 4, : size // 4, : size // 4] = 0
    labels_path = str(path.with_name(path.name + "-labels.zarr"))
    zarr.create_array(labels_path, data=labels, chunks=chunks, overwrite=True)
    return path


def best_of(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--cache", default="/tmp/napari_pvs_bench")
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    store = make_store(cache / f"pred{args.size}.zarr", args.size)
    labels = zarr.open_array(str(store.with_name(store.name + "-labels.zarr")), mode="r")
    group = zarr.open_group(str(store), mode="r")

    read_floor = best_of(lambda: (group["entropy"][...], group["segmentation"][...]))
    rows = [("read entropy + segmentation (floor)", read_floor)]
    for strategy in STRATEGIES:
        seconds = best_of(lambda s=strategy: rank_patches(store, 20, strategy=s))
        rows.append((f"rank {strategy}, n=20, patch 32", seconds))
    rows.append(
        ("rank entropy, patch 32 stride 16, exclude labels",
         best_of(lambda: rank_patches(store, 20, stride=16, exclude=labels)))
    )  # fmt: skip
    width = max(len(name) for name, _ in rows)
    print(f"{args.size}^3 prediction store")
    print(f"{'measure':<{width}}  {'seconds':>8}  {'/ floor':>7}  {'< 1 s':>5}")
    for name, seconds in rows:
        ok = "yes" if seconds < 1 else "NO"
        print(f"{name:<{width}}  {seconds:>8.3f}  {seconds / read_floor:>7.2f}  {ok:>5}")


if __name__ == "__main__":
    main()

"""Error yield of every queue strategy for one start model, without training anything.

The labelling-efficiency benchmark (`napari-pvs benchmark active-learning`) prints the error
yield only of the strategies it trains, and training is what makes it slow. This script asks
the cheaper question alone: for the start model's predictions of the pool, how many of its
wrong voxels (and wrong clusters) lie in the first ``--per-round`` patches each strategy
queues, over random patches' share (:mod:`napari_pvs.error_yield`). It builds the start project
exactly as the benchmark does (tissue crop, the same project settings), ranks through the
same simulated annotator (volumes alternate, seeds ``0..S-1``) and prints one line per
strategy: the mean voxel yield over seeds, each seed's, and the cluster yield.

The last line is the ceiling: the **best possible** queue under the same rules (the same patch
grid, tissue share, non-overlap and spacing, and as many patches from each volume as the
alternation takes), found exactly (branch and bound) from the ground truth's wrong voxels, with
each strategy's voxel yield as a share of it. No strategy can pass it; a goal above it is
out of reach for any queue with these rules.

    python benchmarks/bench_error_yield.py --pool DATA/pool-1.zarr DATA/pool-2.zarr --out Y
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from napari_pvs.benchmark.annotator import SimulatedAnnotator
from napari_pvs.benchmark.cases import load_case
from napari_pvs.benchmark.config import StrategySpec
from napari_pvs.error_yield import pooled_error_yield
from napari_pvs.project import Project
from napari_pvs.ranking import STRATEGIES


def start_project(pool, folder: Path, model: str, mc: int, patch: int) -> Project:
    """The benchmark's start project: the model, the pool volumes, their predictions."""
    project = Project.create(folder, model=model)
    project.update_settings(predict_tta=1, predict_mc=mc, patch=patch, device="cpu")
    for case in pool:
        project.add_volume(case.path, modality=case.modality, name=case.name)
    for vid in range(1, len(pool) + 1):
        project.predict(vid)
    return project


def strategy_yield(project, annotator, pool, spec: StrategySpec, n: int, seed: int):
    """Voxel and cluster error yield of the ``n`` patches ``spec`` queues first (round 1)."""
    import zarr

    records, _ = annotator.pick(project, spec, n, seed, 1)
    volumes = []
    for vid, case in enumerate(pool, start=1):
        store = zarr.open_group(str(project.predict(vid)), mode="r")
        boxes = [(r.start, r.stop) for r in records if r.volume_id == vid]
        volumes.append((np.asarray(store["segmentation"][:]), case.truth, boxes))
    result = pooled_error_yield(volumes)
    return result.voxel_yield, result.cluster_yield


def best_boxes(errors: np.ndarray, eligible: np.ndarray, grid, k: int, min_distance: float):
    """The ``k`` eligible grid patches holding the most wrong voxels together, none
    overlapping and their centres ``min_distance`` apart (the ranking's rules), by branch and
    bound over the patches in decreasing order of their wrong voxels."""
    from napari_pvs.ranking import _overlaps

    order = sorted((tuple(int(v) for v in i) for i in np.argwhere(eligible)),
                   key=lambda i: -errors[i])  # fmt: skip
    values = [float(errors[i]) for i in order]
    boxes = [grid.box(i) for i in order]
    centres = [(a + b) / 2 for a, b in boxes]
    best: list = [-1.0, []]

    def fits(i: int, chosen: list[int]) -> bool:
        return all(not _overlaps(*boxes[i], *boxes[j])
                   and np.linalg.norm(centres[i] - centres[j]) >= min_distance
                   for j in chosen)  # fmt: skip

    def search(start: int, chosen: list[int], total: float) -> None:
        if len(chosen) == k or start == len(order):
            if total > best[0]:
                best[:] = [total, list(chosen)]
            return
        for i in range(start, len(order)):
            if total + sum(values[i : i + k - len(chosen)]) <= best[0]:
                return  # even the next best patches cannot beat what is found
            if fits(i, chosen):
                search(i + 1, [*chosen, i], total + values[i])

    search(0, [], 0.0)
    return [boxes[i] for i in best[1]]


def best_possible_yield(project, pool, per_round: int, patch: int) -> tuple[float, float]:
    """Voxel and cluster yield of the best possible first queue (see the module docstring)."""
    import zarr

    from napari_pvs.ranking import (
        DEFAULT_MIN_DISTANCE,
        DEFAULT_MIN_TISSUE,
        PatchGrid,
        _eligible_patches,
    )  # fmt: skip

    counts = [per_round // len(pool) + (i < per_round % len(pool)) for i in range(len(pool))]
    volumes = []
    for vid, (case, k) in enumerate(zip(pool, counts, strict=True), start=1):
        segmentation = np.asarray(zarr.open_group(str(project.predict(vid)), mode="r")
                                  ["segmentation"][:])  # fmt: skip
        wrong = ((segmentation > 0) != (case.truth == 1)) & (case.truth != 255)
        grid = PatchGrid(case.truth.shape, patch, patch)
        eligible = _eligible_patches(grid, case.truth.shape, None, 255, project.open_volume(vid),
                                     DEFAULT_MIN_TISSUE, ())  # fmt: skip
        boxes = best_boxes(grid.reduce(wrong.astype(np.float32)), eligible, grid, k,
                           DEFAULT_MIN_DISTANCE * patch)  # fmt: skip
        volumes.append((segmentation, case.truth, boxes))
    result = pooled_error_yield(volumes)
    return result.voxel_yield, result.cluster_yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", nargs="+", required=True, help="pool OME-Zarr images")
    parser.add_argument("--out", required=True, help="new folder for the start project")
    parser.add_argument("--model", default="default", help="start model (default: bundled)")
    parser.add_argument("--strategies", default=",".join(s for s in STRATEGIES if s != "default"))
    parser.add_argument("--per-round", type=int, default=8, help="patches queued (default 8)")
    parser.add_argument("--patch", type=int, default=32, help="patch edge (default 32)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 (default 3)")
    parser.add_argument("--mc", type=int, default=8, help="MC passes of predictions (BALD)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    pool = [
        load_case(path, path, name=f"pool-{i}", write_to=out / "data" / f"pool-{i}.zarr")
        for i, path in enumerate(args.pool, start=1)
    ]
    started = time.perf_counter()
    project = start_project(pool, out / "project", args.model, args.mc, args.patch)
    print(f"start project and predictions: {time.perf_counter() - started:.0f} s")
    annotator = SimulatedAnnotator(pool, args.patch)
    print(f"{'strategy':12s} voxel yield (per seed)          cluster yield")
    means = {}
    with project:
        for name in args.strategies.split(","):
            spec = StrategySpec(name)
            yields = [
                strategy_yield(project, annotator, pool, spec, args.per_round, seed)
                for seed in range(args.seeds)
            ]
            voxel = [y[0] for y in yields]
            cluster = [y[1] for y in yields]
            seeds = ", ".join(f"{v:.2f}" for v in voxel)
            print(
                f"{name:12s} {np.mean(voxel):.2f} ({seeds})   {np.mean(cluster):.2f}", flush=True
            )
            means[name] = float(np.mean(voxel))
        voxel, cluster = best_possible_yield(project, pool, args.per_round, args.patch)
        print(f"{'best possible':12s} {voxel:.2f} (ground truth, the same rules)   {cluster:.2f}")
        shares = ", ".join(f"{name} {value / voxel:.2f}" for name, value in means.items())
        print(f"share of the best possible voxel yield: {shares}")


if __name__ == "__main__":
    main()

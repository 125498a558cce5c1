"""Error yield of every queue strategy for one start model, without training anything.

The labelling-efficiency benchmark (`napari-pvs benchmark active-learning`) prints the error
yield only of the strategies it trains, and training is what makes it slow. This script asks
the cheaper question alone: for the start model's predictions of the pool, how many of its
wrong voxels (and wrong clusters) lie in the first ``--per-round`` patches each strategy
queues, over random patches' share (:mod:`napari_pvs.error_yield`). It builds the start project
exactly as the benchmark does (tissue crop, the same project settings), ranks through the
same simulated annotator (volumes alternate, seeds ``0..S-1``) and prints one line per
strategy: the mean voxel yield over seeds, each seed's, and the cluster yield.

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


if __name__ == "__main__":
    main()

"""Cluster precision of a project's model versions at the start version's recall.

    python benchmarks/precision_at_recall.py PROJECT --test-images T.zarr [T2.zarr ...]
        [--versions 1,2,3,4,5] [--start 1] [--tta 1] [--threads 1]

A model can raise its cluster precision by predicting less, moving along its precision-recall
curve. This scores each version of a project (for instance one that ``napari-pvs benchmark
active-learning`` left in ``OUT/projects/<strategy>-seed<N>``) with the benchmark's own score:
the product's segmentation rule, and the threshold swept 0.1-0.9 with the rule's smallest
cluster kept. It prints per version the Dice and the cluster precision and recall at the rule,
and the best cluster precision whose recall is at most 0.02 below the start version's ("none"
when no threshold reaches it). Test images are OME-Zarr with ``labels/pvs`` (as
``benchmark make-data`` writes them), cropped to the tissue box as the benchmark crops them.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_default.py

import argparse
from pathlib import Path

import torch

from napari_pvs.benchmark.cases import load_case
from napari_pvs.benchmark.scoring import (
    RECALL_TOLERANCE,
    SWEEP_THRESHOLDS,
    precision_at_recall,
    score,
)
from napari_pvs.project import Project


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--test-images", nargs="+", required=True, type=Path)
    parser.add_argument("--versions", help="comma-separated (default: every version after 0)")
    parser.add_argument("--start", type=int, default=1, help="the version whose recall to match")
    parser.add_argument("--tta", type=int, default=1, help="mirrorings (the benchmark's default)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cases = [
        load_case(path, path, name=path.stem, regions_path=regions if regions.exists() else None)
        for path in args.test_images
        for regions in [path / "labels" / "regions"]
    ]
    with Project.open(args.project, readonly=True) as project:
        known = [v.version for v in project.versions()]
        wanted = (
            [int(v) for v in args.versions.split(",")]
            if args.versions
            else [v for v in known if v > 0]
        )
        scored = sorted({*wanted, args.start})
        missing = sorted(set(scored) - set(known))
        if missing:
            raise SystemExit(f"{args.project} has no version {missing}; it has {known}")
        scores = {}
        for version in scored:
            model, _ = project.load_model(version, device="cpu")
            scores[version] = score(model, cases, args.tta, "cpu")
    start_recall = scores[args.start]["cluster_recall"]
    print(
        f"{args.project}: test {', '.join(c.name for c in cases)}, {args.tta} mirroring(s); "
        f"start v{args.start} recall {start_recall:.3f}"
    )
    print(f"{'version':>8}{'Dice':>8}{'precision':>11}{'recall':>8}{'at start recall':>17}")
    for version in wanted:
        metrics = scores[version]
        matched = precision_at_recall(metrics, start_recall)
        print(
            f"{version:>8}{metrics['dice']:>8.3f}{metrics['cluster_precision']:>11.3f}"
            f"{metrics['cluster_recall']:>8.3f}"
            f"{'none' if matched is None else f'{matched:.3f}':>17}"
        )
    print(f"(at start recall: the best precision whose recall is at least "
          f"{start_recall - RECALL_TOLERANCE:.3f}, threshold swept "
          f"{SWEEP_THRESHOLDS[0]:g}-{SWEEP_THRESHOLDS[-1]:g})")  # fmt: skip


if __name__ == "__main__":
    main()

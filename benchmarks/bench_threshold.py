"""Test Dice of checkpoints with their segmentation rule and with bare probability thresholds.

A version's test Dice mixes what the model learned with the rule that turns probability into
PVS (threshold, then clusters under the checkpoint's smallest size removed), and rounds keep
the start model's rule. This script separates the two on one test image: for each checkpoint
it prints the Dice of the rule's segmentation, of ``p >= t`` for several ``t``, and the
predicted / true voxel ratio (below 1: the model under-segments).

    python benchmarks/bench_threshold.py --test DATA/test-1.zarr B3/projects/*/models/v1.safetensors
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    import zarr

    from napari_pvs.benchmark.cases import load_case
    from napari_pvs.inference import Predictor
    from napari_pvs.io import Volume
    from napari_pvs.models.checkpoint import load_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="safetensors checkpoints")
    parser.add_argument("--test", required=True, help="test OME-Zarr image with labels/pvs")
    parser.add_argument("--thresholds", default="0.2,0.3,0.4,0.5,0.6")
    args = parser.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    case = load_case(args.test, args.test, name="test")  # cropped to the tissue, as scored
    truth = case.truth
    volume = Volume(case.image, case.spacing, case.affine, modality=case.modality)

    def dice(mask: np.ndarray) -> float:
        return 2 * float((mask & truth).sum()) / float(mask.sum() + truth.sum())

    print("checkpoint | rule | " + " | ".join(f"p >= {t:g}" for t in thresholds) + " | pred/true")
    for path in args.checkpoints:
        model, _ = load_checkpoint(path)
        with tempfile.TemporaryDirectory(prefix="napari-pvs-threshold-") as tmp:
            out = Path(tmp) / "prediction.zarr"
            Predictor(model, modality=case.modality, tta=1, device="cpu").predict(volume, out)
            store = zarr.open_group(str(out), mode="r")
            probability = np.asarray(store["probability"][:])
            rule = np.asarray(store["segmentation"][:]) > 0
        bare = " | ".join(f"{dice(probability >= t):.3f}" for t in thresholds)
        ratio = rule.sum() / truth.sum()
        print(f"{path} | {dice(rule):.3f} | {bare} | {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()

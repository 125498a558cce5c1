"""Frangi baseline accuracy on fresh phantoms: the number every learned model has to beat.

For each contrast, the vesselness threshold is tuned (best voxel Dice) on a separate procedural
phantom (seed 1000), then frozen and applied to fresh phantoms (seeds 2000, 2001, ...) of both
anatomies (procedural and MNI152). Segmentation is restricted to white matter + basal ganglia
(the ground-truth region map), as is usual for PVS. Reported: voxel Dice and cluster F1
(26-connectivity, one-to-one greedy matching), mean +- sd over the fresh phantoms, per contrast
and anatomy, plus the PVS count error. The reference row, measured in the same run, is the
trivial "predict the whole WM+BG mask" segmenter's Dice (what thresholding nothing buys).

Usage: python benchmarks/bench_frangi.py [--shape 160 192 160] [--spacing 1.0] [--fresh 2]
       [--no-mni]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from napari_pvs.metrics import evaluate
from napari_pvs.models.frangi import (
    DEFAULT_SIGMAS_MM,
    frangi_segment,
    tune_threshold,
    white_matter_mask,
)
from napari_pvs.phantom import make_phantom

TUNE_SEED = 1000
FRESH_SEED = 2000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 192, 160])
    parser.add_argument("--spacing", type=float, default=1.0)
    parser.add_argument("--fresh", type=int, default=2, help="fresh phantoms per row")
    parser.add_argument("--severity", type=float, default=0.5)
    parser.add_argument("--no-mni", action="store_true", help="procedural anatomy only")
    args = parser.parse_args()
    shape, spacing = tuple(args.shape), args.spacing
    anatomies = ["procedural"] if args.no_mni else ["procedural", "mni"]

    rows = []
    for modality in ("T2", "T1"):
        tune = make_phantom(shape, spacing, modality, seed=TUNE_SEED, severity=args.severity)
        threshold, _ = tune_threshold(
            tune.image,
            tune.pvs,
            tune.spacing,
            modality,
            sigmas=DEFAULT_SIGMAS_MM,
            mask=white_matter_mask(tune.regions),
        )
        for anatomy in anatomies:
            dice, f1, count_err, trivial, seconds = [], [], [], [], []
            for k in range(args.fresh):
                p = make_phantom(
                    shape,
                    spacing,
                    modality,
                    seed=FRESH_SEED + k,
                    severity=args.severity,
                    anatomy=anatomy,
                )
                mask = white_matter_mask(p.regions)
                start = time.perf_counter()
                seg = frangi_segment(p.image, p.spacing, modality, threshold=threshold, mask=mask)
                seconds.append(time.perf_counter() - start)
                result = evaluate(seg, p.pvs, spacing=p.spacing)
                dice.append(result["dice"])
                f1.append(result["cluster"]["f1"])
                count_err.append(result["count"]["abs_diff"] / max(result["count"]["gt"], 1))
                trivial.append(evaluate(mask, p.pvs)["dice"])
            rows.append((modality, anatomy, threshold, dice, f1, count_err, trivial, seconds))

    header = (
        f"{'contrast':<9}{'anatomy':<12}{'threshold':>10}{'Dice':>15}{'cluster F1':>15}"
        f"{'count err':>11}{'ref Dice':>10}{'x ref':>7}{'s/vol':>7}"
    )
    print(
        f"Frangi baseline, {'x'.join(map(str, shape))} at {spacing} mm, severity "
        f"{args.severity}, sigmas {DEFAULT_SIGMAS_MM} mm, restricted to WM+BG"
    )
    print(header)
    print("-" * len(header))
    for modality, anatomy, threshold, dice, f1, count_err, trivial, seconds in rows:
        print(
            f"{modality:<9}{anatomy:<12}{threshold:>10.3f}"
            f"{np.mean(dice):>9.3f} +-{np.std(dice):.2f}{np.mean(f1):>9.3f} +-{np.std(f1):.2f}"
            f"{np.mean(count_err):>10.0%}{np.mean(trivial):>10.3f}"
            f"{np.mean(dice) / max(np.mean(trivial), 1e-9):>7.0f}{np.mean(seconds):>7.1f}"
        )
    print(
        f"threshold tuned on seed {TUNE_SEED} (procedural) per contrast; fresh seeds "
        f"{FRESH_SEED}..{FRESH_SEED + args.fresh - 1}; count err = |n_pred - n_gt| / n_gt; "
        "ref Dice = predicting all of WM+BG"
    )


if __name__ == "__main__":
    main()

"""Frangi baseline accuracy on fresh phantoms: the number every learned model has to beat.

For each contrast, the vesselness threshold is tuned (best voxel Dice) on a separate procedural
phantom (seed 1000), then frozen and applied to fresh phantoms (seeds 2000, 2001, ...) of both
anatomies (procedural and MNI152). Segmentation is restricted to white matter + basal ganglia
(the ground-truth region map), as is usual for PVS. Reported: voxel Dice and cluster F1
(26-connectivity, one-to-one greedy matching), mean +- sd over the fresh phantoms, per contrast
and anatomy, plus the PVS count error. The reference row, measured in the same run, is the
trivial "predict the whole WM+BG mask" segmenter's Dice (what thresholding nothing buys).

With ``--skimage``, a second table compares scikit-image's own ``filters.frangi`` (sigmas
converted to voxels, default gamma) tuned the same way on the same tuning phantom, with the same
WM+BG restriction, on the same fresh phantoms. It is opt-in because scikit-image filters the
whole box (several times slower than ours, which filters only masked voxels); it runs on the mask's
bounding box plus the kernel support, which leaves every voxel inside the mask unchanged.

Usage: python benchmarks/bench_frangi.py [--shape 160 192 160] [--spacing 1.0] [--fresh 2]
       [--no-mni] [--skimage]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from napari_pvs.metrics import evaluate
from napari_pvs.models.frangi import (
    DEFAULT_SIGMAS_MM,
    TRUNCATE,
    best_threshold,
    frangi_segment,
    tune_threshold,
    white_matter_mask,
)
from napari_pvs.phantom import make_phantom

TUNE_SEED = 1000
FRESH_SEED = 2000


def skimage_frangi(image: np.ndarray, mask: np.ndarray, spacing: float, modality: str):
    """scikit-image's ``frangi`` (sigmas in voxels), zero outside ``mask``, on the mask's box."""
    from skimage.filters import frangi

    sigmas_vox = [s / spacing for s in DEFAULT_SIGMAS_MM]
    margin = int(np.ceil(TRUNCATE * max(sigmas_vox))) + 2
    where = np.argwhere(mask)
    box = tuple(
        slice(max(lo - margin, 0), min(hi + margin + 1, n))
        for lo, hi, n in zip(where.min(0), where.max(0), mask.shape, strict=True)
    )
    out = np.zeros(image.shape, np.float32)
    out[box] = frangi(image[box], sigmas=sigmas_vox, black_ridges=modality == "T1")
    out[~mask] = 0.0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 192, 160])
    parser.add_argument("--spacing", type=float, default=1.0)
    parser.add_argument("--fresh", type=int, default=2, help="fresh phantoms per row")
    parser.add_argument("--severity", type=float, default=0.5)
    parser.add_argument("--no-mni", action="store_true", help="procedural anatomy only")
    parser.add_argument(
        "--skimage", action="store_true", help="also compare skimage.filters.frangi (slow)"
    )
    args = parser.parse_args()
    shape, spacing = tuple(args.shape), args.spacing
    anatomies = ["procedural"] if args.no_mni else ["procedural", "mni"]

    rows, sk_rows = [], []
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
        if args.skimage:
            tune_mask = white_matter_mask(tune.regions)
            sk_threshold, _ = best_threshold(
                skimage_frangi(tune.image, tune_mask, spacing, modality), tune.pvs, tune.spacing
            )
        for anatomy in anatomies:
            sk_dice, sk_f1, sk_seconds = [], [], []
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
                if args.skimage:
                    start = time.perf_counter()
                    sk_seg = skimage_frangi(p.image, mask, spacing, modality) >= sk_threshold
                    sk_seconds.append(time.perf_counter() - start)
                    sk_result = evaluate(sk_seg, p.pvs, spacing=p.spacing)
                    sk_dice.append(sk_result["dice"])
                    sk_f1.append(sk_result["cluster"]["f1"])
            rows.append((modality, anatomy, threshold, dice, f1, count_err, trivial, seconds))
            if args.skimage:
                ours = (threshold, dice, f1, seconds)
                sk_rows.append((modality, anatomy, *ours, sk_threshold, sk_dice, sk_f1, sk_seconds))

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
    if sk_rows:
        print_skimage_table(sk_rows)


def print_skimage_table(sk_rows: list[tuple]) -> None:
    """Ours vs skimage.filters.frangi, both tuned on the same phantom, on the same fresh ones."""
    header = (
        f"{'contrast':<9}{'anatomy':<12}{'thr ours':>9}{'thr sk':>8}{'Dice ours':>11}"
        f"{'Dice sk':>9}{'F1 ours':>9}{'F1 sk':>8}{'s ours':>8}{'s sk':>7}{'sk/ours':>9}"
    )
    print("\nOurs vs skimage.filters.frangi (sigmas in voxels, default gamma), same phantoms")
    print(header)
    print("-" * len(header))
    for modality, anatomy, thr, dice, f1, sec, sk_thr, sk_dice, sk_f1, sk_sec in sk_rows:
        print(
            f"{modality:<9}{anatomy:<12}{thr:>9.3f}{sk_thr:>8.3f}{np.mean(dice):>11.3f}"
            f"{np.mean(sk_dice):>9.3f}{np.mean(f1):>9.3f}{np.mean(sk_f1):>8.3f}"
            f"{np.mean(sec):>8.1f}{np.mean(sk_sec):>7.1f}"
            f"{np.mean(sk_sec) / max(np.mean(sec), 1e-9):>9.1f}"
        )


if __name__ == "__main__":
    main()

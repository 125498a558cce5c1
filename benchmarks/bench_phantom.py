"""Phantom generation speed on one core: the brain-size target (< 30 s) and the sample size.

Each row runs in its own subprocess with every thread pool limited to one thread, so times are
single-core and peak resident memory (ru_maxrss) is the row's own. The reference row, measured
in the same run, is one 3D Gaussian blur (sigma 1 voxel) of a float32 volume of the same shape:
the "x ref" column says how many such blurs a phantom costs.

Usage: python benchmarks/bench_phantom.py [--repeats 2] [--no-mni]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CASES = [
    # (label, shape, spacing, anatomy)
    ("brain 1 mm", (160, 192, 160), 1.0, "procedural"),
    ("brain 1 mm", (160, 192, 160), 1.0, "mni"),
    ("sample 2 mm", (64, 80, 64), 2.0, "procedural"),
    ("sample 1.5 mm", (64, 80, 64), 1.5, "mni"),
]
TARGET_S = {"brain 1 mm": 30.0, "sample 2 mm": 2.0, "sample 1.5 mm": 2.0}

CHILD = r"""
import json, resource, sys, time
import numpy as np
from scipy import ndimage
from napari_pvs.phantom import make_phantom
kind, shape, spacing, anatomy, repeats = json.loads(sys.argv[1])
shape = tuple(shape)
times = []
if kind == "reference":
    volume = np.random.default_rng(0).random(shape, dtype=np.float32)
    for _ in range(repeats):
        t = time.perf_counter()
        ndimage.gaussian_filter(volume, 1.0)
        times.append(time.perf_counter() - t)
    counts = {}
else:
    if anatomy == "mni":  # load the template once, outside the timing (cached per process)
        make_phantom((16, 16, 16), spacing, anatomy="mni")
    for seed in range(repeats):
        t = time.perf_counter()
        p = make_phantom(shape, spacing, "T2", seed=seed, anatomy=anatomy)
        times.append(time.perf_counter() - t)
    counts = p.meta["counts"]
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": min(times), "rss_mb": rss, "counts": counts}))
"""


def run_child(payload: list) -> dict:
    env = dict(os.environ)
    for var in (
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
    ):
        env[var] = "1"
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(payload)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="seeds per case (best time kept)")
    parser.add_argument("--no-mni", action="store_true", help="skip the MNI152 anatomy rows")
    args = parser.parse_args()

    header = (
        f"{'case':<14}{'anatomy':<12}{'shape':<16}{'mm':>5}{'seconds':>9}{'x ref':>7}"
        f"{'target':>8}{'ok':>5}{'RSS MB':>8}{'PVS':>6}"
    )
    print(header)
    print("-" * len(header))
    references: dict[tuple, float] = {}
    for label, shape, spacing, anatomy in CASES:
        if anatomy == "mni" and args.no_mni:
            continue
        if shape not in references:
            ref = run_child(["reference", shape, spacing, anatomy, args.repeats])
            references[shape] = ref["seconds"]
        row = run_child(["phantom", shape, spacing, anatomy, args.repeats])
        target = TARGET_S[label]
        ok = "yes" if row["seconds"] < target else "NO"
        print(
            f"{label:<14}{anatomy:<12}{'x'.join(map(str, shape)):<16}{spacing:>5}"
            f"{row['seconds']:>9.2f}{row['seconds'] / references[shape]:>7.1f}"
            f"{target:>8.0f}{ok:>5}{row['rss_mb']:>8.0f}{row['counts']['pvs']:>6d}"
        )
    for shape, seconds in references.items():
        print(
            f"reference: one gaussian_filter(sigma=1) of {'x'.join(map(str, shape))} float32 = "
            f"{seconds:.3f} s"
        )
    print("single core (all thread pools = 1); best of --repeats seeds; T2; default severity 0.5")


if __name__ == "__main__":
    main()

"""Chunked inference vs MONAI's sliding_window_inference, side by side in one run.

Every row runs in its own subprocess so peak resident memory (ru_maxrss) is its own. Prints:

* 256^3: time and peak RSS, ours vs MONAI (same model, 64^3 window, overlap 0.25, gaussian,
  batch 4; plus ours at the CPU default batch 2); peak RSS is also shown above the process
  baseline (python + torch + MONAI + model loaded, before any volume is touched), which is
  what the inference itself costs;
* ours at 512^3: peak RSS against ours at 256^3;
* Monte Carlo dropout, T = 8 (shared features) and naive T = 8, against one deterministic pass;
* the compute ceiling: the model's multiply-adds per voxel, this machine's measured conv3d
  throughput, and achieved / ceiling.

Usage: python benchmarks/bench_inference.py [--sizes 256 512] [--mc-size 128] [--threads 2]
[--interleaved 2] [--lean-batch 2]; a shorter run: --sizes 256 --interleaved 0.
The volumes are written once to a zarr cache directory (default /tmp/napari_pvs_bench).
"""

from __future__ import annotations

import os

# Busy-waiting OpenMP threads make torch 10-20x slower when the CPU is shared; passive waiting
# costs nothing on a quiet machine. Set before torch is imported; worker processes inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

WINDOW = 64
OVERLAP = 0.25
BATCH = 4
CHANNELS = [16, 32, 64, 128, 256]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def build():
    import torch

    from napari_pvs.models import build_model

    torch.manual_seed(0)
    return build_model("unet", channels=CHANNELS).eval()


def make_volume(path: Path, size: int) -> Path:
    """A smooth random brain-like volume (zarr, 64^3 chunks), written chunk by chunk."""
    import dask.array as da
    import numpy as np

    if (path / "zarr.json").exists():
        return path
    rng = da.random.default_rng(0)
    noise = rng.normal(100.0, 15.0, (size,) * 3, chunks=64).astype(np.float32)
    zz, yy, xx = da.meshgrid(*(da.arange(size, chunks=64, dtype=np.float32),) * 3, indexing="ij")
    radius = ((zz - size / 2) ** 2 + (yy - size / 2) ** 2 + (xx - size / 2) ** 2) ** 0.5
    volume = da.where(radius < 0.45 * size, noise + 50 * da.sin(xx / 7.0), 0).astype(np.float32)
    da.to_zarr(volume, str(path), overwrite=True)
    return path


# ---------------------------------------------------------------------------------------------
# workers (each in its own process)


def worker_ours(volume_path: str, mc: int, out: str, batch: int = BATCH) -> dict:
    import shutil

    import dask.array as da

    from napari_pvs.inference import Predictor

    model = build()
    predictor = Predictor(model, window=WINDOW, overlap=OVERLAP, batch=batch, mc_samples=mc)
    baseline = current_rss_mb()
    shutil.rmtree(out, ignore_errors=True)
    volume = da.from_zarr(volume_path)
    start = time.perf_counter()
    summary = predictor.predict(volume, out)
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return {
        "seconds": seconds,
        "peak_mb": rss_mb(),
        "baseline_mb": baseline,
        "windows": summary.windows_run,
    }


def worker_naive_mc(volume_path: str, mc: int) -> dict:
    """Naive MC dropout (full network per sample) over the same windows, no I/O: time only."""
    import numpy as np
    import torch
    import zarr
    from monai.inferers import sliding_window_inference

    from napari_pvs.intensity import normalize, robust_range
    from napari_pvs.uncertainty import naive_mc_samples

    model = build()
    array = zarr.open_array(volume_path, mode="r")
    volume = np.asarray(array[...])
    lo, hi = robust_range(volume)
    x = torch.from_numpy(normalize(volume, lo, hi))[None, None]

    def sampler(window):
        return torch.stack(list(naive_mc_samples(model, window, None, mc))).mean(0)

    start = time.perf_counter()
    with torch.inference_mode():
        sliding_window_inference(x, (WINDOW,) * 3, BATCH, sampler, overlap=OVERLAP, mode="gaussian")
    return {"seconds": time.perf_counter() - start, "peak_mb": rss_mb()}


def monai_segmentation(model, volume_path: str):
    """The reference: read the whole volume, MONAI's sliding window over it, threshold."""
    import numpy as np
    import torch
    import zarr
    from monai.inferers import sliding_window_inference

    from napari_pvs.intensity import normalize, robust_range

    volume = np.asarray(zarr.open_array(volume_path, mode="r")[...])
    lo, hi = robust_range(volume)
    x = torch.from_numpy(normalize(volume, lo, hi))[None, None]
    with torch.inference_mode():
        logits = sliding_window_inference(
            x, (WINDOW,) * 3, BATCH, model, overlap=OVERLAP, mode="gaussian"
        )
        return (torch.sigmoid(logits)[0, 0] >= 0.5).to(torch.uint8).numpy()


def worker_monai(volume_path: str) -> dict:
    model = build()
    baseline = current_rss_mb()
    start = time.perf_counter()
    segmentation = monai_segmentation(model, volume_path)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_mb": rss_mb(),
        "baseline_mb": baseline,
        "foreground": float(segmentation.mean()),
    }


def worker_interleaved(volume_path: str, out: str, repeats: int) -> dict:
    """Time MONAI and ours alternately in one process; best of ``repeats`` each.

    The CPU is shared, so load drifts between subprocesses; alternating in one process and
    keeping each engine's best run compares them under the same conditions.
    """
    import shutil

    import dask.array as da

    from napari_pvs.inference import Predictor

    model = build()
    predictor = Predictor(model, window=WINDOW, overlap=OVERLAP, batch=BATCH)
    times: dict[str, list[float]] = {"monai": [], "ours": []}
    for _ in range(repeats):
        start = time.perf_counter()
        monai_segmentation(model, volume_path)
        times["monai"].append(time.perf_counter() - start)
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        predictor.predict(da.from_zarr(volume_path), out)
        times["ours"].append(time.perf_counter() - start)
        shutil.rmtree(out, ignore_errors=True)
    return {"monai": min(times["monai"]), "ours": min(times["ours"]), "all": times}


def worker_ceiling() -> dict:
    """Multiply-adds per voxel of the model, and the machine's conv3d/matmul throughput."""
    import torch

    model = build()
    macs = [0]

    def count(module, inputs, output):
        kernel = 1
        for k in module.kernel_size:
            kernel *= k
        per_output = module.in_channels // module.groups * kernel
        if isinstance(module, torch.nn.ConvTranspose3d):
            macs[0] += inputs[0].numel() * module.out_channels // module.groups * kernel
        else:
            macs[0] += output.numel() * per_output

    hooks = [
        m.register_forward_hook(count)
        for m in model.modules()
        if isinstance(m, torch.nn.Conv3d | torch.nn.ConvTranspose3d)
    ]
    x = torch.randn(1, 1, WINDOW, WINDOW, WINDOW)
    with torch.inference_mode():
        model(x)
    for hook in hooks:
        hook.remove()
    macs_per_voxel = macs[0] / WINDOW**3

    def best_rate(fn, work, repeats=5):
        fn()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return work / best

    a = torch.randn(2048, 2048)
    matmul = best_rate(lambda: a @ a, 2048**3)
    conv = torch.nn.Conv3d(32, 32, 3, padding=1).eval()
    y = torch.randn(1, 32, 48, 48, 48)
    with torch.inference_mode():
        conv_rate = best_rate(lambda: conv(y), 48**3 * 32 * 32 * 27)
    return {"macs_per_voxel": macs_per_voxel, "matmul_macs": matmul, "conv_macs": conv_rate}


# ---------------------------------------------------------------------------------------------
# driver


def run_worker(args: list[str], threads: int) -> dict:
    command = [sys.executable, __file__, "--worker", *args, "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--mc-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default="/tmp/napari_pvs_bench")
    parser.add_argument(
        "--interleaved", type=int, default=2, help="alternating MONAI/ours timing repeats (0: skip)"
    )
    parser.add_argument(
        "--lean-batch", type=int, default=2, help="batch of the low-memory row (CPU default: 2)"
    )
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.worker is not None:
        kind, *rest = args.worker
        if kind == "ours":
            out = worker_ours(rest[0], int(rest[1]), rest[2], *(int(b) for b in rest[3:]))
        elif kind == "monai":
            out = worker_monai(rest[0])
        elif kind == "interleaved":
            out = worker_interleaved(rest[0], rest[1], int(rest[2]))
        elif kind == "naive":
            out = worker_naive_mc(rest[0], int(rest[1]))
        else:
            out = worker_ceiling()
        print(json.dumps(out))
        return

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    results = {}
    reference = args.sizes[0]
    for size in sorted(set([*args.sizes, args.mc_size])):
        make_volume(cache / f"vol{size}.zarr", size)
    vol = {s: str(cache / f"vol{s}.zarr") for s in {*args.sizes, args.mc_size}}
    out = str(cache / "out.zarr")

    monai = run_worker(["monai", vol[reference]], args.threads)
    ours = run_worker(["ours", vol[reference], "0", out], args.threads)
    results["monai"], results["ours"] = monai, ours
    n = f"{reference}^3"
    rows.append((f"MONAI sliding_window_inference {n}: time", f"{monai['seconds']:.1f} s", "1.00"))
    rows.append(
        (f"ours {n}: time", f"{ours['seconds']:.1f} s", f"{ours['seconds'] / monai['seconds']:.2f}")
    )
    rows.append((f"MONAI {n}: peak RSS", f"{monai['peak_mb']:.0f} MB", "1.00"))
    rows.append(
        (
            f"ours {n}: peak RSS",
            f"{ours['peak_mb']:.0f} MB",
            f"{ours['peak_mb'] / monai['peak_mb']:.2f}",
        )
    )
    monai_inc = monai["peak_mb"] - monai["baseline_mb"]
    ours_inc = ours["peak_mb"] - ours["baseline_mb"]
    rows.append((f"MONAI {n}: peak RSS above baseline", f"{monai_inc:.0f} MB", "1.00"))
    rows.append(
        (f"ours {n}: peak RSS above baseline", f"{ours_inc:.0f} MB", f"{ours_inc / monai_inc:.2f}")
    )
    if args.interleaved:
        alt = run_worker(["interleaved", vol[reference], out, str(args.interleaved)], args.threads)
        results["interleaved"] = alt
        label = f"{n}, alternating in one process, best of {args.interleaved}"
        rows.append((f"MONAI {label}: time", f"{alt['monai']:.1f} s", "1.00"))
        rows.append(
            (f"ours {label}: time", f"{alt['ours']:.1f} s", f"{alt['ours'] / alt['monai']:.2f}")
        )
    lean = run_worker(["ours", vol[reference], "0", out, str(args.lean_batch)], args.threads)
    results["ours_lean_batch"] = lean
    lean_inc = lean["peak_mb"] - lean["baseline_mb"]
    t_ratio = f"{lean['seconds'] / monai['seconds']:.2f}"
    rows.append((f"ours {n}, batch {args.lean_batch}: time", f"{lean['seconds']:.1f} s", t_ratio))
    rows.append(
        (
            f"ours {n}, batch {args.lean_batch}: peak RSS above baseline",
            f"{lean_inc:.0f} MB",
            f"{lean_inc / monai_inc:.2f}",
        )
    )
    for size in args.sizes[1:]:
        big = run_worker(["ours", vol[size], "0", out], args.threads)
        results[f"ours{size}"] = big
        rows.append(
            (
                f"ours {size}^3: peak RSS (vs ours {n})",
                f"{big['peak_mb']:.0f} MB",
                f"{big['peak_mb'] / ours['peak_mb']:.2f}",
            )
        )
        rows.append(
            (
                f"ours {size}^3: time",
                f"{big['seconds']:.1f} s",
                f"{big['seconds'] / ours['seconds']:.2f}",
            )
        )

    m = f"{args.mc_size}^3"
    one = run_worker(["ours", vol[args.mc_size], "0", out], args.threads)
    mc8 = run_worker(["ours", vol[args.mc_size], "8", out], args.threads)
    naive = run_worker(["naive", vol[args.mc_size], "8"], args.threads)
    results.update(one_pass=one, mc8=mc8, naive_mc8=naive)
    rows.append((f"ours {m}: one deterministic pass", f"{one['seconds']:.1f} s", "1.00"))
    rows.append(
        (
            f"ours {m}: MC dropout T=8 (shared features)",
            f"{mc8['seconds']:.1f} s",
            f"{mc8['seconds'] / one['seconds']:.2f}",
        )
    )
    rows.append(
        (
            f"naive MC dropout T=8 (MONAI + full passes) {m}",
            f"{naive['seconds']:.1f} s",
            f"{naive['seconds'] / one['seconds']:.2f}",
        )
    )

    ceiling = run_worker(["ceiling"], args.threads)
    results["ceiling"] = ceiling
    voxels = reference**3
    achieved = ceiling["macs_per_voxel"] * voxels * (ours["windows"] * WINDOW**3 / voxels)
    achieved_rate = achieved / ours["seconds"]
    rows.append(
        (
            "model multiply-adds per output voxel (one window pass)",
            f"{ceiling['macs_per_voxel'] / 1e3:.1f} k",
            "",
        )
    )
    rows.append(
        ("machine matmul throughput (fp32)", f"{ceiling['matmul_macs'] / 1e9:.1f} GMAC/s", "")
    )
    rows.append(
        (
            "machine conv3d throughput (fp32, 32->32, 3^3)",
            f"{ceiling['conv_macs'] / 1e9:.1f} GMAC/s",
            "",
        )
    )
    rows.append(
        (
            f"ours {n}: achieved / conv3d ceiling",
            f"{achieved_rate / 1e9:.1f} GMAC/s",
            f"{achieved_rate / ceiling['conv_macs']:.2f}",
        )
    )
    rows.append((f"ours {n}: voxels per second", f"{voxels / ours['seconds'] / 1e6:.2f} M/s", ""))

    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>14}  {'ratio':>6}")
    for name, value, ratio in rows:
        print(f"{name:<{width}}  {value:>14}  {ratio:>6}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

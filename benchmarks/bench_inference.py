"""Chunked inference vs MONAI's sliding_window_inference, side by side in one run.

Every row runs in its own subprocess so peak resident memory (ru_maxrss) is its own. Prints:

* 256^3, same model (residual UNet), 64^3 window, overlap 0.25, Gaussian blending: MONAI as it
  is usually called (float32, batch 4) against ours at its defaults (bfloat16 on CPUs with
  native bf16, float16 on CUDA, else float32; the device's default batch; ``memory="reuse"``),
  each side again at the other's precision (ours in float32, MONAI under the same bf16
  autocast), so the precision and the engine can be told apart, and ours with
  ``memory="return"`` (the lowest peak). Peak RSS is also shown above the process
  baseline (python + torch + MONAI + model loaded, before any volume is touched): what the
  inference itself costs;
* ours at 512^3: peak RSS against ours at 256^3;
* Monte Carlo dropout, T = 8 (shared features) and naive T = 8, against one deterministic pass;
* the compute ceiling: the model's multiply-adds per voxel, this machine's measured conv3d
  throughput (float32 and, where native, bfloat16), and achieved / ceiling.

Usage: python benchmarks/bench_inference.py [--sizes 256 512] [--mc-size 128] [--threads 2]
[--interleaved 2]; a shorter run: --sizes 256 --interleaved 0.
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


def worker_ours(
    volume_path: str,
    mc: int,
    out: str,
    batch: int | None = None,
    amp: bool = True,
    memory: str = "reuse",
) -> dict:
    """Ours at its defaults (``batch=None``, ``amp=True``, ``memory="reuse"``) or as given."""
    import shutil

    import dask.array as da

    from napari_pvs.inference import Predictor

    model = build()
    predictor = Predictor(
        model, window=WINDOW, overlap=OVERLAP, batch=batch, mc_samples=mc, amp=amp, memory=memory
    )
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
        "batch": predictor.batch,
        "precision": str(predictor.amp_dtype or "float32").removeprefix("torch."),
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


def monai_segmentation(model, volume_path: str, bf16: bool = False):
    """The reference: read the whole volume, MONAI's sliding window over it, threshold.

    ``bf16`` wraps the call in CPU bfloat16 autocast, as a MONAI user would to match ours.
    """
    import numpy as np
    import torch
    import zarr
    from monai.inferers import sliding_window_inference

    from napari_pvs.intensity import normalize, robust_range

    volume = np.asarray(zarr.open_array(volume_path, mode="r")[...])
    lo, hi = robust_range(volume)
    x = torch.from_numpy(normalize(volume, lo, hi))[None, None]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.inference_mode(), autocast:
        logits = sliding_window_inference(
            x, (WINDOW,) * 3, BATCH, model, overlap=OVERLAP, mode="gaussian"
        )
        return (torch.sigmoid(logits.float())[0, 0] >= 0.5).to(torch.uint8).numpy()


def worker_monai(volume_path: str, bf16: bool = False) -> dict:
    model = build()
    baseline = current_rss_mb()
    start = time.perf_counter()
    segmentation = monai_segmentation(model, volume_path, bf16)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_mb": rss_mb(),
        "baseline_mb": baseline,
        "foreground": float(segmentation.mean()),
    }


def worker_interleaved(volume_path: str, out: str, repeats: int) -> dict:
    """Time MONAI and ours alternately in one process, at equal precision; best of ``repeats``.

    The CPU is shared, so load drifts between subprocesses; alternating in one process and
    keeping each engine's best run compares them under the same conditions. Each round runs
    MONAI float32, ours float32, MONAI under bf16 autocast (batch 4), ours at its defaults
    (bf16 where the CPU has it natively). The C-heap policy is process-wide, so MONAI runs
    under ours too: the two engines differ in nothing else.
    """
    import shutil

    import dask.array as da

    from napari_pvs.inference import Predictor
    from napari_pvs.memory import memory_policy

    model = build()
    ours_bf16 = Predictor(model, window=WINDOW, overlap=OVERLAP)  # ours at its defaults
    ours_fp32 = Predictor(model, window=WINDOW, overlap=OVERLAP, amp=False)
    bf16 = ours_bf16.amp_dtype is not None
    times: dict[str, list[float]] = {"monai": [], "ours_float32": []}
    if bf16:
        times.update(monai_bf16=[], ours=[])

    windows = []

    def ours(predictor) -> float:
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        windows.append(predictor.predict(da.from_zarr(volume_path), out).windows_run)
        seconds = time.perf_counter() - start
        shutil.rmtree(out, ignore_errors=True)
        return seconds

    def monai(bf16: bool) -> float:
        start = time.perf_counter()
        with memory_policy(ours_bf16.memory):
            monai_segmentation(model, volume_path, bf16)
        return time.perf_counter() - start

    for _ in range(repeats):
        times["monai"].append(monai(False))
        times["ours_float32"].append(ours(ours_fp32))
        if bf16:
            times["monai_bf16"].append(monai(True))
            times["ours"].append(ours(ours_bf16))
    best = {name: min(values) for name, values in times.items()}
    return {
        **best,
        "all": times,
        "batch": ours_bf16.batch,
        "batch_float32": ours_fp32.batch,
        "windows": windows[0],
        "load": os.getloadavg(),
    }


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
        with torch.autocast("cpu", dtype=torch.bfloat16):
            conv_bf16 = best_rate(lambda: conv(y), 48**3 * 32 * 32 * 27)
    return {
        "macs_per_voxel": macs_per_voxel,
        "matmul_macs": matmul,
        "conv_macs": conv_rate,
        "conv_bf16_macs": conv_bf16,
    }


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
    parser.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.worker is not None:
        kind, *rest = args.worker
        if kind == "ours":
            batch = int(rest[3]) or None if len(rest) > 3 else None
            amp = rest[4] != "0" if len(rest) > 4 else True
            memory = rest[5] if len(rest) > 5 else "reuse"
            out = worker_ours(rest[0], int(rest[1]), rest[2], batch, amp, memory)
        elif kind == "monai":
            out = worker_monai(rest[0], bf16=rest[1:] == ["bf16"])
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
    ours32 = run_worker(["ours", vol[reference], "0", out, "0", "0"], args.threads)
    lean = run_worker(["ours", vol[reference], "0", out, "0", "1", "return"], args.threads)
    monai16 = run_worker(["monai", vol[reference], "bf16"], args.threads)
    results.update(
        monai=monai, ours=ours, ours_float32=ours32, ours_memory_return=lean, monai_bf16=monai16
    )
    n = f"{reference}^3"
    default = f"ours, defaults ({ours['precision']}, batch {ours['batch']})"
    same = f"ours, float32 (batch {ours32['batch']})"
    low = "ours, defaults but memory='return'"

    def above(run: dict) -> float:
        return run["peak_mb"] - run["baseline_mb"]

    rows.append((f"MONAI {n}, float32, batch {BATCH}: time", f"{monai['seconds']:.1f} s", "1.00"))
    for label, run in ((default, ours), (same, ours32), (low, lean)):
        ratio = f"{run['seconds'] / monai['seconds']:.2f}"
        rows.append((f"{label}: time", f"{run['seconds']:.1f} s", ratio))
    rows.append((f"MONAI {n}, float32: peak RSS", f"{monai['peak_mb']:.0f} MB", "1.00"))
    for label, run in ((default, ours), (same, ours32), (low, lean)):
        ratio = f"{run['peak_mb'] / monai['peak_mb']:.2f}"
        rows.append((f"{label}: peak RSS", f"{run['peak_mb']:.0f} MB", ratio))
    rows.append((f"MONAI {n}, float32: peak RSS above baseline", f"{above(monai):.0f} MB", "1.00"))
    for label, run in ((default, ours), (same, ours32), (low, lean)):
        ratio = f"{above(run) / above(monai):.2f}"
        rows.append((f"{label}: peak RSS above baseline", f"{above(run):.0f} MB", ratio))
    rows.append(
        (f"MONAI {n}, bf16 autocast, batch {BATCH}: time", f"{monai16['seconds']:.1f} s", "1.00")
    )
    ratio = f"{ours['seconds'] / monai16['seconds']:.2f}"
    rows.append((f"{default}: time vs MONAI bf16", f"{ours['seconds']:.1f} s", ratio))
    ratio = f"{above(ours) / above(monai16):.2f}"
    rows.append(
        (f"{default}: peak RSS above baseline vs MONAI bf16", f"{above(ours):.0f} MB", ratio)
    )
    ratio = f"{above(monai16) / above(monai):.2f}"
    rows.append(
        (
            "MONAI bf16: peak RSS above baseline (vs MONAI float32)",
            f"{above(monai16):.0f} MB",
            ratio,
        )
    )
    if args.interleaved:
        alt = run_worker(["interleaved", vol[reference], out, str(args.interleaved)], args.threads)
        results["interleaved"] = alt
        label = f"{n}, alternating in one process, best of {args.interleaved}"
        pairs = [("float32", "monai", "ours_float32", alt["batch_float32"])]
        if "ours" in alt:
            pairs.append(("bf16", "monai_bf16", "ours", alt["batch"]))
        for precision, theirs, mine, batch in pairs:
            rows.append(
                (f"MONAI {precision} (batch {BATCH}) {label}: time", f"{alt[theirs]:.1f} s", "1.00")
            )
            rows.append(
                (
                    f"ours {precision} (batch {batch}) {label}: time",
                    f"{alt[mine]:.1f} s",
                    f"{alt[mine] / alt[theirs]:.2f}",
                )
            )
        rows.append(("load average (1, 5, 15 min) at the end of that run", str(alt["load"]), ""))
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
    macs_per_run = ceiling["macs_per_voxel"] * ours["windows"] * WINDOW**3

    def achieved_row(label: str, seconds: float, precision: str) -> None:
        rate = macs_per_run / seconds
        ceiling_rate = ceiling["conv_bf16_macs" if precision == "bfloat16" else "conv_macs"]
        rows.append(
            (
                f"{label} {n}: achieved / conv3d ceiling at its precision",
                f"{rate / 1e9:.1f} GMAC/s",
                f"{rate / ceiling_rate:.2f}",
            )
        )

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
            "machine conv3d throughput (bf16 autocast, 32->32, 3^3)",
            f"{ceiling['conv_bf16_macs'] / 1e9:.1f} GMAC/s",
            "",
        )
    )
    achieved_row(default, ours["seconds"], ours["precision"])
    achieved_row(same, ours32["seconds"], "float32")
    if args.interleaved:
        if "ours" in alt:
            achieved_row(f"{default}, interleaved best", alt["ours"], ours["precision"])
        achieved_row(f"{same}, interleaved best", alt["ours_float32"], "float32")
    rows.append((f"ours {n}: voxels per second", f"{voxels / ours['seconds'] / 1e6:.2f} M/s", ""))

    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>14}  {'ratio':>6}")
    for name, value, ratio in rows:
        print(f"{name:<{width}}  {value:>14}  {ratio:>6}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

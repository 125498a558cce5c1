"""Network lanes: one batch on every torch thread against several batches at once, one lane each.

The network alone (no reading or writing), on the residual UNet of ``bench_inference.py``,
64^3 windows, under the ``"reuse"`` heap policy a prediction runs under. For each precision
and lane count it prints milliseconds per window, CPU milliseconds per window (what the cores
spent) and the ratio against one lane on all threads, measured in the same run. This is the
measurement behind :func:`napari_pvs.inference.engine.default_lanes`.

Run: ``.venv/bin/python benchmarks/bench_lanes.py [--threads 2] [--windows 48]``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench_inference.py: before torch

import argparse
import time
from concurrent.futures import ThreadPoolExecutor


def per_window(engine, batch: int, lanes: int, threads: int, windows: int) -> tuple[float, float]:
    """Wall and CPU milliseconds per window for ``lanes`` lanes of ``threads // lanes`` threads."""
    import numpy as np
    import torch

    image = np.random.default_rng(0).random((batch, 1, 64, 64, 64), dtype=np.float32)
    torch.set_num_threads(threads)
    runs = max(1, windows // batch)
    with ThreadPoolExecutor(
        lanes, initializer=torch.set_num_threads, initargs=(max(1, threads // lanes),)
    ) as pool:
        list(pool.map(lambda i: engine.run_batch(image, "T2w", i), range(2 * lanes)))  # warm
        cpu, start = os.times(), time.perf_counter()
        list(pool.map(lambda i: engine.run_batch(image, "T2w", i), range(runs)))
        wall, end = time.perf_counter() - start, os.times()
    torch.set_num_threads(threads)
    spent = end.user + end.system - cpu.user - cpu.system
    return 1000 * wall / (runs * batch), 1000 * spent / (runs * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=48, help="windows timed per row")
    args = parser.parse_args()

    import torch
    from bench_inference import build

    from napari_pvs.inference.engine import WindowEngine, default_batch
    from napari_pvs.memory import memory_policy
    from napari_pvs.models import autocast_dtype

    model = build()
    precisions = dict.fromkeys([autocast_dtype(torch.device("cpu")), None])  # bf16 if native
    print(f"{'precision':10s} {'batch':>5s} {'lanes':>5s} {'ms/window':>10s} "
          f"{'CPU ms/window':>14s} {'ratio':>6s}")  # fmt: skip
    with memory_policy("reuse"):
        for precision in precisions:
            engine = WindowEngine([model], torch.device("cpu"), (64,) * 3, precision, None,
                                  0, 1, 0)  # fmt: skip
            batch = default_batch(torch.device("cpu"), precision)
            reference = None
            for lanes in range(1, args.threads + 2):
                wall, cpu = per_window(engine, batch, lanes, args.threads, args.windows)
                reference = reference or wall
                name = str(precision or torch.float32).removeprefix("torch.")
                print(f"{name:10s} {batch:5d} {lanes:5d} {wall:10.1f} {cpu:14.1f} "
                      f"{wall / reference:6.2f}")  # fmt: skip
    print(f"{args.threads} torch threads; load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

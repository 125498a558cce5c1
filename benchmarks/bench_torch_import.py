"""How long a worker thread's ``import torch`` stalls the main (GUI) thread, with and without
loading torch's native libraries first with the GIL released (``models.native``).

    python benchmarks/bench_torch_import.py [--repeats 5]

Each row runs in fresh processes (torch is imported once per process). The main thread sleeps
2 ms at a time while a worker thread imports torch, and records the longest gap between two of
its wake-ups: the time a GUI's event loop could not run. Rows: the plain import (the
reference), and the preload followed by the import (what the GUI's workers do); ratio =
preload / plain, measured in the same run. Goal: the longest stall under 100 ms, so that with
the rest of a turn's work the viewer's 200 ms goal holds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

GOAL_MS = 100.0

_CHILD = r"""
import json, sys, threading, time
preload = sys.argv[1] == "preload"
marks = {}

def work():
    marks["start"] = time.perf_counter()
    if preload:
        from napari_pvs.models.native import preload_torch_libraries
        preload_torch_libraries()
    import torch  # noqa: F401
    marks["end"] = time.perf_counter()

worker = threading.Thread(target=work)
last = time.perf_counter()
longest = 0.0
worker.start()
while worker.is_alive():
    time.sleep(0.002)
    now = time.perf_counter()
    longest, last = max(longest, now - last), now
print(json.dumps({"longest": longest, "seconds": marks["end"] - marks["start"]}))
"""


def run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per row")
    args = parser.parse_args()
    rows = {mode: [] for mode in ("plain", "preload")}
    for _ in range(args.repeats):  # interleaved, so that both rows see the same machine
        for mode, runs in rows.items():
            runs.append(run(mode))
    print(f"worker-thread import of torch, {args.repeats} fresh processes per row")
    print(f"{'row':34s} {'import s':>9s} {'longest stall ms (median, max)':>31s}")
    medians = {}
    for mode, runs in rows.items():
        stalls = [r["longest"] * 1000 for r in runs]
        medians[mode] = statistics.median(stalls)
        label = "import torch (reference)" if mode == "plain" else "preload libraries, then import"
        seconds = statistics.median(r["seconds"] for r in runs)
        print(f"{label:34s} {seconds:9.2f} {medians[mode]:21.0f} {max(stalls):9.0f}")
    print(f"ratio (preload / reference, median stall): {medians['preload'] / medians['plain']:.2f}")
    worst = max(r["longest"] for r in rows["preload"]) * 1000
    met = "met" if worst < GOAL_MS else "NOT met"
    print(f"goal (preload's longest stall < {GOAL_MS:g} ms): {met}")


if __name__ == "__main__":
    main()

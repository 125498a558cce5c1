"""Opening a 1024^3 uint16 OME-Zarr (3 levels): wall time and peak RSS, each in a fresh process.

Goal (issue 2): opening through ``open_volume`` or the napari reader reads no full level:
under 1 s and under 400 MB resident memory. The volume is written once, chunk by chunk, with
``save_ome_zarr`` and cached (``NAPARI_PVS_BENCH_DIR``, default ``$TMPDIR/napari-pvs-bench``).

Rows (each a fresh Python process; time excludes interpreter start and imports, RSS is the
process peak including imports):
- ``imports only``: the RSS floor of Python + numpy/dask/zarr (+ napari for the napari rows);
- ``zarr + dask (reference)``: the bare minimum lazy open, ``da.from_zarr`` of level 0;
- ``open_volume``: our core;
- ``napari reader -> layer data`` and ``-> napari layers``: the npe2 reader, then
  ``Layer.create`` for each layer (what napari does before rendering; no canvas).

"first s" is the first open in the process: it includes one-time lazy imports that the first
dask compute (dask imports ``distributed``) and the first napari layer with units (pint's unit
registry) trigger, about 0.4-0.6 s each on 2 shared cores. "again s" opens the same path a
second time in the same process: what opening another volume in a running napari costs.

Run: ``.venv/bin/python benchmarks/bench_open.py [--size 1024]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_SECONDS = 1.0
GOAL_MB = 400.0

_CHILD = r"""
import json, sys, time
mode, path = sys.argv[1], sys.argv[2]
import numpy, dask.array as da, zarr
if "napari" in mode:
    import napari.layers
    from napari_pvs._reader import napari_get_reader
if mode == "volume":
    from napari_pvs.io import open_volume
def run_once():
    if mode == "reference":
        return da.from_zarr(zarr.open_array(path + "/0", mode="r"))
    if mode == "volume":
        volume = open_volume(path)
        assert volume.data.shape == (SIZE,) * 3
        return volume
    if mode == "napari-data":
        return napari_get_reader(path)(path)
    if mode == "napari-layers":
        layers = [napari.layers.Layer.create(*ld) for ld in napari_get_reader(path)(path)]
        assert layers[0].multiscale and len(layers[0].data) == 3
        return layers
    return None  # imports only

t0 = time.perf_counter()
run_once()
seconds = time.perf_counter() - t0
t0 = time.perf_counter()
run_once()
warm = time.perf_counter() - t0
# VmHWM is this process image's peak RSS (ru_maxrss would carry over the parent's across exec)
with open("/proc/self/status") as status:
    rss_mb = next(int(l.split()[1]) for l in status if l.startswith("VmHWM")) / 1024
print(json.dumps({"seconds": seconds, "warm": warm, "rss_mb": rss_mb}))
"""


def bench_store(size: int) -> Path:
    """Create (once) the size^3 uint16 OME-Zarr with 3 levels, chunk by chunk."""
    import dask.array as da
    import numpy as np

    from napari_pvs.io import save_ome_zarr
    from napari_pvs.progress import TerminalProgress

    root = Path(
        os.environ.get("NAPARI_PVS_BENCH_DIR", Path(tempfile.gettempdir()) / "napari-pvs-bench")
    )
    path = root / f"open_{size}.ome.zarr"
    if (path / "2" / ".zarray").exists():
        return path
    root.mkdir(parents=True, exist_ok=True)

    def block(block_info=None):
        (z0, z1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        z, y, x = np.ogrid[z0:z1, y0:y1, x0:x1]
        # a smooth, brain-like ramp with some texture: compressible like real MRI, cheap to make
        return ((z * 3 + y * 2 + x) % 1024 + ((x * y) % 97) * 8).astype(np.uint16)

    chunk = 128
    image = da.map_blocks(block, chunks=((chunk,) * (size // chunk),) * 3, dtype=np.uint16)
    started = time.perf_counter()
    save_ome_zarr(
        path, image, (1.0, 1.0, 1.0), levels=3, chunks=chunk, modality="T2",
        overwrite=True, progress=TerminalProgress(),
    )  # fmt: skip
    print(f"wrote {path} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return path


def measure(mode: str, path: Path, size: int, repeats: int) -> dict:
    """Best wall time and the peak RSS over ``repeats`` fresh processes."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", _CHILD.replace("SIZE", str(size)), mode, str(path)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        "seconds": min(r["seconds"] for r in runs),
        "warm": min(r["warm"] for r in runs),
        "rss_mb": max(r["rss_mb"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="edge of the cube (default 1024)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per row")
    args = parser.parse_args()
    path = bench_store(args.size)
    rows = [
        ("imports only (numpy, dask, zarr)", "imports"),
        ("imports only (+ napari)", "imports-napari"),
        ("zarr + dask (reference)", "reference"),
        ("open_volume", "volume"),
        ("napari reader -> layer data", "napari-data"),
        ("napari reader -> napari layers", "napari-layers"),
    ]
    results = {mode: measure(mode, path, args.size, args.repeats) for _, mode in rows}
    ref = results["reference"]
    print(f"\nOpening {path} ({args.size}^3 uint16, 3 levels), best of {args.repeats} processes")
    print(
        f"{'what':34s} {'first s':>8s} {'x ref':>7s} {'again s':>8s} {'peak RSS MB':>12s} "
        f"{'x ref':>7s}  goal (first open)"
    )
    for label, mode in rows:
        r = results[mode]
        goal = ""
        if mode in ("volume", "napari-data", "napari-layers"):
            ok = r["seconds"] < GOAL_SECONDS and r["rss_mb"] < GOAL_MB
            goal = f"{'PASS' if ok else 'FAIL'} (< {GOAL_SECONDS:g} s, < {GOAL_MB:g} MB)"
        print(
            f"{label:34s} {r['seconds']:8.3f} {r['seconds'] / max(ref['seconds'], 1e-9):7.1f} "
            f"{r['warm']:8.3f} "
            f"{r['rss_mb']:12.0f} {r['rss_mb'] / ref['rss_mb']:7.2f}  {goal}"
        )


if __name__ == "__main__":
    main()

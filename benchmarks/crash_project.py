"""Crash test of the annotation project: kill -9 at random points, then check nothing was lost.

    python benchmarks/crash_project.py [--accept-kills 20] [--round-kills 20] [--seed 0]
                                       [--keep DIR]

Two phases on a tiny model and a 48^3 phantom (fast enough to repeat many times):

* accepts: a child process accepts random patches (on an 8-voxel grid, so corrections of the
  same spot happen too) and prints an acknowledgement after each ``accept`` returns; it is
  killed with SIGKILL after a random delay;
* rounds: a child runs a round and is killed with SIGKILL at a random moment (snapshot,
  training, checkpoint, prediction, commit); every other time the round runs in a worker
  process (``start_round``) and the worker is the one killed.

After every kill the project is reopened for writing (which repairs) and checked: every
acknowledged annotation is present with its labels, the label store holds exactly the labels
of the newest annotation over every voxel, the current model loads, no round is left
running, and ``PRAGMA integrity_check`` is ``ok``. Prints the counts and exits 1 on any
failure.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_default.py

import argparse
import contextlib
import hashlib
import json
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SRC = str(Path(__file__).resolve().parents[1] / "src")
SHAPE = (48, 48, 48)
GRID = 8

CHILD_ACCEPT = """
import hashlib, sys, numpy as np
from napari_pvs.project import Project
project = Project.open(sys.argv[1])
rng = np.random.default_rng(int(sys.argv[2]))
print("READY", flush=True)
while True:
    start = rng.integers(0, 48 // 8 - 1, 3) * 8
    size = rng.integers(1, 3, 3) * 8
    stop = np.minimum(start + size, 48)
    labels = (rng.random(tuple(stop - start)) < 0.05).astype(np.uint8)
    annotation = project.accept(1, start, stop, labels, annotator="crash", seconds=1.0)
    digest = hashlib.sha256(labels.tobytes()).hexdigest()
    print("ACK", annotation.id, digest, flush=True)
"""

CHILD_ROUND = """
import os, sys
from napari_pvs.project import Project
from napari_pvs.rounds import RoundConfig, run_round, start_round
project = Project.open(sys.argv[1])
config = RoundConfig(steps=int(sys.argv[3]), batch_size=2, patch=16, device="cpu",
                     seed=int(sys.argv[4]))
if sys.argv[2] == "worker":
    handle = start_round(project, config)
    print("WORKER", handle.pid, flush=True)
    outcome = handle.wait()
else:
    print("READY", flush=True)
    outcome = run_round(project, config)
print("OUTCOME", outcome.status, outcome.version, flush=True)
project.close()
"""


def child(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        bufsize=1,
    )


def read_lines(process: subprocess.Popen, until: float, stop_on=None) -> list[str]:
    """Lines the child printed until ``until`` (monotonic) or a line starting with stop_on."""
    lines = []
    while time.monotonic() < until and process.poll() is None:
        ready, _, _ = select.select([process.stdout], [], [], max(0.0, until - time.monotonic()))
        if ready:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if stop_on and line.startswith(stop_on):
                break
    return lines


def kill(process: subprocess.Popen) -> list[str]:
    """SIGKILL, then whatever the child had printed before it died."""
    with_signal = process.poll() is None
    if with_signal:
        process.send_signal(signal.SIGKILL)
    rest = process.stdout.read().splitlines()
    process.wait()
    return [line.strip() for line in rest]


def check(folder: Path, acknowledged: dict[int, str]) -> list[str]:
    """Reopen (repairing) and list every problem found."""
    import zarr

    from napari_pvs.project import Project

    problems = []
    with Project.open(folder) as project:
        if project._query("PRAGMA integrity_check")[0][0] != "ok":
            problems.append("integrity_check failed")
        rows = project._query(
            "SELECT id, z0, y0, x0, z1, y1, x1, digest FROM annotations ORDER BY id"
        )
        ids = {r[0]: r for r in rows}
        for annotation_id, digest in acknowledged.items():
            if annotation_id not in ids:
                problems.append(f"acknowledged annotation {annotation_id} is missing")
            elif ids[annotation_id][7] != digest:
                problems.append(f"annotation {annotation_id} has other labels than acknowledged")
        # The store holds, voxel for voxel, the labels of the newest annotation over it.
        store = zarr.open_group(str(project.path / "volumes" / "1" / "labels.zarr"), mode="r")
        labels, reviewed = store["labels"][:], store["reviewed"][:]
        owner = np.zeros(SHAPE, np.int64)
        for r in rows:
            owner[r[1] : r[4], r[2] : r[5], r[3] : r[6]] = r[0]
        if not np.array_equal(reviewed, owner > 0) or not np.all((labels == 255) == (owner == 0)):
            problems.append("reviewed mask differs from the accepted boxes")
        for r in rows:
            box = (slice(r[1], r[4]), slice(r[2], r[5]), slice(r[3], r[6]))
            mine = owner[box] == r[0]
            if mine.all() and hashlib.sha256(labels[box].tobytes()).hexdigest() != r[7]:
                problems.append(f"the label store differs from annotation {r[0]}")
        if any(record.status == "running" for record in project.rounds()):
            problems.append("a round is still marked running")
        try:
            project.load_model()
        except Exception as exc:  # any failure to load is a finding
            problems.append(f"the current model does not load: {exc}")
        if project._query("SELECT COUNT(*) FROM pending_accepts")[0][0]:
            problems.append("an accept intent was left unrepaired")
    return problems


def setup(root: Path, seed: int) -> Path:
    import torch

    from napari_pvs.io import save_ome_zarr
    from napari_pvs.models import build_model
    from napari_pvs.models.checkpoint import save_checkpoint
    from napari_pvs.phantom import make_phantom
    from napari_pvs.project import Project

    phantom = make_phantom(SHAPE, spacing=1.0, modality="T2", seed=seed, severity=1.0)
    save_ome_zarr(root / "vol.zarr", phantom.image, phantom.spacing, modality="T2", levels=1)
    torch.manual_seed(seed)
    model = build_model("unet", channels=[4, 8], num_res_units=1, feature_channels=4)
    save_checkpoint(model, root / "tiny.safetensors")
    folder = root / "project"
    with Project.create(folder, model=root / "tiny.safetensors", seed=seed) as project:
        project.add_volume(root / "vol.zarr")
        project.update_settings(patch=16, n=4, predict_mc=0)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accept-kills", type=int, default=20)
    parser.add_argument("--round-kills", type=int, default=20)
    parser.add_argument("--round-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="work here instead of a temporary folder")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.keep or scratch)
        root.mkdir(parents=True, exist_ok=True)
        folder = setup(root, args.seed)
        acknowledged: dict[int, str] = {}
        counts = {"accept kills": 0, "acknowledged": 0, "repaired": 0, "lost": 0,
                  "round kills": 0, "rounds done before the kill": 0, "worker kills": 0,
                  "checks failed": 0}  # fmt: skip
        problems_all = []

        # Phase 1: kills while annotations are accepted.
        for trial in range(args.accept_kills):
            process = child(CHILD_ACCEPT, str(folder), str(args.seed * 1000 + trial))
            read_lines(process, time.monotonic() + 60, stop_on="READY")
            lines = read_lines(process, time.monotonic() + rng.uniform(0.05, 2.0))
            lines += kill(process)
            counts["accept kills"] += 1
            for line in lines:
                if line.startswith("ACK"):
                    _, annotation_id, digest = line.split()
                    acknowledged[int(annotation_id)] = digest
            problems = check(folder, acknowledged)
            counts["lost"] += sum("missing" in p for p in problems)
            counts["checks failed"] += bool(problems)
            problems_all += [f"accept trial {trial}: {p}" for p in problems]
        counts["acknowledged"] = len(acknowledged)

        # Phase 2: kills while a round runs (in-process, or its worker process). One round
        # first runs to the end, to spread the kills over a whole round's duration.
        started = time.monotonic()
        process = child(CHILD_ROUND, str(folder), "inline", str(args.round_steps), "999")
        read_lines(process, started + 600, stop_on="OUTCOME")
        kill(process)
        durations = [time.monotonic() - started]
        print(f"an uninterrupted round took {durations[0]:.1f} s (process start to commit)")
        trial = -1
        while counts["round kills"] + counts["worker kills"] < args.round_kills:
            trial += 1
            mode = "worker" if trial % 2 else "inline"
            started = time.monotonic()
            process = child(CHILD_ROUND, str(folder), mode, str(args.round_steps), str(trial))
            deadline = started + rng.uniform(0.0, 1.1 * float(np.median(durations)))
            if mode == "worker":
                first = read_lines(process, started + 120, stop_on="WORKER")
                worker = (
                    int(first[-1].split()[1]) if first and first[-1].startswith("WORKER") else 0
                )
                lines = first + read_lines(process, deadline, stop_on="OUTCOME")
                killed = worker and not any(line.startswith("OUTCOME") for line in lines)
                if killed:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker, signal.SIGKILL)
                    counts["worker kills"] += 1
                lines += read_lines(process, time.monotonic() + 120, stop_on="OUTCOME")
                kill(process)
                outcome = [line for line in lines if line.startswith("OUTCOME")]
                # a worker that finished just before the signal makes a done round, not a failure
                if killed and not (outcome and outcome[-1].split()[1] in ("failed", "done")):
                    problems_all.append(
                        f"round trial {trial}: the parent did not report the killed worker's "
                        f"round as failed: {lines[-1:]}"
                    )
            else:
                lines = read_lines(process, deadline, stop_on="OUTCOME")
                finished = any(line.startswith("OUTCOME") for line in lines)
                lines += kill(process)
                counts["round kills"] += not finished
            if any(line.startswith("OUTCOME done") for line in lines):
                counts["rounds done before the kill"] += 1  # then this trial killed nothing
                durations.append(time.monotonic() - started)
            problems = check(folder, acknowledged)
            counts["lost"] += sum("missing" in p for p in problems)
            counts["checks failed"] += bool(problems)
            problems_all += [f"round trial {trial} ({mode}): {p}" for p in problems]

        from napari_pvs.project import Project

        with Project.open(folder, readonly=True) as project:
            counts["repaired"] = len(project.events("accept-repaired"))
            statuses = [r.status for r in project.rounds()]
            versions = [v.version for v in project.versions()]
        print(json.dumps(counts, indent=1))
        tally = ", ".join(f"{s} {statuses.count(s)}" for s in sorted(set(statuses)))
        print(f"round statuses: {tally}")
        print(f"model versions: {versions}")
        for problem in problems_all:
            print("PROBLEM:", problem)
        if problems_all:
            print(f"FAILED: {len(problems_all)} problems")
        else:
            print(
                f"OK: {counts['accept kills']} kills during accepts, "
                f"{counts['round kills'] + counts['worker kills']} during rounds "
                f"({counts['worker kills']} of them the worker's); {counts['acknowledged']} "
                f"acknowledged annotations, {counts['lost']} lost, {counts['repaired']} "
                "repaired on reopen; integrity_check ok and the current model loads after "
                "every kill"
            )
        return 0 if not problems_all else 1


if __name__ == "__main__":
    sys.exit(main())

"""Time one active-learning round with the default model: 32 accepted 32^3 patches.

    python benchmarks/bench_round.py [--volumes 2] [--shape 160 192 160] [--patches 32]
                                     [--answers 0] [--steps 200] [--threads 2] [--keep DIR]

Builds a project with the bundled default model on phantom volumes (T2w, 1 mm), ranks each
volume's queue (stratified), accepts the ground truth of the top patches through
``Project.accept`` (what a person does), then times ``run_round`` from the call to the new
version current and the queue re-ranked, and prints the time of each stage (from the round's
event log). The issue's target: under 2 minutes on CPU.

A round with yes/no answers: ``--patches 8 --answers 100`` also answers the 100 candidates
asked first (volumes in turn; yes when at least half of the cluster is ground-truth PVS, the
benchmark's simulated annotator) through ``Project.answer``; the round then trains on both
(one answer in five held out and measured). Target: under 2 minutes on CPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_default.py

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from napari_pvs.io import save_ome_zarr
from napari_pvs.phantom import make_phantom
from napari_pvs.project import Project
from napari_pvs.rounds import RoundConfig, run_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 192, 160])
    parser.add_argument("--patches", type=int, default=32, help="accepted patches in all")
    parser.add_argument("--answers", type=int, default=0, help="yes/no answers on candidates")
    parser.add_argument("--steps", type=int, default=RoundConfig().steps)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep", help="build the project here (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.keep or scratch)
        root.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        truths = []
        for index in range(args.volumes):
            phantom = make_phantom(
                tuple(args.shape), spacing=1.0, modality="T2", seed=700 + index, severity=0.7
            )
            save_ome_zarr(
                root / f"brain{index}.zarr",
                phantom.image,
                phantom.spacing,
                labels={"pvs": phantom.pvs, "regions": phantom.regions},
                modality="T2",
                levels=1,
                overwrite=True,
            )
            truths.append(phantom.pvs)
        project = Project.create(root / "project", model="default")
        per_volume = -(-args.patches // args.volumes)
        accepted = 0
        with project:
            for index, truth in enumerate(truths):
                record = project.add_volume(root / f"brain{index}.zarr")
                goal = min(args.patches, accepted + per_volume)
                while accepted < goal:  # rank again until enough patches are reviewed
                    queue = project.rank(record.id, n=goal - accepted, patch=32)
                    if not queue:
                        break
                    for patch in queue:
                        box = tuple(
                            slice(a, b) for a, b in zip(patch.start, patch.stop, strict=True)
                        )
                        project.accept(
                            record.id, patch.start, patch.stop, truth[box], patch_id=patch.id,
                            annotator="bench",
                        )  # fmt: skip
                        accepted += 1
            if accepted < args.patches:
                raise SystemExit(f"only {accepted} patches could be queued; use larger volumes")
            answered = answer_candidates(project, truths, args.answers)
            setup = time.perf_counter() - started
            splits = [a.split for a in project.annotations()]
            held_out = sum(a.split == "held-out" for a in answered)
            yes = sum(a.answer == "yes" for a in answered)
            print(
                f"setup {setup:.0f} s: {args.volumes} volumes {'x'.join(map(str, args.shape))}, "
                f"{accepted} accepted 32^3 patches ({splits.count('validation')} validation), "
                f"{len(answered)} answers ({yes} yes, {held_out} held out), default model, "
                f"{args.threads} threads"
            )
            t0, cpu0 = time.perf_counter(), time.process_time()
            outcome = run_round(project, RoundConfig(steps=args.steps, device=args.device))
            total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            queue_sizes = [len(project.queue(v.id, status="new")) for v in project.volumes()]
            current = project.current_version().version
        log = root / "project" / "rounds" / f"r{outcome.round}" / "events.jsonl"
        events = [json.loads(line) for line in log.read_text().splitlines()]
        print("\n| stage | seconds from round start |\n|---|---|")
        first = events[0]["time"]
        for event in events:
            if event["kind"] in ("stage", "done"):
                text = event.get("message") or f"done: v{event['version']} current"
                print(f"| {text} | {event['time'] - first:.1f} |")
        m = outcome.metrics
        print(
            f"\nround {outcome.round}: {outcome.status}, v{current} current, queues "
            f"{queue_sizes}; validation Dice {m.get('base_validation_dice')} -> "
            f"{m.get('validation_dice')} on {m.get('validation_patches')} patches "
            f"({outcome.message})"
        )
        if answered:
            print(
                f"trained on {m.get('train_patches')} patches and {m.get('train_answers')} "
                f"answers; precision on {m.get('held_out_answers')} held-out answers "
                f"{m.get('base_answer_precision')} -> {m.get('answer_precision')}"
            )
        load = os.getloadavg()[0]
        print(
            f"ROUND TIME ({accepted} patches, {len(answered)} answers) {total:.1f} s wall, "
            f"{cpu:.1f} s CPU over {args.threads} threads (from "
            f"run_round to the new version current and the queue re-ranked; target < 120 s); "
            f"load average {load:.1f} on {os.cpu_count()} cores at the end"
        )


def answer_candidates(project, truths, n: int) -> list:
    """Answer the ``n`` candidates asked first, volumes in turn, by the benchmark's simulated
    annotator (yes when at least half of the cluster is ground-truth PVS)."""
    from napari_pvs.benchmark.answers import simulated_answer

    if n <= 0:
        return []
    queues = []
    for volume in project.volumes():
        project.predict(volume.id)  # ranking predicted it already: kept
        queues.append(project.refresh_candidates(volume.id))
    answered = []
    for position in range(max(len(q) for q in queues)):
        for volume_index, queue in enumerate(queues):
            if position < len(queue) and len(answered) < n:
                candidate = queue[position]
                box = tuple(
                    slice(a, b)
                    for a, b in zip(candidate.bbox_start, candidate.bbox_stop, strict=True)
                )
                cluster = project.candidate_mask(candidate.id)
                verdict = simulated_answer(truths[volume_index][box][cluster])
                answered.append(project.answer(candidate.id, verdict, annotator="bench"))
    if len(answered) < n:
        raise SystemExit(f"only {len(answered)} candidates to answer; use larger volumes")
    return answered


if __name__ == "__main__":
    main()

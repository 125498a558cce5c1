"""``napari-pvs round`` and ``python -m napari_pvs.rounds PROJECT``: one round, printed.

Under ``torchrun --nproc_per_node N -m napari_pvs.rounds PROJECT`` every process trains its
share of each batch (DDP inside ``training.fit``), and only rank 0 opens the project, writes
files and commits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from napari_pvs.progress import Cancelled
from napari_pvs.rounds.commit import abandon_round, commit_round
from napari_pvs.rounds.config import Event, RoundConfig, RoundOutcome
from napari_pvs.rounds.events import EventLog
from napari_pvs.rounds.execute import execute_round
from napari_pvs.rounds.prepare import prepare_round
from napari_pvs.rounds.run import run_round


def add_round_arguments(parser: argparse.ArgumentParser) -> None:
    """The round options shared by ``napari-pvs round`` and ``python -m napari_pvs.rounds``."""
    defaults = RoundConfig()
    parser.add_argument("project", metavar="DIR", help="the project folder")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps")
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="patches per step (global)"
    )
    parser.add_argument("--patch", type=int, default=defaults.patch, help="training patch edge")
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, help="learning rate")
    parser.add_argument(
        "--from-scratch", action="store_true", help="train a fresh model instead of fine-tuning"
    )
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--max-minutes", type=float, default=None, help="training time budget")
    parser.add_argument("--strategy", default=None, help="queue strategy after the round")
    parser.add_argument("--n", type=int, default=None, help="queue length after the round")
    parser.add_argument("--no-rerank", action="store_true", help="predict but do not re-rank")


def config_from_args(args: argparse.Namespace) -> RoundConfig:
    return RoundConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        patch=args.patch,
        learning_rate=args.lr,
        from_scratch=args.from_scratch,
        device=args.device,
        seed=args.seed,
        max_minutes=args.max_minutes,
        strategy=args.strategy,
        n=args.n,
        rerank=not args.no_rerank,
    )


def format_event(event: Event) -> str | None:
    """One printable line per event (the step lines are left to the progress bar)."""
    kind = event["kind"]
    if kind == "stage":
        return event["message"]
    if kind == "validation":
        source = " (epoch, best-epoch selection)" if event.get("source") == "fit" else ""
        return f"validation Dice {event['dice']:.4f} at step {event['step']}{source}"
    if kind == "done":
        if event.get("current", True):
            return f"done: v{event['version']} is current"
        return f"done: {event.get('message')}"
    if kind == "failed":
        return event["message"]
    if kind == "cancelled":
        return "cancelled"
    return None


def format_outcome(outcome: RoundOutcome, folder: str = "PROJECT") -> str:
    lines = [f"round {outcome.round}: {outcome.status}: {outcome.message}"]
    m = outcome.metrics
    if m:

        def fmt(value):
            return "n/a" if value is None else f"{value:.4f}"

        lines.append(
            f"validation Dice {fmt(m.get('validation_dice'))} (base "
            f"{fmt(m.get('base_validation_dice'))}) on {m.get('validation_patches')} patches; "
            f"{m.get('train_patches')} training patches"
            + (f" and {m['train_answers']} answers" if m.get("train_answers") else "")
            + f", {m.get('steps')} steps, {m.get('seconds')} s"
        )
        if "answer_precision" in m:
            lines.append(
                f"precision on {m.get('held_out_answers')} held-out answers "
                f"{fmt(m.get('answer_precision'))} of {m.get('answer_precision_n')} predicted "
                f"(base {fmt(m.get('base_answer_precision'))} of "
                f"{m.get('base_answer_precision_n')})"
            )
    if outcome.status == "done" and not outcome.current:
        lines.append(
            f"to make v{outcome.version} current anyway: napari-pvs project rollback {folder} "
            f"v{outcome.version}"
        )
    if outcome.stop_hint:
        lines.append(f"hint: {outcome.stop_hint}")
    return "\n".join(lines)


def _distributed(device: str):
    """torchrun's process group when WORLD_SIZE > 1 (``training.distributed_context``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return contextlib.nullcontext(None)
    from napari_pvs import training

    context = getattr(training, "distributed_context", None)
    if context is None:
        raise ValueError(
            "this napari-pvs cannot train on several processes (no "
            "training.distributed_context); run without torchrun"
        )
    return context(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m napari_pvs.rounds",
        description="Run one fine-tuning round of an annotation project in this process "
        "(under torchrun: on several processes, rank 0 commits).",
    )
    add_round_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"napari-pvs round: error: {exc}", file=sys.stderr)
        return 2


def run_command(args: argparse.Namespace) -> int:
    """What ``napari-pvs round`` and ``python -m napari_pvs.rounds`` do: one round, printed.

    Exit status 0 when the round is done, 1 when it failed or was cancelled.
    """
    config = config_from_args(args)
    with _distributed(config.device) as context:
        if context is None or not context.distributed:
            return _run_alone(args.project, config)
        return _run_distributed(args.project, config, context)


def _run_alone(folder: str, config: RoundConfig) -> int:
    from napari_pvs.progress import TerminalProgress
    from napari_pvs.project import Project

    bar = TerminalProgress()

    def show(event: Event) -> None:
        line = format_event(event)
        if line:
            print(line, flush=True)

    def progress(done: int, total: int, message: str) -> None:
        if total:
            bar(done, total, message)

    with Project.open(folder) as project:
        outcome = run_round(project, config, progress, on_event=show)
    print(format_outcome(outcome, folder), flush=True)
    return 0 if outcome.status == "done" else 1


def _run_distributed(folder: str, config: RoundConfig, context) -> int:
    """Rank 0 prepares and commits; every rank trains its share; only rank 0 writes."""
    import torch.distributed as dist

    from napari_pvs.project import Project

    project = Project.open(folder) if context.is_main else None
    config.device = context.device
    holder: list[Any] = [None]
    try:
        if project is not None:
            try:
                holder[0] = {"plan": prepare_round(project, config)}
            except Exception as exc:
                holder[0] = {"error": str(exc)}
        dist.broadcast_object_list(holder, src=0)
        if "error" in holder[0]:
            if context.is_main:
                print(f"napari-pvs round: error: {holder[0]['error']}", file=sys.stderr)
            return 2
        plan = holder[0]["plan"]
        if project is None:
            execute_round(plan, main=False, device=context.device)
            return 0
        log = EventLog(Path(plan["folder"]) / "events.jsonl")

        def emit(event: Event) -> None:
            log.write(event)
            line = format_event(event)
            if line:
                print(line, flush=True)

        try:
            result = execute_round(plan, emit, device=context.device)
            outcome = commit_round(project, plan, result)
        except Cancelled:
            outcome = abandon_round(project, plan, "cancelled", "cancelled")
        except Exception as exc:
            outcome = abandon_round(project, plan, "failed", f"failed: {type(exc).__name__}: {exc}")
        finally:
            log.close()
        print(format_outcome(outcome, folder), flush=True)
        return 0 if outcome.status == "done" else 1
    finally:
        if project is not None:
            project.close()

"""The round command: one fine-tuning round of an annotation project."""

from __future__ import annotations

import argparse


def add_round(subparsers: argparse._SubParsersAction) -> None:
    from napari_pvs.rounds import add_round_arguments

    parser = subparsers.add_parser(
        "round",
        help="fine-tune a project's current model on its accepted patches (a new version)",
        description=(
            "Freeze the accepted patches, fine-tune the current version on the training ones, "
            "score it on the fixed validation patches, make it the current version, re-predict "
            "and re-rank the volumes. A failed or interrupted round leaves the previous version "
            "current. On several GPUs: torchrun --nproc_per_node N -m napari_pvs.rounds DIR."
        ),
    )
    add_round_arguments(parser)
    parser.set_defaults(func=_round)


def _round(args: argparse.Namespace) -> int:
    from napari_pvs.rounds import run_command

    _check_round_arguments(args)
    return run_command(args)


def _check_round_arguments(args: argparse.Namespace) -> None:
    """Names and sizes against what the project's model and volumes allow, before any work."""
    from napari_pvs import limits
    from napari_pvs.project import Project

    if args.strategy is not None:
        limits.check_strategy(args.strategy)
    if args.n is not None:
        limits.check_count(args.n)
    limits.check_count(args.steps, "--steps")
    limits.check_count(args.batch_size, "--batch-size")
    with Project.open(args.project, readonly=True) as project:
        shapes = [v.shape for v in project.volumes()]
        divisor = limits.model_size_divisor(project.checkpoint_path())
    limits.check_training_patch(args.patch, shapes, divisor)

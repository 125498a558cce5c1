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

    return run_command(args)

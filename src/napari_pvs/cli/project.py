"""The project command group: init, add, remove, status, queue, accept, versions, rollback,
export (and candidates, answer: :mod:`napari_pvs.cli.candidates`).

A volume is named by ``#ID`` (or ``--id ID``), by its name, or by the path it was added with
(:meth:`napari_pvs.project.Project.find_volume`). Sizes and names are checked before any work
(:mod:`napari_pvs.limits`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from napari_pvs.cli._common import UserError
from napari_pvs.cli.candidates import add_candidate_commands


def add_project(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "project",
        help="an annotation project: volumes, reviewed patches, model versions (active learning)",
        description=(
            "An annotation project is a folder with a durable ledger of volumes, reviewed "
            "patches and model versions. The loop: init, add volumes, queue (rank patches to "
            "review), accept corrected patches, 'napari-pvs round' to fine-tune, repeat."
        ),
    )
    commands = parser.add_subparsers(dest="project_command", metavar="ACTION", required=True)

    init = commands.add_parser("init", help="create a project folder")
    init.add_argument("project", metavar="DIR", help="new (or empty) folder")
    init.add_argument("--model", default="default", help="'default' or a checkpoint (version 0)")
    init.add_argument("--seed", type=int, default=0, help="seed of the validation split rule")
    init.add_argument(
        "--validation-fraction",
        type=float,
        default=0.25,
        help="share of accepted patches kept for validation (0-0.5, default 0.25)",
    )
    init.add_argument(
        "--validation-max", type=int, default=8, help="at most this many validation patches"
    )
    init.set_defaults(func=_init)

    add = commands.add_parser("add", help="add volumes (NIfTI, zarr, OME-Zarr) by reference")
    add.add_argument("project", metavar="DIR")
    add.add_argument("volumes", nargs="+", metavar="VOLUME")
    add.add_argument(
        "--modality",
        choices=["T1", "T2"],
        help="the volumes' contrast (default: guessed from each image, then its name)",
    )
    add.set_defaults(func=_add)

    remove = commands.add_parser(
        "remove",
        help="take a volume out of the project (its reviewed labels and history are kept)",
    )
    remove.add_argument("project", metavar="DIR")
    _volume_argument(remove)
    remove.set_defaults(func=_remove)

    repair = commands.add_parser(
        "repair",
        help="move damaged label chunks aside, keeping every intact annotation",
        description=(
            "A label store with a damaged chunk makes that volume's labels read-only. Repair "
            "moves each unreadable chunk to DIR/damaged/<time>/ (nothing is deleted), marks "
            "its voxels unreviewed, names the annotations that overlapped it, and makes the "
            "labels writable again."
        ),
    )
    repair.add_argument("project", metavar="DIR")
    repair.set_defaults(func=_repair)

    status = commands.add_parser(
        "status", help="volumes, reviewed patches, answers, versions, rounds"
    )
    status.add_argument("project", metavar="DIR")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=_status)

    from napari_pvs.ranking import STRATEGIES

    queue = commands.add_parser(
        "queue", help="rank patches to review with the current model (predicts first if needed)"
    )
    queue.add_argument("project", metavar="DIR")
    queue.add_argument("--strategy", choices=STRATEGIES, help="default: the project setting")
    queue.add_argument("--n", type=int, help="patches per volume (default: project setting)")
    queue.add_argument("--patch", type=int, help="patch edge in voxels (default: setting)")
    queue.add_argument(
        "--volume", nargs="+", help="volumes: names, #ids or added paths (default: all)"
    )
    queue.add_argument("--seed", type=int, default=0, help="seed of the random strategies")
    queue.set_defaults(func=_queue)

    accept = commands.add_parser("accept", help="accept the reviewed labels of one patch")
    accept.add_argument("project", metavar="DIR")
    _volume_argument(accept)
    accept.add_argument(
        "--box",
        type=int,
        nargs=6,
        required=True,
        metavar=("Z0", "Y0", "X0", "Z1", "Y1", "X1"),
        help="start and stop voxel indices (stop exclusive), in the volume's axis order",
    )
    accept.add_argument(
        "--labels", required=True, help="the patch: .npy or .nii/.nii.gz of 0 and 1, box-sized"
    )
    accept.add_argument("--annotator", default="", help="who reviewed it")
    accept.add_argument("--seconds", type=float, help="time spent reviewing")
    accept.add_argument("--patch-id", type=int, help="the queued patch this answers")
    accept.set_defaults(func=_accept)

    add_candidate_commands(commands)

    versions = commands.add_parser("versions", help="model versions with their metrics")
    versions.add_argument("project", metavar="DIR")
    versions.set_defaults(func=_versions)

    rollback = commands.add_parser("rollback", help="make an earlier version current again")
    rollback.add_argument("project", metavar="DIR")
    rollback.add_argument("version", metavar="vN")
    rollback.set_defaults(func=_rollback)

    export = commands.add_parser(
        "export", help="labels, segmentations and the PVS burden table (CSV) of every volume"
    )
    export.add_argument("project", metavar="DIR")
    export.add_argument("--out", help="output folder (default DIR/exports/v<current>)")
    export.add_argument("--format", choices=["nifti", "ome-zarr"], default="nifti")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    export.set_defaults(func=_export)


def _volume_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "volume",
        metavar="VOLUME",
        nargs="?",
        help="the volume's name, #ID, or the path it was added with",
    )
    parser.add_argument("--id", type=int, metavar="ID", help="the volume's id (instead of VOLUME)")


def _volume_of(project, args: argparse.Namespace):
    """The volume ``VOLUME`` or ``--id`` names (exactly one of them)."""
    if (args.volume is None) == (args.id is None):
        raise UserError("name the volume: VOLUME (a name, #ID or its path) or --id ID, not both")
    if args.id is not None:
        return project.find_volume(args.id, by_id=True)
    return project.find_volume(args.volume)


def _open(path: str, readonly: bool = False):
    from napari_pvs.project import Project

    return Project.open(path, readonly=readonly)


def _init(args: argparse.Namespace) -> int:
    from napari_pvs.project import Project

    try:
        project = Project.create(
            args.project,
            model=args.model,
            seed=args.seed,
            validation_fraction=args.validation_fraction,
            validation_max=args.validation_max,
        )
    except FileExistsError as exc:
        raise UserError(str(exc)) from exc
    with project:
        print(f"created project {project.path} with {args.model} as v0")
    return 0


def _add(args: argparse.Namespace) -> int:
    from napari_pvs import io, limits
    from napari_pvs.modality import guess_volume_modality

    for path in args.volumes:  # every volume checked before any is added
        volume = io.open_volume(path, modality=args.modality, check_finite=False)
        limits.check_volume_shape(volume.shape, path)
    with _open(args.project) as project:
        for path in args.volumes:
            modality = args.modality
            if modality is None:  # never "unknown" in silence: the image, then the name
                guess = guess_volume_modality(path)
                if guess.confident:
                    modality = guess.modality
                    print(f"{path}: {guess.modality} ({guess.reason})")
                else:
                    print(
                        f"napari-pvs project add: warning: {path}: cannot tell T1 from T2 "
                        f"({guess.reason}); add it again with --modality T1 or --modality T2",
                        file=sys.stderr,
                    )
            record = project.add_volume(path, modality=modality)
            shape = "x".join(map(str, record.shape))
            print(f"added volume {record.id} {record.name!r}: {shape}, {record.modality}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    with _open(args.project) as project:
        record = _volume_of(project, args)
        reviewed = sum(1 for a in project.annotations() if a.volume_id == record.id)
        archive = project.remove_volume(record.id)
    print(
        f"removed volume #{record.id} {record.name!r} ({record.path}) from the project; its "
        f"{reviewed} reviewed patch(es) stay in the project's history and their labels in "
        f"{archive}; add the file again to work on it"
    )
    return 0


def _repair(args: argparse.Namespace) -> int:
    with _open(args.project) as project:
        reports = project.repair()
    if not reports:
        print("no damaged label store found; nothing to repair")
    for report in reports:
        print(f"volume #{report['volume']} {report['name']!r}: moved {len(report['moved'])} "
              "damaged part(s) aside:")  # fmt: skip
        for path in report["moved"]:
            print(f"  {path}")
        if report["annotations_touched"]:
            ids = ", ".join(map(str, report["annotations_touched"]))
            print(f"  annotations {ids} overlapped them: review those patches again")
    return 0


def _status(args: argparse.Namespace) -> int:
    from napari_pvs.project import ProjectLocked

    try:  # for writing when no one else writes: a killed round or accept is repaired first
        project = _open(args.project)
    except (ProjectLocked, OSError):  # held elsewhere, or a read-only folder or disk
        project = _open(args.project, readonly=True)
    with project:
        status = project.status()
    if args.json:
        print(json.dumps(status, indent=1, default=str))
        return 0
    print(f"project {status['path']} (schema {status['schema_version']})")
    print(f"{'id':>3} {'volume':<24} {'shape':<14} {'reviewed':>8} {'val':>4} {'queue':>5} "
          f"{'answers':>7} {'open':>5}")  # fmt: skip
    for v in status["volumes"]:
        shape = "x".join(map(str, v["shape"]))
        print(
            f"{v['id']:>3} {v['name']:<24} {shape:<14} {v['annotations']:>8} "
            f"{v['validation']:>4} {v['queue_new']:>5} {v['answers']:>7} {v['candidates_open']:>5}"
        )
    answers = status["answers"]
    patches = sum(v["annotations"] for v in status["volumes"])
    print(
        f"reviewed patches: {patches}; answers: {answers['total']} (yes {answers['yes']}, "
        f"no {answers['no']}, skipped {answers['skipped']}; held out {answers['held_out']})"
    )
    print(_versions_table(status["versions"]))
    for r in status["rounds"][-5:]:
        print(f"round {r['id']}: {r['status']} ({r['annotations']} annotations): {r['message']}")
    if status["stop_hint"]:
        print(f"hint: {status['stop_hint']}")
    return 0


def _versions_table(rows: list[dict]) -> str:
    def number(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    lines = [f"  {'version':<8} {'parent':<7} {'round':<6} {'status':<7} {'val Dice':>9} "
             f"{'base':>7} {'val':>4} {'train':>5}  created"]  # fmt: skip
    for row in rows:
        mark = "*" if row["current"] else " "
        parent = "-" if row["parent"] is None else f"v{row['parent']}"
        lines.append(
            f"{mark} v{row['version']:<7} {parent:<7} {row['round'] or '-'!s:<6} "
            f"{row['status']:<7} {number(row.get('validation_dice')):>9} "
            f"{number(row.get('base_validation_dice')):>7} "
            f"{row.get('validation_patches', '-')!s:>4} {row.get('train_patches', '-')!s:>5}  "
            f"{row['created']}"
        )
    lines.append("  (* = current)")
    return "\n".join(lines)


def _queue(args: argparse.Namespace) -> int:
    from napari_pvs import limits
    from napari_pvs.cli import error_sentence
    from napari_pvs.progress import TerminalProgress

    if args.strategy is not None:
        limits.check_strategy(args.strategy)
    if args.n is not None:
        limits.check_count(args.n)
    with _open(args.project) as project:
        refs = args.volume or [v.id for v in project.volumes()]
        if not refs:
            raise UserError("the project has no volumes; add some with 'napari-pvs project add'")
        version = project.current_version().version
        records = [project.find_volume(ref) for ref in refs]
        if args.patch is not None:  # every volume checked before any is ranked
            divisor = limits.model_size_divisor(project.checkpoint_path())
            for record in records:
                limits.check_volume_shape(record.shape, record.name)
                limits.check_patch(args.patch, record.shape, divisor, record.name)
        skipped = []
        for record in records:
            try:
                queue = _rank_one(project, record, args, TerminalProgress())
            except Exception as exc:  # rank the others; name this one at the end
                sentence = error_sentence(exc)
                if sentence is None:
                    raise
                skipped.append((record, sentence))
                continue
            print(f"{record.name}: {len(queue)} patches to review (v{version})")
            print(f"  {'id':>5} {'rank':>4} {'score':>9} {'pvs':>4}  box (start..stop)")
            for p in queue:
                print(
                    f"  {p.id:>5} {p.rank:>4} {p.score:>9.5f} {p.predicted_pvs:>4}  "
                    f"{' '.join(map(str, p.start))} .. {' '.join(map(str, p.stop))}"
                )
    if skipped:
        raise UserError(
            f"{len(skipped)} of {len(records)} volume(s) could not be ranked (the others "
            "were): " + "; ".join(f"#{r.id} {r.name}: {why}" for r, why in skipped)
        )
    return 0


def _rank_one(project, record, args: argparse.Namespace, progress):
    return project.rank(
        record.id,
        strategy=args.strategy,
        n=args.n,
        patch=args.patch,
        seed=args.seed,
        progress=progress,
    )


def _load_patch(path: str):
    import numpy as np

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"labels file {file} does not exist")
    name = file.name.lower()
    if name.endswith(".npy"):
        try:
            return np.load(file, allow_pickle=False)
        except ValueError as exc:
            raise UserError(f"{file} is not a plain .npy array ({exc})") from exc
    if name.endswith((".nii", ".nii.gz")):
        from napari_pvs.io import open_labels

        return np.asarray(open_labels(file).data)
    raise UserError(f"{file}: --labels must be a .npy or .nii/.nii.gz file")


def _accept(args: argparse.Namespace) -> int:
    labels = _load_patch(args.labels)
    with _open(args.project) as project:
        annotation = project.accept(
            _volume_of(project, args).id,
            args.box[:3],
            args.box[3:],
            labels,
            annotator=args.annotator,
            seconds=args.seconds,
            patch_id=args.patch_id,
        )
    kind = "empty (background)" if annotation.empty else f"{annotation.pvs_voxels} PVS voxels"
    print(f"accepted annotation {annotation.id} ({annotation.split}): {kind}")
    return 0


def _versions(args: argparse.Namespace) -> int:
    with _open(args.project, readonly=True) as project:
        print(_versions_table(project.compare()))
        hint = project.stop_hint()
    if hint:
        print(f"hint: {hint}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    with _open(args.project) as project:
        before = project.current_version().version
        project.rollback(args.version)
        print(f"current version: v{project.current_version().version} (was v{before})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from napari_pvs.progress import TerminalProgress

    with _open(args.project) as project:
        try:
            result = project.export(
                args.out, format=args.format, overwrite=args.overwrite, progress=TerminalProgress()
            )
        except FileExistsError as exc:
            raise UserError(str(exc)) from exc
    print(f"exported to {result['folder']}:")
    for file in result["files"]:
        print(f"  {file.name}")
    print(f"  {'volume':<20} {'region':<14} {'count':>6} {'volume mm3':>11}")
    for row in result["burden"]:
        print(
            f"  {row['volume']:<20} {row['region']:<14} {row['count']:>6} {row['volume_mm3']:>11}"
        )
    return 0

"""``napari-pvs project candidates`` and ``napari-pvs project answer``: yes/no review of
predicted clusters from the command line (the same Project methods as the Review step's
Candidates mode: :meth:`~napari_pvs.project.Project.refresh_candidates`,
:meth:`~napari_pvs.project.Project.answer`, :meth:`~napari_pvs.project.Project.undo_answer`).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from napari_pvs.atomic import os_user
from napari_pvs.cli._common import UserError

#: Mirrors napari_pvs.candidates.ORDERS and project.answers.ANSWERS (not imported: `--help`
#: stays free of numpy/zarr; tests/test_candidates.py checks they agree).
ORDERS = ("uncertain", "size", "region")
ANSWERS = ("yes", "no", "skip")
CSV_COLUMNS = ("candidate", "answer", "annotator")


def add_candidate_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``candidates`` and ``answer`` to the ``project`` command group."""
    listing = commands.add_parser(
        "candidates",
        help="list predicted PVS clusters to confirm or reject (yes/no review)",
        description=(
            "Every connected PVS cluster of a volume's current prediction is a candidate; "
            "clusters touching reviewed patches or earlier answers are left out. Candidates "
            "are found again (--refresh) when a new version predicts the volume; the "
            "prediction is made first when it is missing."
        ),
    )
    listing.add_argument("project", metavar="DIR")
    listing.add_argument(
        "volume", metavar="VOLUME", nargs="?", help="a name, #ID or added path (default: all)"
    )
    listing.add_argument("--n", type=int, help="list at most this many per volume (default: all)")
    listing.add_argument(
        "--refresh",
        action="store_true",
        help="find the candidates again from the current prediction (done anyway when the "
        "volume has none of the current version)",
    )
    listing.add_argument(
        "--order",
        choices=ORDERS,
        default=ORDERS[0],
        help="ask order when finding them: most uncertain first, size terciles interleaved, or "
        "regions interleaved (needs the volume's region map)",
    )
    listing.set_defaults(func=_candidates)

    answer = commands.add_parser(
        "answer",
        help="answer candidates yes (a PVS), no (not a PVS) or skip; --from a CSV; --undo",
        description=(
            "yes labels the cluster's unreviewed voxels PVS, no labels them background; the "
            "rest of its box stays unreviewed. Each answer is saved durably before the "
            "command goes on. --from FILE answers many: a CSV with the header "
            "candidate,answer[,annotator]; every row is checked before any is written."
        ),
    )
    answer.add_argument("project", metavar="DIR")
    answer.add_argument("candidate", metavar="CANDIDATE", nargs="?", type=int,
                        help="the candidate's id (napari-pvs project candidates)")  # fmt: skip
    answer.add_argument("answer", metavar="yes|no|skip", nargs="?", help="the answer")
    answer.add_argument(
        "--annotator",
        default=os_user(),
        help="who answers (recorded with each answer; a CSV's annotator column overrides it)",
    )
    answer.add_argument("--seconds", type=float, help="time spent on this answer")
    answer.add_argument("--from", dest="from_csv", metavar="CSV", help="answers from a CSV file")
    answer.add_argument(
        "--undo",
        nargs="?",
        const=-1,
        type=int,
        metavar="ANSWER",
        help="undo an answer (its voxels become unreviewed again): the given id, or the latest",
    )
    answer.set_defaults(func=_answer)


def _open(path: str):
    from napari_pvs.project import Project

    return Project.open(path)


def _candidates(args: argparse.Namespace) -> int:
    from napari_pvs import limits
    from napari_pvs.progress import TerminalProgress

    if args.n is not None:
        limits.check_count(args.n)
    with _open(args.project) as project:
        records = (
            [project.find_volume(args.volume)] if args.volume is not None else project.volumes()
        )
        if not records:
            raise UserError("the project has no volumes; add some with 'napari-pvs project add'")
        version = project.current_version().version
        for record in records:
            if args.refresh or not project.candidates_current(record.id):
                if not project.has_prediction(record.id):
                    print(f"{record.name}: predicting with v{version}")
                    project.predict(record.id, progress=TerminalProgress())
                project.refresh_candidates(record.id, order=args.order)
            rows = project.candidates(record.id, status=("open", "skipped"), n=args.n)
            counts = {s: 0 for s in ("open", "skipped")}
            for c in project.candidates(record.id, status=("open", "skipped")):
                counts[c.status] += 1
            print(f"{record.name}: {counts['open']} open, {counts['skipped']} skipped "
                  f"candidate(s) (v{version})")  # fmt: skip
            print(f"  {'id':>5} {'rank':>4} {'centre (z y x)':<18} {'voxels':>6} {'mm3':>8} "
                  f"{'prob':>5} {'uncert':>6}  status")  # fmt: skip
            for c in rows:
                centre = " ".join(f"{v:.0f}" for v in c.centre)
                print(
                    f"  {c.id:>5} {c.rank:>4} {centre:<18} {c.voxels:>6} {c.volume_mm3:>8.2f} "
                    f"{c.mean_probability:>5.2f} {c.uncertainty:>6.3f}  {c.status}"
                )
    return 0


def _answer(args: argparse.Namespace) -> int:
    modes = [args.from_csv is not None, args.undo is not None, args.candidate is not None]
    if sum(modes) != 1:
        raise UserError("give one of: CANDIDATE yes|no|skip, --from CSV, or --undo [ANSWER]")
    annotator = (args.annotator or "").strip()
    if args.undo is not None:
        return _undo(args, annotator)
    if args.from_csv is not None:
        if args.answer is not None or args.seconds is not None:
            raise UserError("--from CSV takes no CANDIDATE, answer or --seconds")
        return _answer_csv(args, annotator)
    if args.answer not in ANSWERS:
        raise UserError(f"answer CANDIDATE with one of {', '.join(ANSWERS)}, got {args.answer!r}")
    if not annotator:
        raise UserError("the annotator is empty; pass --annotator NAME")
    with _open(args.project) as project:
        record = project.answer(
            args.candidate, args.answer, annotator=annotator, seconds=args.seconds
        )
    print(_answered(record))
    return 0


def _answered(record) -> str:
    if record.answer == "skip":
        return f"skipped candidate {record.candidate_id} (answer {record.id}): asked again later"
    what = "PVS" if record.answer == "yes" else "background"
    return (
        f"answered candidate {record.candidate_id} {record.answer} (answer {record.id}, "
        f"{record.split}): {record.voxels_written} voxels labelled {what}"
    )


def _undo(args: argparse.Namespace, annotator: str) -> int:
    if args.answer is not None or args.seconds is not None:
        raise UserError("--undo takes no CANDIDATE, answer or --seconds (an answer id: --undo ID)")
    if not annotator:
        raise UserError("the annotator is empty; pass --annotator NAME")
    with _open(args.project) as project:
        record = project.undo_answer(None if args.undo < 0 else args.undo, annotator=annotator)
    if record is None:
        print("no answer to undo")
        return 0
    print(
        f"undid answer {record.id} ({record.answer} on candidate {record.candidate_id}): "
        f"{record.voxels_written} voxels are unreviewed again; the candidate is open"
    )
    return 0


def _read_csv(path: Path, annotator: str) -> list[tuple[int, int, str, str]]:
    """The CSV's rows as (line, candidate, answer, annotator); a bad row names its line."""
    if not path.is_file():
        raise UserError(f"answers file {path} does not exist")
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if header[:2] != list(CSV_COLUMNS[:2]) or not set(header) <= set(CSV_COLUMNS):
            raise UserError(
                f"{path} line 1: the header must be candidate,answer or "
                f"candidate,answer,annotator, got {','.join(header) or 'nothing'}"
            )
        reader.fieldnames = header
        rows = []
        for row in reader:
            line = reader.line_num
            if None in row:
                raise UserError(f"{path} line {line}: more values than columns")
            text = (row.get("candidate") or "").strip()
            try:
                candidate = int(text)
            except ValueError:
                raise UserError(
                    f"{path} line {line}: candidate must be an id number, got {text!r}"
                ) from None
            answer = (row.get("answer") or "").strip().lower()
            if answer not in ANSWERS:
                raise UserError(
                    f"{path} line {line}: answer must be one of {', '.join(ANSWERS)}, "
                    f"got {answer!r}"
                )
            who = (row.get("annotator") or "").strip() or annotator
            if not who:
                raise UserError(
                    f"{path} line {line}: no annotator (fill the annotator column or pass "
                    "--annotator NAME)"
                )
            rows.append((line, candidate, answer, who))
    if not rows:
        raise UserError(f"{path} holds no answers (only a header, or nothing)")
    return rows


def _answer_csv(args: argparse.Namespace, annotator: str) -> int:
    path = Path(args.from_csv)
    rows = _read_csv(path, annotator)
    with _open(args.project) as project:
        seen: dict[int, int] = {}
        for line, candidate, _answer, _who in rows:  # every row checked before any is written
            if candidate in seen:
                raise UserError(
                    f"{path} line {line}: candidate {candidate} is answered twice (also on line "
                    f"{seen[candidate]})"
                )
            seen[candidate] = line
            try:
                record = project.candidate(candidate)
            except ValueError as exc:
                raise UserError(f"{path} line {line}: {exc}") from None
            if record.status not in ("open", "skipped"):
                raise UserError(
                    f"{path} line {line}: candidate {candidate} is {record.status!r}, not open "
                    "(undo its answer first, or refresh the candidates if it is stale)"
                )
        counts = dict.fromkeys(ANSWERS, 0)
        for _line, candidate, answer, who in rows:
            project.answer(candidate, answer, annotator=who, seconds=None)
            counts[answer] += 1
    print(
        f"answered {len(rows)} candidate(s) from {path}: {counts['yes']} yes, {counts['no']} "
        f"no, {counts['skip']} skipped"
    )
    return 0

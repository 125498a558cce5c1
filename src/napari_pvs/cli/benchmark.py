"""The benchmark command group: labelling efficiency of the queue, and data to run it on."""

from __future__ import annotations

import argparse
import json
import sys

from napari_pvs.cli._common import UserError

DEFAULT_STRATEGIES = "bald,entropy,stratified,clasp,diverse,fg-random,random"


def add_benchmark(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "benchmark",
        help="product benchmarks: labelling efficiency of the annotation queue",
        description="Benchmarks that run the product's own loop end to end.",
    )
    commands = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    _add_active_learning(commands)
    _add_make_data(commands)


def _add_active_learning(commands: argparse._SubParsersAction) -> None:
    from napari_pvs.benchmark.config import (
        BENCHMARK_ONLY,
        SECONDS_PER_ANSWER,
        SECONDS_PER_PATCH,
    )
    from napari_pvs.ranking import STRATEGIES

    parser = commands.add_parser(
        "active-learning",
        help="how many reviewed patches each queue strategy needs (simulated annotator)",
        description=(
            "A simulated annotator reviews the patches each strategy queues, through the same "
            "project accept a person's review uses; every round trains (by default the start "
            "model on all labelled patches, to convergence), re-predicts and scores the new "
            "version on the test volumes with the product's segmentation rule. Full supervision "
            "(every patch of the pool, the same rule) is the reference. Writes "
            "OUT/learning_curve.csv, OUT/learning_curve.png and OUT/summary.json, and ends with "
            "'reference converged: yes|no' and three lines per strategy: 'S: N patches to 95%', "
            "'S: gap closed G' and 'S: error yield X (clusters Y)'. The strategy 'candidates' "
            "reviews by yes/no instead: each round the annotator answers --answers-per-round "
            "of the predicted clusters the project proposes (yes when at least half of the "
            "cluster is ground-truth PVS) and the round trains on them by the same rule; it "
            "ends with 'candidates: precision A -> B, recall C -> D after K answers' (test "
            "volumes, cluster level, start -> last round), the same precision at the start's "
            "recall (the threshold swept on the test volumes: a model that only became more "
            "conservative gains nothing there) and its Dice against the patch "
            "strategies' at equal annotator-minutes (--seconds-per-patch, "
            "--seconds-per-answer; the curves in OUT/annotator_minutes.png)."
        ),
    )
    parser.add_argument("--pool-images", nargs="+", required=True, help="volumes to query from")
    parser.add_argument(
        "--pool-labels",
        nargs="+",
        help="their complete 0/1 ground truth (default: each OME-Zarr image's labels/pvs)",
    )
    parser.add_argument("--test-images", nargs="+", required=True, help="volumes to score on")
    parser.add_argument(
        "--test-labels", nargs="+", help="their ground truth (default: labels/pvs of each image)"
    )
    parser.add_argument(
        "--regions",
        nargs="+",
        help="region maps of the test images for per-region Dice (1 white matter, 2 basal "
        "ganglia), e.g. TEST.zarr/labels/regions",
    )
    parser.add_argument(
        "--strategies",
        default=DEFAULT_STRATEGIES,
        help=f"comma-separated, each NAME[:noise=T][:decay=D][:share=F] (patch strategies: "
        f"{', '.join(STRATEGIES)}; yes/no review of predicted clusters: "
        f"{', '.join(BENCHMARK_ONLY)}; default {DEFAULT_STRATEGIES})",
    )
    parser.add_argument(
        "--answers-per-round", type=int, default=25,
        help="candidates: yes/no answers per round (one in five is held out, never trained on)",
    )  # fmt: skip
    parser.add_argument(
        "--seconds-per-patch", type=float, default=SECONDS_PER_PATCH,
        help="cost model: annotator seconds per reviewed patch (default 120: checking and "
        "correcting the 32 slices of a prefilled 32^3 patch at about 3-4 s a slice)",
    )  # fmt: skip
    parser.add_argument(
        "--seconds-per-answer", type=float, default=SECONDS_PER_ANSWER,
        help="cost model: annotator seconds per yes/no answer (default 3: one look at a "
        "cluster shown centred in three planes and one key; the next one is on screen at once)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=8, help="patches reviewed per round")
    parser.add_argument("--patch", type=int, default=32, help="patch edge in voxels")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 (default 3)")
    parser.add_argument(
        "--init",
        default="default",
        help="start model: 'default' (the bundled one), 'scratch' (untrained, first trained on "
        "the initial patches) or a checkpoint",
    )
    parser.add_argument(
        "--tune-start", action="store_true",
        help="train the start model on the initial patches (the label-limited budget) before "
        "round 1, so that round 0 is a model that has seen them and each round measures only "
        "what its own labels add ('scratch' always does)",
    )  # fmt: skip
    parser.add_argument(
        "--retrain",
        choices=["start", "current"],
        default="start",
        help="'start' (default, label-limited): every round trains the start model on all "
        "patches so far to convergence; 'current': each round fine-tunes the current version "
        "--steps steps (the product's loop, step-limited: the old protocol)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="--retrain start: the base of each round's step budget (default 150); --retrain "
        "current: the steps of each round (default 50)",
    )
    parser.add_argument(
        "--steps-per-patch", type=int, default=10,
        help="--retrain start: budget steps added per training patch (default 10)",
    )  # fmt: skip
    parser.add_argument(
        "--max-steps", type=int, default=600, help="--retrain start: the budget's cap"
    )
    parser.add_argument(
        "--patience", type=int, default=3,
        help="--retrain start: validations without a better Dice before a round stops",
    )  # fmt: skip
    parser.add_argument(
        "--validate-every", type=int,
        help="--retrain start: steps between validations (default budget / 8, at least 25)",
    )  # fmt: skip
    parser.add_argument(
        "--full-steps",
        type=int,
        help="steps of the full-supervision run (default: the same budget rule on all pool "
        "patches, or rounds x steps with --retrain current)",
    )
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-4, help="fine-tuning learning rate")
    parser.add_argument(
        "--initial", type=int, default=4, help="patches every strategy starts with"
    )
    parser.add_argument(
        "--initial-strategy", choices=["random", "fg-random"], default="random",
        help="how the initial patches are picked (fg-random: the validation patches hold PVS)",
    )  # fmt: skip
    parser.add_argument(
        "--validation", type=int, default=2, help="of those, fixed validation patches"
    )
    parser.add_argument(
        "--test-tta", type=int, default=1, help="mirrorings when scoring (1: fast; the bundled "
        "model's rule says 4)",
    )
    parser.add_argument("--mc", type=int, default=8, help="MC-dropout samples of predictions")
    parser.add_argument(
        "--no-crop", action="store_true", help="predict whole volumes, not the tissue box"
    )
    parser.add_argument("--scratch-model", default="cross_modal", help="architecture for scratch")
    parser.add_argument("--scratch-config", default="{}", help="JSON model config for scratch")
    parser.add_argument("--modality", help="T1/T2: overrides what the files say")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", required=True, help="new or empty folder for everything")
    parser.set_defaults(func=_run_active_learning)


def _add_make_data(commands: argparse._SubParsersAction) -> None:
    from napari_pvs.benchmark import PRESETS

    parser = commands.add_parser(
        "make-data",
        help="phantoms outside the default model's training distribution (pool + test)",
        description=(
            "Write pool-<i>.zarr and test-<i>.zarr phantoms (OME-Zarr with labels/pvs and "
            "labels/regions) and data.json, and print how far outside the bundled model's "
            "training distribution they are, axis by axis."
        ),
    )
    parser.add_argument("--out", required=True, help="new or empty folder")
    parser.add_argument("--preset", choices=list(PRESETS), default="shifted")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="voxels (default: the preset's field of view; 160 192 160 for shifted)",
    )
    parser.add_argument("--pool", type=int, default=2, help="pool volumes (default 2)")
    parser.add_argument("--test", type=int, default=1, help="test volumes (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    parser.set_defaults(func=_run_make_data)


class _StepLog:
    """Progress for a long benchmark: one line per new message, on stderr."""

    def __init__(self) -> None:
        self.last = ""

    def __call__(self, done: int, total: int, message: str) -> None:
        if message != self.last:
            self.last = message
            where = f"[{done}/{total}] " if total else ""
            print(f"{where}{message}", file=sys.stderr, flush=True)


def _run_active_learning(args: argparse.Namespace) -> int:
    from napari_pvs.benchmark import (
        BenchmarkConfig,
        estimate_minutes,
        format_table,
        parse_strategies,
        run_benchmark,
    )
    from napari_pvs.benchmark.answers import format_answers
    from napari_pvs.benchmark.report import gap_warnings

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        scratch_config = json.loads(args.scratch_config)
    except json.JSONDecodeError as exc:
        raise UserError(f"--scratch-config is not valid JSON: {exc}") from exc
    if args.seeds < 1:
        raise UserError("--seeds must be at least 1")
    config = BenchmarkConfig(
        strategies=parse_strategies(args.strategies),
        rounds=args.rounds,
        per_round=args.per_round,
        patch=args.patch,
        seeds=list(range(args.seeds)),
        init=args.init,
        tune_start=args.tune_start,
        steps=args.steps if args.steps is not None else (150 if args.retrain == "start" else 50),
        retrain=args.retrain,
        steps_per_patch=args.steps_per_patch,
        max_steps=args.max_steps,
        patience=args.patience,
        validate_every=args.validate_every,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        initial=args.initial,
        initial_strategy=args.initial_strategy,
        validation=args.validation,
        full_steps=args.full_steps,
        test_tta=args.test_tta,
        mc_samples=args.mc,
        crop=not args.no_crop,
        scratch_model=args.scratch_model,
        scratch_config=scratch_config,
        device=args.device,
        modality=args.modality,
        answers_per_round=args.answers_per_round,
        seconds_per_patch=args.seconds_per_patch,
        seconds_per_answer=args.seconds_per_answer,
    )
    try:
        result = run_benchmark(
            args.pool_images,
            args.pool_labels or args.pool_images,
            args.test_images,
            args.test_labels or args.test_images,
            args.out,
            config,
            regions=args.regions,
            progress=_StepLog(),
        )
    except FileExistsError as exc:
        raise UserError(str(exc)) from exc
    summary = result.summary
    print(format_table(summary))
    print(format_answers(summary["answers"]))
    costs = summary["costs"]
    minutes = estimate_minutes(costs, 5, 3, 5)
    print(
        f"estimate for 5 strategies x 3 seeds x 5 rounds of {config.per_round} on these "
        f"volumes: {minutes:.0f} min (this run's mean costs per round, start and full "
        f"supervision; this run took {summary['seconds_total'] / 60:.1f} min)"
    )
    print(f"wrote {result.csv_path}, {result.png_path}, {result.summary_path}")
    if "png" in summary["answers"]:
        print(f"wrote {summary['answers']['png']} (Dice per annotator-minute)")
    for line in gap_warnings(summary):
        print(line)
    for line in result.lines:
        print(line)
    return 0


def _run_make_data(args: argparse.Namespace) -> int:
    from napari_pvs.benchmark import make_benchmark_data
    from napari_pvs.progress import TerminalProgress

    try:
        description = make_benchmark_data(
            args.out,
            preset=args.preset,
            shape=args.shape,
            pool=args.pool,
            test=args.test,
            overwrite=args.overwrite,
            progress=TerminalProgress(),
        )
    except FileExistsError as exc:
        raise UserError(f"{exc} (--overwrite)") from exc
    print(f"preset {description['preset']}: outside the default model's training data by")
    for line in description["shift"]:
        print(f"  {line}")
    print("pool: " + " ".join(description["pool"]))
    print("test: " + " ".join(description["test"]))
    regions = " ".join(f"{path}/labels/regions" for path in description["test"])
    print(
        "run: napari-pvs benchmark active-learning --pool-images "
        + " ".join(description["pool"])
        + " --test-images "
        + " ".join(description["test"])
        + f" --regions {regions} --out BENCH"
    )
    return 0

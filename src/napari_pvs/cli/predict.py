"""Prediction commands: predict (one volume or a cohort) and rank."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from napari_pvs.cli._common import UserError


def add_predict(subparsers: argparse._SubParsersAction) -> None:
    from napari_pvs.memory import MEMORY_POLICIES
    from napari_pvs.models import FLIP_COUNTS, PREDICTION_DEFAULTS

    parser = subparsers.add_parser(
        "predict",
        help="segment PVS in one or many volumes (chunked, resumable, with uncertainty)",
        description=(
            "Predict PVS probability, segmentation and (with --mc or --tta) entropy, mutual "
            "information and variance, chunk by chunk into a zarr group with the input's shape. "
            "One INPUT: OUT is the zarr group (or OUT.nii.gz: the segmentation as NIfTI with "
            "the input's affine, the full predictions kept beside it in OUT.zarr). Several "
            "INPUTs: OUT is a folder of groups, run as tasks on a local dask cluster or on "
            "--scheduler; a volume that fails is listed at the end and the others are still "
            "written (exit code 2 when any failed). Rerunning the same command resumes an "
            "interrupted run. OUT may not be an input; a store is locked while a run writes it."
        ),
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI, zarr or OME-Zarr")
    parser.add_argument("--out", required=True, help="output zarr group, .nii.gz, or folder")
    parser.add_argument(
        "--model",
        nargs="+",
        default=["default"],
        help="'default' or checkpoint path(s); several checkpoints form an ensemble",
    )
    parser.add_argument("--modality", choices=["T1", "T2"], help="override the input's modality")
    parser.add_argument(
        "--mc",
        type=int,
        default=PREDICTION_DEFAULTS["mc_samples"],
        metavar="T",
        help="Monte Carlo dropout samples (0 = off)",
    )
    parser.add_argument(
        "--tta",
        type=int,
        nargs="?",
        const=8,
        choices=FLIP_COUNTS,
        default=None,
        metavar="N",
        help="average N test-time mirrorings: 1 (none), 4 (one mirror per axis) or 8 (all; "
        "--tta alone). Default: the model's calibrated rule (the bundled model's is 4)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--float32",
        action="store_true",
        help="compute in float32 throughout (default: float16 on CUDA, bfloat16 on CPUs with "
        "native bfloat16, else float32)",
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="windows per batch (default: see docs)"
    )
    parser.add_argument(
        "--min-cluster-mm3",
        type=float,
        default=None,
        help="remove segmented clusters smaller than this (default: the model's calibrated "
        "value; 0 keeps every cluster)",
    )
    parser.add_argument(
        "--window", type=int, default=PREDICTION_DEFAULTS["window"], help="window edge"
    )
    parser.add_argument(
        "--overlap", type=float, default=PREDICTION_DEFAULTS["overlap"], help="window overlap"
    )
    parser.add_argument(
        "--memory",
        choices=MEMORY_POLICIES,
        default="reuse",
        help="reuse: keep freed memory for the next window (fast; default); return: hand it "
        "back at once (lowest peak, about 2x slower); system: leave the C allocator alone",
    )
    parser.add_argument("--scheduler", metavar="ADDRESS", help="dask scheduler, tcp://host:8786")
    parser.add_argument("--workers", type=int, help="local cluster workers (default: cores)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh, replacing OUT once the new prediction is complete (an interrupted "
        "--overwrite run resumes when rerun with --overwrite)",
    )
    parser.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from napari_pvs import atomic
    from napari_pvs.cohort import output_name, predict_cohort, predict_volume
    from napari_pvs.models import prediction_options
    from napari_pvs.progress import TerminalProgress

    if args.mc < 0:
        raise UserError("--mc must be 0 (off) or a positive number of samples")
    _check_sizes(args)
    options = prediction_options(  # the rule the Segment step and a project use too
        window=args.window,
        overlap=args.overlap,
        batch=args.batch,
        device=args.device,
        mc_samples=args.mc,
        tta=args.tta,
        amp=not args.float32,
        min_cluster_mm3=args.min_cluster_mm3,
        memory=args.memory,
    )
    model = args.model[0] if len(args.model) == 1 else args.model
    out = Path(args.out)
    nifti = out.name.lower().endswith((".nii", ".nii.gz"))
    if nifti and len(args.inputs) > 1:
        raise UserError("with several inputs --out must be a folder, not a NIfTI file")
    store = out.parent / output_name(out) if nifti else out
    # Before any work: no output onto an input, an existing NIfTI only with --overwrite (a
    # store may exist: it is resumed, or refused by the predictor), a writable folder.
    if nifti:
        atomic.check_output(out, inputs=args.inputs, overwrite=args.overwrite)
    if len(args.inputs) == 1:
        atomic.check_output(store, inputs=args.inputs, overwrite=True)
    modalities = _input_modalities(args.inputs, args.modality)
    if len(args.inputs) > 1 or args.scheduler:
        results = predict_cohort(
            args.inputs,
            out if len(args.inputs) > 1 else store.parent,
            model=model,
            modality=modalities,
            options=options,
            scheduler=args.scheduler,
            n_workers=args.workers,
            progress=TerminalProgress(),
            overwrite=args.overwrite,
            outs=None if len(args.inputs) > 1 else [store],
        )
    else:
        results = [
            predict_volume(
                args.inputs[0],
                store,
                model,
                modalities[0],
                options,
                progress=TerminalProgress(),
                overwrite=args.overwrite,
            )
        ]
    for result in results:
        for warning in result.warnings:
            print(f"napari-pvs predict: warning: {result.input}: {warning}", file=sys.stderr)
    if nifti and results[0].error is None:
        import dask.array as da
        import zarr

        from napari_pvs import io

        group = zarr.open_group(str(store), mode="r")
        affine = group.attrs["napari_pvs"]["affine"]
        io.save_nifti(
            out,
            da.from_zarr(group["segmentation"]),
            affine,
            overwrite=args.overwrite,
            inputs=args.inputs,
        )
    summary = [
        {
            "input": r.input,
            "out": r.out,
            "arrays": list(r.summary.arrays) if r.summary else [],
            "windows_run": r.summary.windows_run if r.summary else 0,
            "small_cluster_voxels_removed": (
                r.summary.small_cluster_voxels_removed if r.summary else 0
            ),
            "seconds": round(r.summary.seconds, 2) if r.summary else 0,
            "error": r.error,
        }
        for r in results
    ]
    if nifti:
        summary[0]["nifti"] = str(out)
    print(json.dumps(summary if len(summary) > 1 else summary[0], indent=2))
    failed = [r for r in results if r.error]
    if failed:  # listed last, where they are seen; every other volume was written
        print(
            f"napari-pvs predict: error: {len(failed)} of {len(results)} volume(s) failed:",
            file=sys.stderr,
        )
        for result in failed:
            print(f"  {result.input}: {result.error}", file=sys.stderr)
    return 2 if failed else 0


def _input_modalities(inputs: list[str], given: str | None) -> list[str]:
    """Each input's contrast, before any work: ``--modality``, else what the file says (our
    zarr attribute, a T1w/T2w name), else the image's confident guess (printed); an input
    whose contrast cannot be told stops the run with a sentence naming --modality."""
    if given is not None:
        return [given] * len(inputs)
    from napari_pvs import io
    from napari_pvs.modality import guess_modality

    modalities, unsure = [], []
    for path in inputs:
        try:
            volume = io.open_volume(path)
        except (ValueError, OSError):
            modalities.append("unknown")  # the run names what is wrong with it
            continue
        if volume.modality != "unknown":
            modalities.append(volume.modality)
            continue
        guess = guess_modality(volume.data, volume.spacing, name=path)
        if not guess.confident:
            unsure.append(f"{path}: cannot tell T1 from T2 ({guess.reason})")
        else:
            print(f"napari-pvs predict: {path}: {guess.modality} ({guess.reason})",
                  file=sys.stderr)  # fmt: skip
        modalities.append(guess.modality)
    if unsure:
        raise UserError(
            "; ".join(unsure) + "; the model needs the contrast: pass --modality T1 or "
            "--modality T2 (nothing was run)"
        )
    return modalities


def _check_sizes(args: argparse.Namespace) -> None:
    """--batch and --window against the model and (one input) the volume, before any work.

    With several inputs each volume's own shape is checked by the run of that volume, so one
    bad volume is listed at the end and the others are still written.
    """
    from napari_pvs import io, limits

    if args.batch is not None:
        limits.check_count(args.batch, "--batch")
    shape = None
    if len(args.inputs) == 1 and not args.scheduler:
        try:
            shape = io.open_volume(args.inputs[0], check_finite=False).shape
        except Exception:  # a missing or damaged input is reported by the run itself
            shape = None
    if shape is not None:
        limits.check_volume_shape(shape, args.inputs[0])
    model = args.model[0] if len(args.model) == 1 else args.model
    limits.check_window(
        args.window,
        limits.model_size_divisor(model),
        shape,
        batch=args.batch or 1,
        source=args.inputs[0],
    )


def add_rank(subparsers: argparse._SubParsersAction) -> None:
    from napari_pvs.ranking import (
        DEFAULT_MIN_TISSUE,
        DEFAULT_NOISE_DECAY,
        DEFAULT_PATCH,
        DEFAULT_STRATEGY,
        STRATEGIES,
    )

    parser = subparsers.add_parser(
        "rank",
        help="rank 3D patches of a prediction for annotation (uncertainty, stratified, random)",
        description=(
            "Score patches of a 'napari-pvs predict' output and write the top N, spread out "
            "(no overlap, no crowding) and skipping labelled patches, as PRED.ranking-"
            "STRATEGY.csv and .json beside the prediction."
        ),
    )
    parser.add_argument("prediction", metavar="PRED", help="zarr group from 'napari-pvs predict'")
    parser.add_argument("--n", type=int, default=20, help="patches to choose (default 20)")
    parser.add_argument("--patch", type=int, default=DEFAULT_PATCH, help="patch edge (32)")
    parser.add_argument("--stride", type=int, help="candidate spacing (default: the patch edge)")
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="default",
        help=f"queue strategy (default: 'default', the product's queue: {DEFAULT_STRATEGY})",
    )
    parser.add_argument(
        "--exclude",
        metavar="LABELS",
        help="label store (zarr, OME-Zarr labels, NIfTI): patches with labelled voxels are skipped",
    )
    parser.add_argument(
        "--unlabelled-value",
        type=int,
        default=255,
        help="the value meaning 'not labelled' in LABELS (default 255; use 0 for plain masks)",
    )
    parser.add_argument(
        "--min-distance", type=float, help="min centre distance in voxels (default 1.5 x patch)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the random strategies")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing ranking of this strategy"
    )
    parser.add_argument(
        "--image",
        help="the predicted volume, to skip patches that are mostly air (default: the input "
        "recorded in PRED, when it still exists)",
    )
    parser.add_argument(
        "--min-tissue",
        type=float,
        default=DEFAULT_MIN_TISSUE,
        help=f"share of a patch that must be tissue (default {DEFAULT_MIN_TISSUE}; 0 = off)",
    )
    parser.add_argument(
        "--noise",
        type=float,
        default=None,
        help="score-noise temperature in round 0 (score strategies; default 1 for clasp, else 0 "
        "= off): patches are drawn in proportion to score^(1/T), exploring while the model is "
        "poor",
    )
    parser.add_argument(
        "--noise-round", type=int, default=0, help="the round: the noise shrinks each round"
    )
    parser.add_argument(
        "--noise-decay",
        type=float,
        default=DEFAULT_NOISE_DECAY,
        help=f"factor the noise shrinks by per round (default {DEFAULT_NOISE_DECAY})",
    )
    parser.add_argument(
        "--foreground-share",
        type=float,
        default=None,
        help="stratified, clasp: share of patches with predicted PVS (default 0.5; clasp 0.67)",
    )
    parser.set_defaults(func=_run_rank)


def _run_rank(args: argparse.Namespace) -> int:
    from napari_pvs import atomic, limits
    from napari_pvs.io import ATTRS_KEY, open_prediction
    from napari_pvs.ranking import rank_patches, ranking_paths, save_ranking

    limits.check_strategy(args.strategy)
    limits.check_count(args.n)
    if args.stride is not None:
        limits.check_count(args.stride, "--stride")
    shape = open_prediction(args.prediction)["probability"].shape
    limits.check_volume_shape(shape, args.prediction)
    limits.check_patch(args.patch, shape, source=args.prediction)
    for path in ranking_paths(args.prediction, args.strategy):
        atomic.check_output(path, inputs=[args.prediction], overwrite=args.overwrite)
    image = args.image
    if image is None and args.min_tissue > 0:
        source = dict(open_prediction(args.prediction).attrs).get(ATTRS_KEY, {}).get("source")
        image = source if source and Path(source).exists() else None
    if image is not None and not Path(image).exists():
        raise UserError(f"--image {image} does not exist; pass the volume that was predicted")
    table = rank_patches(
        args.prediction,
        n=args.n,
        patch=args.patch,
        stride=args.stride,
        strategy=args.strategy,
        exclude=args.exclude,
        unlabelled_value=args.unlabelled_value,
        min_distance=args.min_distance,
        seed=args.seed,
        image=image if args.min_tissue > 0 else None,
        min_tissue=args.min_tissue,
        noise=args.noise,
        noise_round=args.noise_round,
        noise_decay=args.noise_decay,
        foreground_share=args.foreground_share,
    )
    csv_path, json_path = save_ranking(
        table, args.prediction, strategy=args.strategy, overwrite=args.overwrite
    )
    print(f"{'rank':>4} {'score':>9} {'start':>16} {'stop':>16} {'pvs':>4}")
    for row in table:
        start, stop = ",".join(map(str, row.bbox_start)), ",".join(map(str, row.bbox_stop))
        print(f"{row.rank:>4} {row.score:>9.4f} {start:>16} {stop:>16} {row.predicted_pvs:>4}")
    print(f"wrote {csv_path} and {json_path}")
    return 0

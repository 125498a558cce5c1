"""The ``napari-pvs`` command line: a thin adapter over the core, for scripts and clusters.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its arguments and
sets ``func`` to a handler. Handlers parse paths and options, call core functions and print;
they hold no logic of their own. Errors the user can fix are raised as :class:`UserError`
(or ``ValueError``/``FileNotFoundError`` from the core) and printed as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from napari_pvs import __version__


class UserError(Exception):
    """A problem with the command's input that the user can fix; printed without a traceback."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-pvs",
        description="Perivascular space (PVS) segmentation and annotation, headless.",
    )
    parser.add_argument("--version", action="version", version=f"napari-pvs {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def _add_convert(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a NIfTI volume to a chunked multiscale OME-Zarr (streaming)",
        description=(
            "Convert IN.nii[.gz] to OUT.zarr (OME-Zarr 0.4) chunk by chunk, keeping the "
            "NIfTI voxel order and full affine. Use it once for large or gzipped volumes, "
            "which cannot be read lazily at random."
        ),
    )
    parser.add_argument("input", help="a .nii or .nii.gz file")
    parser.add_argument("output", help="the OME-Zarr directory to create (e.g. OUT.zarr)")
    parser.add_argument("--levels", type=int, default=3, help="pyramid levels (default 3)")
    parser.add_argument("--chunks", type=int, default=64, help="chunk edge in voxels (default 64)")
    parser.add_argument(
        "--modality", choices=["T1", "T2", "unknown"], help="override the modality guess"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from napari_pvs import io
    from napari_pvs.progress import TerminalProgress

    if not str(args.input).lower().endswith(io.NIFTI_SUFFIXES):
        raise UserError(f"{args.input}: convert reads .nii or .nii.gz files")
    try:
        out = io.convert_to_ome_zarr(
            args.input,
            args.output,
            levels=args.levels,
            chunks=args.chunks,
            modality=args.modality,
            overwrite=args.overwrite,
            progress=TerminalProgress(),
        )
    except FileExistsError as exc:
        raise UserError(f"{exc} (or pass --overwrite)") from exc
    print(json.dumps(io.describe(io.open_volume(out)), indent=2))
    return 0


def _add_gui(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "gui",
        help="open napari with the napari-pvs panel, volumes and/or a sample phantom",
        description="Open a napari viewer with the volume panel docked.",
    )
    parser.add_argument("paths", nargs="*", help="volumes to open (.zarr, .nii, .nii.gz)")
    parser.add_argument(
        "--sample", choices=["T1", "T2"], help="also load the PVS phantom sample data"
    )
    parser.add_argument(
        "--model",
        default="default",
        help="model for the Segment PVS panel: 'default' (bundled) or a .safetensors checkpoint",
    )
    parser.add_argument(
        "--segment",
        action="store_true",
        help="start segmenting the first volume (or the sample) with --model right away",
    )
    parser.set_defaults(func=_run_gui)


def _run_gui(args: argparse.Namespace) -> int:
    from napari_pvs import io

    for path in args.paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"no such file or directory: {path}")
        if not io.is_supported_path(path):
            raise UserError(f"{path}: not a .zarr directory or a .nii/.nii.gz file")
    if args.model != "default" and not Path(args.model).is_file():
        raise FileNotFoundError(
            f"checkpoint {args.model!r} does not exist; pass 'default' or a .safetensors file"
        )
    if args.segment and not (args.paths or args.sample):
        raise UserError("--segment needs a volume: pass a path or --sample T1|T2")
    try:
        import napari
    except ImportError as exc:
        raise UserError(
            "napari is not installed; install the GUI extra: pip install 'napari-pvs[gui]'"
        ) from exc
    viewer = napari.Viewer(title="napari-pvs")
    viewer.window.add_plugin_dock_widget("napari-pvs", "Volume panel")
    _, segment_panel = viewer.window.add_plugin_dock_widget("napari-pvs", "Segment PVS")
    segment_panel.model_edit.setText(args.model)
    first_image = None
    if args.sample:
        layers = viewer.open_sample("napari-pvs", f"pvs_phantom_{args.sample.lower()}w")
        first_image = layers[0].name
    for path in args.paths:
        layers = viewer.open(path, plugin="napari-pvs")
        first_image = first_image or layers[0].name
    if args.segment:
        segment_panel.layer_combo.setCurrentText(first_image)
        segment_panel.segment()
    napari.run()
    return 0


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune a segmentation model on labelled volumes",
        description=(
            "Train a model on images with PVS labels (uint8: 1 PVS, 0 background, 255 "
            "unlabelled and ignored). Writes the best checkpoint (validation Dice) to --out and "
            "a resumable OUT.last.safetensors each epoch; rerunning the same command resumes."
        ),
    )
    parser.add_argument("--images", nargs="+", required=True, help="volumes (.zarr, .nii[.gz])")
    parser.add_argument(
        "--labels",
        nargs="+",
        help="label volumes, one per image (default: each OME-Zarr image's own 'pvs' labels)",
    )
    from napari_pvs.models import list_models

    parser.add_argument(
        "--model",
        default="cross_modal",
        choices=list(list_models()),
        help="architecture to train from scratch (default cross_modal)",
    )
    parser.add_argument("--config", default="{}", help="JSON model config, e.g. '{\"k\": 4}'")
    parser.add_argument(
        "--init", help="fine-tune from a checkpoint instead: 'default' or a .safetensors path"
    )
    parser.add_argument("--out", required=True, help="checkpoint to write (.safetensors)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--steps-per-epoch", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--patch", type=int, nargs="+", default=[64], help="patch edge(s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--modality", nargs="+", help="T1/T2/unknown: one for all images or one per image"
    )
    parser.add_argument("--no-resume", action="store_true", help="ignore OUT.last.safetensors")
    parser.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from napari_pvs import io
    from napari_pvs.models import build_model
    from napari_pvs.models.checkpoint import load_model, manifest_hash
    from napari_pvs.progress import TerminalProgress
    from napari_pvs.training import TrainConfig, TrainingVolume, fit

    if args.labels and len(args.labels) != len(args.images):
        raise UserError(f"got {len(args.images)} --images but {len(args.labels)} --labels")
    modalities = args.modality or [None]
    if len(modalities) not in (1, len(args.images)):
        raise UserError("give one --modality for all images or one per image")
    if len(args.patch) not in (1, 3):
        raise UserError("--patch takes one edge (cube) or three sizes")
    try:
        config = json.loads(args.config)
    except json.JSONDecodeError as exc:
        raise UserError(f"--config is not valid JSON: {exc}") from exc
    model = load_model(args.init)[0] if args.init else build_model(args.model, **config)

    volumes, manifest = [], []
    for i, image_path in enumerate(args.images):
        modality = modalities[0] if len(modalities) == 1 else modalities[i]
        image = io.open_volume(image_path, modality=modality)
        labels = io.open_labels(args.labels[i] if args.labels else image_path)
        volumes.append(
            TrainingVolume(image.data, labels.data, image.modality, name=str(image_path))
        )
        manifest.append({"image": str(image_path), "labels": str(labels.source)})
    patch = tuple(args.patch * 3 if len(args.patch) == 1 else args.patch)
    train_config = TrainConfig(
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size,
        patch=patch,
        learning_rate=args.lr,
        seed=args.seed,
        device=args.device,
    )
    result = fit(
        model,
        volumes,
        train_config,
        args.out,
        resume=not args.no_resume,
        training_info={"manifest_hash": manifest_hash(manifest), "init": args.init},
        progress=TerminalProgress(),
    )
    print(
        json.dumps(
            {
                "checkpoint": str(args.out),
                "model": model.name,
                "best_val_dice": result.best_dice,
                "best_epoch": result.best_epoch,
                "epochs_run": result.epochs_run,
                "stopped_early": result.stopped_early,
            },
            indent=2,
        )
    )
    return 0


def _add_phantom(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "phantom",
        help="write a synthetic PVS phantom (image + ground truth) as OME-Zarr",
        description=(
            "Make a synthetic brain volume with perivascular spaces and write it as an OME-Zarr "
            "image with labels/pvs (ground truth), labels/regions (1 white matter, 2 basal "
            "ganglia, 3 grey matter, 4 CSF) and labels/confounders (1 lacune, 2 WMH, 3 vessel)."
        ),
    )
    parser.add_argument("output", help="the OME-Zarr directory to create (e.g. OUT.zarr)")
    parser.add_argument("--modality", choices=["T1", "T2"], default="T2", help="contrast")
    parser.add_argument(
        "--shape", type=int, nargs=3, default=[64, 80, 64], metavar=("Z", "Y", "X")
    )
    parser.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        default=[2.0],
        metavar="MM",
        help="voxel size in mm: one value (isotropic) or three (z y x); default 2",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same volume)")
    parser.add_argument(
        "--severity", type=float, default=0.5, help="PVS burden 0..1 (20-300 PVS per brain)"
    )
    parser.add_argument("--anatomy", choices=["procedural", "mni"], default="procedural")
    parser.add_argument("--snr", type=float, help="signal-to-noise ratio (default: random 15-60)")
    parser.add_argument("--no-bias-field", action="store_true", help="no intensity bias field")
    parser.add_argument("--meta", help="also write the phantom's metadata (JSON) to this file")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(func=_run_phantom)


def _run_phantom(args: argparse.Namespace) -> int:
    from napari_pvs import io
    from napari_pvs.phantom import make_phantom
    from napari_pvs.progress import TerminalProgress

    if len(args.spacing) not in (1, 3):
        raise UserError("--spacing takes one value (isotropic) or three (z y x)")
    try:
        phantom = make_phantom(
            tuple(args.shape),
            args.spacing[0] if len(args.spacing) == 1 else tuple(args.spacing),
            args.modality,
            seed=args.seed,
            severity=args.severity,
            anatomy=args.anatomy,
            snr=args.snr,
            bias_field=not args.no_bias_field,
        )
    except ImportError as exc:
        raise UserError(str(exc)) from exc
    try:
        io.save_ome_zarr(
            args.output,
            phantom.image,
            phantom.spacing,
            labels={
                "pvs": phantom.pvs,
                "regions": phantom.regions,
                "confounders": phantom.confounders,
            },
            modality=phantom.modality,
            overwrite=args.overwrite,
            progress=TerminalProgress(),
        )
    except FileExistsError as exc:
        raise UserError(f"{exc} (or pass --overwrite)") from exc
    if args.meta:
        Path(args.meta).write_text(json.dumps(phantom.meta, indent=2))
    summary = {k: v for k, v in phantom.meta.items() if k != "pvs_table"}
    print(json.dumps({"output": str(args.output), **summary}, indent=2))
    return 0


def _open_mask_like(path: str, label_name: str | None = None):
    """Open a mask/label image (or a float probability map) lazily; returns an io.Volume."""
    from napari_pvs import io

    if io.is_prediction_store(path):
        return io.open_labels(path)  # its segmentation, thresholded by the predictor
    volume = io.open_volume(path, check_finite=False)
    if label_name is not None and label_name in volume.label_names:
        return io.open_labels(path, label_name)
    if volume.label_names:
        return io.open_labels(path)
    return volume  # a plain mask, label image or probability map (floats are thresholded)


def _add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a PVS segmentation against ground truth (Dice, cluster F1, counts, volumes)",
        description=(
            "Compare PRED with GT: voxel Dice (probabilities thresholded at 0.5), cluster "
            "precision/recall/F1 (26-connectivity, one-to-one greedy matching by overlap), PVS "
            "count and volume, per region with --regions. PRED/GT may be NIfTI, zarr or "
            "OME-Zarr (an OME-Zarr image with labels uses labels/pvs). Prints a table and "
            "writes all metrics as JSON."
        ),
    )
    parser.add_argument("pred", help="predicted mask or probability map")
    parser.add_argument("gt", help="ground-truth PVS mask")
    parser.add_argument(
        "--regions", help="region map (an OME-Zarr with labels/regions, or any label volume)"
    )
    parser.add_argument(
        "--out", default="metrics.json", help="JSON file to write (default metrics.json)"
    )
    parser.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from napari_pvs.metrics import evaluate, format_table

    pred = _open_mask_like(args.pred, "pvs")
    gt = _open_mask_like(args.gt, "pvs")
    regions = _open_mask_like(args.regions, "regions").data if args.regions else None
    result = evaluate(pred.data, gt.data, regions=regions, spacing=gt.spacing)
    result["pred"], result["gt"] = str(args.pred), str(args.gt)
    print(format_table(result))
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


def _add_frangi(subparsers: argparse._SubParsersAction) -> None:
    from napari_pvs.models.frangi import DEFAULT_SIGMAS_MM, DEFAULT_THRESHOLD

    parser = subparsers.add_parser(
        "frangi",
        help="segment PVS with the Frangi vesselness baseline (chunked, any size)",
        description=(
            "Frangi vesselness at scales given in mm (bright ridges on T2w, dark on T1w), "
            "thresholded, optionally restricted to white matter + basal ganglia of a region "
            "map. Runs chunk by chunk; writes OME-Zarr (OUT.zarr) or NIfTI (OUT.nii[.gz])."
        ),
    )
    parser.add_argument("input", help="volume to segment (.zarr, .nii, .nii.gz)")
    parser.add_argument("--out", required=True, help="OUT.zarr or OUT.nii.gz")
    parser.add_argument(
        "--modality", choices=["T1", "T2"], help="PVS polarity (default: from the input)"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"vesselness threshold in (0, 1] (default {DEFAULT_THRESHOLD})",
    )
    parser.add_argument(
        "--sigmas",
        type=float,
        nargs="+",
        default=list(DEFAULT_SIGMAS_MM),
        metavar="MM",
        help="scales in mm (default %(default)s)",
    )
    parser.add_argument(
        "--mask",
        help="region map (e.g. a phantom .zarr with labels/regions): keep WM + basal ganglia",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(func=_run_frangi)


def _run_frangi(args: argparse.Namespace) -> int:
    from napari_pvs import io
    from napari_pvs.models.frangi import frangi_segment, white_matter_mask
    from napari_pvs.progress import TerminalProgress

    volume = io.open_volume(args.input, modality=args.modality)
    if volume.modality == "unknown":
        raise UserError(
            f"{args.input}: modality unknown; pass --modality T2 (bright PVS) or T1 (dark PVS)"
        )
    mask = None
    if args.mask:
        mask = white_matter_mask(_open_mask_like(args.mask, "regions").data)
    seg = frangi_segment(
        volume.data,
        volume.spacing,
        volume.modality,
        sigmas=args.sigmas,
        threshold=args.threshold,
        mask=mask,
    )
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists; choose another path or pass --overwrite")
    if out.name.lower().endswith(io.NIFTI_SUFFIXES):
        io.save_nifti(out, seg, volume.affine, dtype="uint8")
    else:
        io.save_ome_zarr(
            out,
            seg,
            volume.spacing,
            modality=volume.modality,
            affine=volume.affine,
            axes=volume.axes,
            overwrite=args.overwrite,
            progress=TerminalProgress(),
        )
    print(f"wrote {out}")
    return 0


def _add_predict(subparsers: argparse._SubParsersAction) -> None:
    from napari_pvs.memory import MEMORY_POLICIES
    from napari_pvs.models import FLIP_COUNTS

    parser = subparsers.add_parser(
        "predict",
        help="segment PVS in one or many volumes (chunked, resumable, with uncertainty)",
        description=(
            "Predict PVS probability, segmentation and (with --mc or --tta) entropy, mutual "
            "information and variance, chunk by chunk into a zarr group with the input's shape. "
            "One INPUT: OUT is the zarr group (or OUT.nii.gz: the segmentation as NIfTI with "
            "the input's affine, the full predictions kept beside it in OUT.zarr). Several "
            "INPUTs: OUT is a folder of groups, run as tasks on a local dask cluster or on "
            "--scheduler. Rerunning the same command resumes an interrupted run."
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
        "--mc", type=int, default=0, metavar="T", help="Monte Carlo dropout samples (0 = off)"
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
    parser.add_argument("--window", type=int, default=64, help="window edge (default 64)")
    parser.add_argument("--overlap", type=float, default=0.25, help="window overlap (0.25)")
    parser.add_argument(
        "--memory",
        choices=MEMORY_POLICIES,
        default="reuse",
        help="reuse: keep freed memory for the next window (fast; default); return: hand it "
        "back at once (lowest peak, about 2x slower); system: leave the C allocator alone",
    )
    parser.add_argument("--scheduler", metavar="ADDRESS", help="dask scheduler, tcp://host:8786")
    parser.add_argument("--workers", type=int, help="local cluster workers (default: cores)")
    parser.add_argument("--overwrite", action="store_true", help="start afresh, replacing OUT")
    parser.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from napari_pvs.cohort import output_name, predict_cohort, predict_volume
    from napari_pvs.progress import TerminalProgress

    if args.mc < 0:
        raise UserError("--mc must be 0 (off) or a positive number of samples")
    options = {
        "window": args.window,
        "overlap": args.overlap,
        "batch": args.batch,
        "device": args.device,
        "mc_samples": args.mc,
        "tta": args.tta,
        "amp": not args.float32,
        "min_cluster_mm3": args.min_cluster_mm3,
        "memory": args.memory,
    }
    model = args.model[0] if len(args.model) == 1 else args.model
    out = Path(args.out)
    nifti = out.name.lower().endswith((".nii", ".nii.gz"))
    if nifti and len(args.inputs) > 1:
        raise UserError("with several inputs --out must be a folder, not a NIfTI file")
    store = out.parent / output_name(out) if nifti else out
    if len(args.inputs) > 1 or args.scheduler:
        results = predict_cohort(
            args.inputs,
            out if len(args.inputs) > 1 else store.parent,
            model=model,
            modality=args.modality,
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
                args.modality,
                options,
                progress=TerminalProgress(),
                overwrite=args.overwrite,
            )
        ]
    for result in results:
        for warning in result.warnings:
            print(f"napari-pvs predict: warning: {result.input}: {warning}", file=sys.stderr)
        if result.error:
            print(f"napari-pvs predict: error: {result.input}: {result.error}", file=sys.stderr)
    if nifti and results[0].error is None:
        import dask.array as da
        import zarr

        from napari_pvs import io

        group = zarr.open_group(str(store), mode="r")
        affine = group.attrs["napari_pvs"]["affine"]
        io.save_nifti(out, da.from_zarr(group["segmentation"]), affine)
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
    return 2 if any(r.error for r in results) else 0


def _add_rank(subparsers: argparse._SubParsersAction) -> None:
    from napari_pvs.ranking import DEFAULT_MIN_TISSUE, DEFAULT_PATCH, STRATEGIES

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
    parser.add_argument("--strategy", choices=STRATEGIES, default="entropy")
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
    parser.set_defaults(func=_run_rank)


def _run_rank(args: argparse.Namespace) -> int:
    from napari_pvs.io import ATTRS_KEY, open_prediction
    from napari_pvs.ranking import rank_patches, save_ranking

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
    )
    csv_path, json_path = save_ranking(table, args.prediction)
    print(f"{'rank':>4} {'score':>9} {'start':>16} {'stop':>16} {'pvs':>4}")
    for row in table:
        start, stop = ",".join(map(str, row.bbox_start)), ",".join(map(str, row.bbox_stop))
        print(f"{row.rank:>4} {row.score:>9.4f} {start:>16} {stop:>16} {row.predicted_pvs:>4}")
    print(f"wrote {csv_path} and {json_path}")
    return 0


# Subcommands register here, in the order `napari-pvs --help` lists them.
_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_convert,
    _add_gui,
    _add_train,
    _add_phantom,
    _add_evaluate,
    _add_frangi,
    _add_predict,
    _add_rank,
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"napari-pvs {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"napari-pvs {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Volume commands: convert, phantom, evaluate, frangi."""

from __future__ import annotations

import argparse
import json

from napari_pvs.cli._common import UserError


def add_convert(subparsers: argparse._SubParsersAction) -> None:
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
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it exists (the old store stays until the new one is complete)",
    )
    parser.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from napari_pvs import atomic, io, limits
    from napari_pvs.progress import TerminalProgress

    if not str(args.input).lower().endswith(io.NIFTI_SUFFIXES):
        raise UserError(f"{args.input}: convert reads .nii or .nii.gz files")
    atomic.check_output(args.output, inputs=[args.input], overwrite=args.overwrite)
    limits.check_volume_shape(io.open_volume(args.input, check_finite=False).shape, args.input)
    limits.check_count(args.levels, "--levels")
    limits.check_count(args.chunks, "--chunks")
    out = io.convert_to_ome_zarr(
        args.input,
        args.output,
        levels=args.levels,
        chunks=args.chunks,
        modality=args.modality,
        overwrite=args.overwrite,
        progress=TerminalProgress(),
    )
    print(json.dumps(io.describe(io.open_volume(out)), indent=2))
    return 0


def add_phantom(subparsers: argparse._SubParsersAction) -> None:
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
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 80, 64], metavar=("Z", "Y", "X"))
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
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT (and --meta) if they exist"
    )
    parser.set_defaults(func=_run_phantom)


def _run_phantom(args: argparse.Namespace) -> int:
    from napari_pvs import atomic, io, limits
    from napari_pvs.phantom import make_phantom
    from napari_pvs.progress import TerminalProgress

    limits.check_volume_shape(args.shape, "--shape")
    if len(args.spacing) not in (1, 3):
        raise UserError("--spacing takes one value (isotropic) or three (z y x)")
    atomic.check_output(args.output, overwrite=args.overwrite)
    if args.meta:
        atomic.check_output(args.meta, inputs=[args.output], overwrite=args.overwrite)
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
    if args.meta:
        atomic.write_json(args.meta, phantom.meta, overwrite=args.overwrite)
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


def add_evaluate(subparsers: argparse._SubParsersAction) -> None:
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
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from napari_pvs import atomic
    from napari_pvs.metrics import evaluate, format_table

    inputs = [args.pred, args.gt, args.regions]
    atomic.check_output(args.out, inputs=inputs, overwrite=args.overwrite)
    pred = _open_mask_like(args.pred, "pvs")
    gt = _open_mask_like(args.gt, "pvs")
    regions = _open_mask_like(args.regions, "regions").data if args.regions else None
    result = evaluate(pred.data, gt.data, regions=regions, spacing=gt.spacing)
    result["pred"], result["gt"] = str(args.pred), str(args.gt)
    print(format_table(result))
    atomic.write_json(args.out, result, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


def add_frangi(subparsers: argparse._SubParsersAction) -> None:
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
    from napari_pvs import atomic, io, limits
    from napari_pvs.models.frangi import frangi_segment, white_matter_mask
    from napari_pvs.progress import TerminalProgress

    inputs = [args.input, args.mask]
    out = atomic.check_output(args.out, inputs=inputs, overwrite=args.overwrite)
    volume = io.open_volume(args.input, modality=args.modality)
    limits.check_volume_shape(volume.shape, args.input)
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
    if out.name.lower().endswith(io.NIFTI_SUFFIXES):
        io.save_nifti(
            out, seg, volume.affine, dtype="uint8", overwrite=args.overwrite, inputs=inputs
        )
    else:
        io.save_ome_zarr(
            out,
            seg,
            volume.spacing,
            modality=volume.modality,
            affine=volume.affine,
            axes=volume.axes,
            overwrite=args.overwrite,
            inputs=inputs,
            progress=TerminalProgress(),
        )
    print(f"wrote {out}")
    return 0

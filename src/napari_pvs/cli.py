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
    parser.set_defaults(func=_run_gui)


def _run_gui(args: argparse.Namespace) -> int:
    from napari_pvs import io

    for path in args.paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"no such file or directory: {path}")
        if not io.is_supported_path(path):
            raise UserError(f"{path}: not a .zarr directory or a .nii/.nii.gz file")
    try:
        import napari
    except ImportError as exc:
        raise UserError(
            "napari is not installed; install the GUI extra: pip install 'napari-pvs[gui]'"
        ) from exc
    viewer = napari.Viewer(title="napari-pvs")
    viewer.window.add_plugin_dock_widget("napari-pvs", "Volume panel")
    if args.sample:
        viewer.open_sample("napari-pvs", f"pvs_phantom_{args.sample.lower()}w")
    for path in args.paths:
        viewer.open(path, plugin="napari-pvs")
    napari.run()
    return 0


# Subcommands register here, in the order `napari-pvs --help` lists them.
_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_convert,
    _add_gui,
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

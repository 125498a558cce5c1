"""The gui command: napari with the plugin's panels."""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_pvs.cli._common import UserError


def add_gui(subparsers: argparse._SubParsersAction) -> None:
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

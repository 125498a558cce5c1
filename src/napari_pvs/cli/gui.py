"""The gui command: napari with the plugin's panels."""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_pvs.cli._common import UserError


def add_gui(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "gui",
        help="open napari with the napari-pvs workflow, volumes and/or a sample phantom",
        description="Open a napari viewer with the napari-pvs workflow docked (Project, Segment, "
        "Review, Train, Report); the Volume and Segment PVS panels are in the Plugins menu.",
    )
    parser.add_argument("paths", nargs="*", help="volumes to open (.zarr, .nii, .nii.gz)")
    parser.add_argument(
        "--sample", choices=["T1", "T2"], help="also load the PVS phantom sample data"
    )
    parser.add_argument(
        "--model",
        default="default",
        help="model for the Segment step: 'default' (bundled) or a .safetensors checkpoint",
    )
    parser.add_argument(
        "--project",
        help="open this project folder (or create one there, with --model as version 0)",
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
    _, workflow = viewer.window.add_plugin_dock_widget("napari-pvs", "PVS workflow")
    segment_step = workflow.segment_step
    segment_step.model_edit.setText(args.model)
    if args.project:
        workflow.project_step.folder_edit.setText(args.project)
        workflow.project_step.model_edit.setText(args.model)  # a new project's version 0
        folder = Path(args.project)
        exists = (folder / "napari-pvs-project.json").exists()
        if not (workflow.project_step.open_project() if exists else (
            workflow.project_step.create_project()
        )):
            raise UserError(workflow.project_step.status_label.text())
    first_image = None
    if args.sample:
        layers = viewer.open_sample("napari-pvs", f"pvs_phantom_{args.sample.lower()}w")
        first_image = layers[0].name
    for path in args.paths:
        layers = viewer.open(path, plugin="napari-pvs")
        first_image = first_image or layers[0].name
    if args.segment:
        workflow.show_step("Segment")
        segment_step.layer_combo.setCurrentText(first_image)
        segment_step.segment()
    napari.run()
    return 0

"""The train command: fit a model on labelled volumes."""

from __future__ import annotations

import argparse
import json

from napari_pvs.cli._common import UserError


def add_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune a segmentation model on labelled volumes",
        description=(
            "Train a model on images with PVS labels (uint8: 1 PVS, 0 background, 255 "
            "unlabelled and ignored). Writes the best checkpoint (validation Dice) to --out and "
            "a resumable OUT.last.safetensors each epoch; rerunning the same command resumes. "
            "On several GPUs: torchrun --nproc_per_node N -m napari_pvs.cli train ... (one "
            "process per GPU; --batch-size is the global batch, split among them)."
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
    parser.add_argument(
        "--batch-size",
        type=int,
        default=2,
        help="patches per step (under torchrun: the global batch, a multiple of the processes)",
    )
    parser.add_argument("--patch", type=int, nargs="+", default=[64], help="patch edge(s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda or cuda:N (under torchrun: auto/cuda = the GPU of each LOCAL_RANK)",
    )
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
    from napari_pvs.training import TrainConfig, TrainingVolume, distributed_context, fit

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
    with distributed_context(args.device) as context:  # one process alone without torchrun
        train_config = TrainConfig(
            epochs=args.epochs,
            steps_per_epoch=args.steps_per_epoch,
            batch_size=args.batch_size,
            patch=patch,
            learning_rate=args.lr,
            seed=args.seed,
            device=context.device,
        )
        result = fit(
            model,
            volumes,
            train_config,
            args.out,
            resume=not args.no_resume,
            training_info={"manifest_hash": manifest_hash(manifest), "init": args.init},
            progress=TerminalProgress(),  # fit reports on rank 0 only
        )
    if not context.is_main:
        return 0
    print(
        json.dumps(
            {
                "checkpoint": str(args.out),
                "model": model.name,
                "best_val_dice": result.best_dice,
                "best_epoch": result.best_epoch,
                "epochs_run": result.epochs_run,
                "stopped_early": result.stopped_early,
                "processes": context.world_size,
            },
            indent=2,
        )
    )
    return 0

"""The train command: fit a model on labelled volumes."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from napari_pvs.cli._common import UserError


def add_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune a segmentation model on labelled volumes",
        description=(
            "Train a model on images with PVS labels (uint8: 1 PVS, 0 background, 255 "
            "unlabelled and ignored; other values are refused). Writes the best checkpoint "
            "(validation Dice) to --out and a resumable OUT.last.safetensors each epoch; "
            "rerunning the same command (more --epochs allowed) resumes from OUT.last. An "
            "existing OUT is never replaced without --overwrite. On several GPUs: torchrun "
            "--nproc_per_node N -m napari_pvs.cli train ... (one process per GPU; --batch-size "
            "is the global batch, split among them)."
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
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="train afresh although OUT exists: the new run writes OUT.overwrite.safetensors "
        "(resumed when this command is rerun) and replaces OUT and OUT.last when it finishes",
    )
    parser.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from napari_pvs.models import build_model
    from napari_pvs.models.checkpoint import load_model
    from napari_pvs.models.checkpoint_checks import manifest_hash
    from napari_pvs.progress import TerminalProgress
    from napari_pvs.training import TrainConfig, distributed_context, fit

    modalities, model_config = _checked_arguments(args)
    out, last = _checked_outputs(args)
    model = load_model(args.init)[0] if args.init else build_model(args.model, **model_config)
    volumes, manifest = _training_volumes(args, modalities)
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
        info = {"manifest_hash": manifest_hash(manifest), "init": args.init}
        resume = not args.no_resume
        write_to = _checkpoint_target(args, out, last, model, train_config, info, resume, context)
        result = fit(
            model,
            volumes,
            train_config,
            write_to,
            resume=resume,
            training_info=info,
            progress=TerminalProgress(),
        )
        if write_to != out and context.is_main:  # only rank 0 wrote checkpoints
            _replace_with_staged(write_to, out, last)
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


def _checked_arguments(args: argparse.Namespace) -> tuple[list, dict]:
    """The per-image modalities and the model config, after checking the argument counts and
    the JSON (a one-line error before any work)."""
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
    return modalities, config


def _checked_outputs(args: argparse.Namespace) -> tuple[Path, Path]:
    """OUT and OUT.last, checked before any work (and long before the first epoch): they are
    not inputs and their folder can be written. Whether they may be replaced is decided by
    :func:`_checkpoint_target`."""
    from napari_pvs import atomic
    from napari_pvs.training import last_checkpoint_path

    out = Path(args.out)
    last = last_checkpoint_path(out)
    init = args.init if args.init and args.init != "default" else None
    inputs = [*args.images, *(args.labels or []), init]
    for path in (out, last):
        atomic.check_output(path, inputs=inputs, overwrite=True)
    return out, last


def _training_volumes(args: argparse.Namespace, modalities: list) -> tuple[list, list[dict]]:
    """The labelled volumes to train on, and the manifest (image and labels of each) whose hash
    the checkpoint records."""
    from napari_pvs import io
    from napari_pvs.training import TrainingVolume

    volumes, manifest = [], []
    for i, image_path in enumerate(args.images):
        modality = modalities[0] if len(modalities) == 1 else modalities[i]
        image = io.open_volume(image_path, modality=modality)
        labels = io.open_labels(args.labels[i] if args.labels else image_path)
        volumes.append(
            TrainingVolume(image.data, labels.data, image.modality, name=str(image_path))
        )
        manifest.append({"image": str(image_path), "labels": str(labels.source)})
    return volumes, manifest


def _checkpoint_target(
    args: argparse.Namespace,
    out: Path,
    last: Path,
    model,
    train_config,
    info: dict,
    resume: bool,
    context,
) -> Path:
    """Where this run writes: OUT itself (a fresh run, or resuming the same run from OUT.last),
    or with ``--overwrite`` over an existing OUT a staged ``OUT.overwrite`` that replaces it
    only when the run finishes. Refuses to resume a different run or to replace OUT silently.
    """
    from napari_pvs.models.checkpoint import resume_differences
    from napari_pvs.training import last_checkpoint_path

    write_to = out
    if args.overwrite and (out.exists() or last.exists()):
        # The old OUT stays until the new run finishes; an interrupted overwrite resumes from
        # its own staged .last when rerun with --overwrite (if the settings still match).
        write_to = out.with_name(out.stem + ".overwrite" + out.suffix)
        staged_last = last_checkpoint_path(write_to)
        if staged_last.is_file() and (
            not resume or resume_differences(staged_last, model, asdict(train_config), info)
        ) and context.is_main:
            staged_last.unlink(missing_ok=True)
            write_to.unlink(missing_ok=True)
    elif not args.overwrite:
        if resume and last.is_file():
            differences = resume_differences(last, model, asdict(train_config), info)
            if differences:
                raise UserError(
                    f"{last} is the resume point of a different training run "
                    f"({'; '.join(differences)}); rerun with the same settings to resume, pass "
                    "--overwrite to train afresh (OUT is replaced when the new run finishes), "
                    "or choose another --out"
                )
        else:
            for existing in (out, last):
                if existing.exists():
                    raise FileExistsError(
                        f"{existing} already exists; pass --overwrite to train afresh (it is "
                        "replaced when the new run finishes) or choose another --out"
                    )
    return write_to


def _replace_with_staged(write_to: Path, out: Path, last: Path) -> None:
    """A finished ``--overwrite`` run: its staged checkpoints replace OUT and OUT.last."""
    from napari_pvs import atomic
    from napari_pvs.training import last_checkpoint_path

    for staged, final in ((write_to, out), (last_checkpoint_path(write_to), last)):
        if staged.exists():
            atomic.commit(staged, final)

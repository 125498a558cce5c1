"""Part 2 of a round, in a worker or in-process, never touching the ledger: fine-tune on the
snapshot (accepted patches and yes/no answers), score base and new model on the validation
crops and on the held-out answers, write ``models/v<N>``, then re-predict and re-rank
(:mod:`napari_pvs.rounds.repredict`)."""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from napari_pvs import atomic
from napari_pvs.progress import CancelToken, check_cancelled
from napari_pvs.rounds.config import Event, RoundConfig
from napari_pvs.rounds.repredict import predict_and_rank
from napari_pvs.rounds.snapshot import PATCH, TRAIN_ANSWER, load_held_out, load_snapshot
from napari_pvs.rounds.validation import counts_as_lists, held_out_precision, validation_counts

#: Training steps per epoch of a round (fit validates and keeps the best weights per epoch).
STEPS_PER_EPOCH = 50

_LOSS = re.compile(r"loss\s+([0-9.eE+-]+|nan|inf)")


def execute_round(
    plan: dict[str, Any],
    emit: Callable[[Event], None] | None = None,
    cancel: CancelToken | None = None,
    *,
    main: bool = True,
    device: str | None = None,
) -> dict[str, Any] | None:
    """Train, validate, write ``v<N>``, predict and rank as ``plan`` says; return the result.

    ``emit`` receives the round's events (plain dicts). Raises ``Cancelled`` when cancelled.
    With ``main=False`` (a non-zero ``torchrun`` rank) the process only trains its share.
    ``device`` overrides the plan's (each torchrun process trains on its own GPU).
    """
    from napari_pvs.validation import round_is_worse, validation_dice

    emit = emit or (lambda event: None)
    config = RoundConfig(**plan["config"])
    if device is not None:
        config.device = device
    started = time.perf_counter()
    train, validation = _load_crops(plan, emit)
    base, model = _base_and_model(plan, config)
    base_counts = validation_counts(base, validation, config.device) if main else []
    held_out = load_held_out(plan["snapshot"]) if main else []
    base_precision = held_out_precision(base, held_out, config.device) if held_out else {}
    base_dice, _ = validation_dice(base_counts)
    if main and base_dice is not None:
        emit({"kind": "validation", "step": 0, "dice": base_dice})
    check_cancelled(cancel)
    result, info, total, trained = _fine_tune(
        plan, config, model, train, validation, emit, cancel, main
    )
    if not main:
        return None
    check_cancelled(cancel)
    new_counts = validation_counts(model, validation, config.device)
    new_dice, _ = validation_dice(new_counts)
    # Precision on held-out answered candidates (never trained on), base and new version.
    answers = held_out_precision(model, held_out, config.device) if held_out else {}
    answers.update({f"base_{k}": v for k, v in base_precision.items() if k != "held_out_answers"})
    metrics = {
        "validation_dice": new_dice,
        "base_validation_dice": base_dice,
        "validation_patches": len(validation),
        "validation_counts": counts_as_lists(new_counts),
        "base_validation_counts": counts_as_lists(base_counts),
        "train_patches": sum(t.name.startswith(PATCH) for t in train),
        "train_answers": sum(t.name.startswith(TRAIN_ANSWER) for t in train),
        **answers,
        "steps": total,
        "steps_trained": trained,
        "best_epoch": result.best_epoch,
        "fit_val_dice": result.best_dice,
        "train_loss": result.history[-1]["train_loss"] if result.history else None,
        "from_scratch": config.from_scratch,
        "train_seconds": round(time.perf_counter() - started, 2),
    }
    if new_counts:
        # The guard: kept as a version either way; not made current when worse beyond noise.
        decision = round_is_worse(new_counts, base_counts)
        metrics["worse_than_base"] = decision.worse
        metrics["guard"] = asdict(decision)
        emit({"kind": "validation", "step": total, "dice": new_dice})
    digest = _write_version(plan, model, metrics, info, emit)
    queues = predict_and_rank(plan, model, emit, cancel)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    return {"version": plan["new_version"], "metrics": metrics, "queues": queues,
            "checkpoint_sha256": digest}  # fmt: skip


def _load_crops(plan: dict[str, Any], emit: Callable[[Event], None]) -> tuple[list, list]:
    """The snapshot's training and validation crops; ValueError when nothing can train."""
    emit({"kind": "stage", "message": f"round {plan['round']}: loading the snapshot"})
    train, validation = load_snapshot(plan["snapshot"])
    if not train:
        raise ValueError(
            "every training patch of this round lies inside validation patches; accept "
            "patches elsewhere"
        )
    return train, validation


def _base_and_model(plan: dict[str, Any], config: RoundConfig) -> tuple[Any, Any]:
    """The base version, and the model to train: the base itself, or a fresh model of its
    architecture and config (``from_scratch``)."""
    from napari_pvs.models.checkpoint import load_checkpoint

    base, _ = load_checkpoint(plan["base_checkpoint"], device="cpu")
    model = _fresh_model(base, config.seed) if config.from_scratch else base
    return base, model


def _fresh_model(base_model, seed: int):
    """A seeded, freshly initialised model of ``base_model``'s architecture and config, with
    its calibrated segmentation rule."""
    import torch

    from napari_pvs.models import build_model

    torch.manual_seed(int(seed))
    model = build_model(base_model.name, **base_model.config)
    model.segmentation_rule = dict(getattr(base_model, "segmentation_rule", {}) or {})
    return model


def _fine_tune(
    plan: dict[str, Any],
    config: RoundConfig,
    model,
    train: list,
    validation: list,
    emit: Callable[[Event], None],
    cancel: CancelToken | None,
    main: bool,
):
    """Train ``model`` with :func:`napari_pvs.training.fit` (``steps`` in epochs of
    :data:`STEPS_PER_EPOCH`, best epoch kept), each step and each epoch's validation Dice an
    event. Returns fit's result, the checkpoint's training info, the steps planned and the
    steps trained (fewer when early stopping ended the round)."""
    from napari_pvs.training import TrainConfig, fit
    from napari_pvs.validation import validation_dice

    steps_per_epoch = min(config.steps, config.validate_every or STEPS_PER_EPOCH)
    epochs = math.ceil(config.steps / steps_per_epoch)
    total = epochs * steps_per_epoch
    train_config = TrainConfig(
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        batch_size=config.batch_size,
        patch=(config.patch,) * 3,
        learning_rate=config.learning_rate,
        validation_patches=max(3, min(12, 3 * len(validation or train))),
        patience=epochs if config.patience is None else config.patience,
        seed=config.seed,
        device=config.device,
        max_minutes=config.max_minutes,
    )

    def on_progress(done: int, total_steps: int, message: str) -> None:
        found = _LOSS.search(message)
        loss = float(found.group(1)) if found else None
        emit({"kind": "step", "step": int(done), "total": int(total_steps), "loss": loss})

    answers = sum(t.name.startswith(TRAIN_ANSWER) for t in train)
    items = f"{len(train) - answers} patches" + (f" and {answers} answers" if answers else "")
    emit({"kind": "stage", "message": f"training {total} steps on {items}"})
    work = Path(plan["folder"]) / "train"  # made by prepare_round: other ranks write nothing
    info = {
        "manifest_hash": plan["manifest_hash"],
        "round": plan["round"],
        "base_version": plan["base_version"],
        "from_scratch": config.from_scratch,
        "annotations": sorted(int(t.name[1:]) for t in train if t.name.startswith(PATCH)),
        "answers": sorted(int(t.name[1:]) for t in train if t.name.startswith(TRAIN_ANSWER)),
        "validation_annotations": sorted(int(v.name[1:]) for v in validation),
    }
    crops = validation or train

    def one_dice(trained) -> float:
        dice, _ = validation_dice(validation_counts(trained, crops, config.device))
        return float(dice)

    single = int(os.environ.get("WORLD_SIZE", "1")) <= 1
    result = fit(
        model,
        train,
        train_config,
        out=work / "model.safetensors",
        resume=False,
        validation=validation or train,
        training_info=info,
        progress=on_progress if main else (lambda *_: None),
        cancel=cancel,
        on_epoch=lambda record: emit(
            {
                "kind": "validation",
                "step": (int(record["epoch"]) + 1) * steps_per_epoch,
                "dice": float(record["val_dice"]),
                "source": "fit",
                "patches": len(crops),
            }
        ),
        evaluate=one_dice if single else None,
    )
    return result, info, total, len(result.history) * steps_per_epoch


def _write_version(
    plan: dict[str, Any],
    model,
    metrics: dict[str, Any],
    info: dict[str, Any],
    emit: Callable[[Event], None],
) -> str:
    """``models/v<N>.safetensors`` (atomic): the new weights with the round's metrics,
    manifest hash, round and annotation ids. It is read back and verified in full here, where
    torch is loaded anyway; the SHA-256 returned lets the project's process commit it without
    a second full read (:func:`~napari_pvs.models.checkpoint_checks.metadata_if_unchanged`)."""
    from napari_pvs.models.checkpoint import read_checkpoint, save_checkpoint
    from napari_pvs.models.checkpoint_checks import file_sha256

    checkpoint = Path(plan["checkpoint"])
    with atomic.atomic_output(checkpoint, overwrite=True) as tmp:
        save_checkpoint(model, tmp, metrics=metrics, training={**info, "config": plan["config"]})
    read_checkpoint(checkpoint)
    emit({"kind": "stage", "message": f"wrote {checkpoint.name}"})
    return file_sha256(checkpoint)

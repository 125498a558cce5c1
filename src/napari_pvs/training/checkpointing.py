"""A run's checkpoints: the best weights in ``out``, and the resumable ``<out>.last`` (weights,
optimizer and scheduler state, history) written every epoch; reading it back to resume.

Optimizer state travels as flat tensors because safetensors holds tensors only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from napari_pvs.models.checkpoint import (
    load_weights_into,
    optimizer_tensors,
    read_checkpoint,
    save_checkpoint,
)


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """The optimizer's state as flat ``"<param index>.<key>"`` tensors and its param groups."""
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value)
    return tensors, state["param_groups"]


def restore_optimizer(optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    """Load what :func:`_flatten_optimizer` wrote back into ``optimizer``."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def last_checkpoint_path(out: str | Path) -> Path:
    """The resumable 'last epoch' checkpoint written next to ``out``."""
    out = Path(out)
    return out.with_name(out.stem + ".last" + out.suffix)


def read_resume_point(
    model, out_path: Path
) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """Load ``<out>.last``'s weights into ``model``; its resume state and optimizer tensors.

    None when there is no ``.last`` to resume from. The best checkpoint ``out``, if present,
    must still be intact (it is read, not loaded).
    """
    last_path = last_checkpoint_path(out_path)
    if not last_path.is_file():
        return None
    meta = load_weights_into(model, last_path)
    resumed = (meta["training"]["resume"], optimizer_tensors(last_path))
    if out_path.is_file():
        read_checkpoint(out_path)  # the best checkpoint must still be intact
    return resumed


def save_epoch_checkpoints(
    model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    out_path: Path,
    info: dict[str, Any],
    *,
    epoch: int,
    best_dice: float,
    best_epoch: int,
    history: list[dict[str, float]],
    improved: bool,
) -> None:
    """After an epoch: the best checkpoint when this epoch improved, and always the resumable
    ``.last`` one (weights, optimizer, scheduler, history), so a rerun continues exactly."""
    metrics = {"val_dice": best_dice, "best_epoch": best_epoch}
    if improved:
        save_checkpoint(model, out_path, metrics=metrics, training={**info, "epoch": epoch})
    flat, groups = _flatten_optimizer(optimizer)
    resume_state = {
        "epoch": epoch,
        "best_dice": best_dice,
        "best_epoch": best_epoch,
        "history": history,
        "param_groups": groups,
        "scheduler": scheduler.state_dict(),
    }
    save_checkpoint(
        model,
        last_checkpoint_path(out_path),
        metrics=metrics,
        training={**info, "resume": resume_state},
        optimizer_state=flat,
    )

"""The training loop: :func:`fit` and its stages (set-up, resume, one step, one epoch, stop
decisions, the final weights).

Labels are uint8: 1 = PVS, 0 = not PVS, 255 = unlabelled. The loss (BCE + soft Dice) is
computed only over labelled voxels. Every patch is drawn from ``(seed, epoch, step, index in
the batch)`` (:mod:`napari_pvs.training.sampling`), so a resumed run continues exactly as the
uninterrupted one, and a run split over several processes (``torchrun``, see
:func:`~napari_pvs.training.distributed.distributed_context`) draws the same global batches as
one process.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from napari_pvs.models import resolve_device
from napari_pvs.models.checkpoint import load_weights_into
from napari_pvs.progress import (
    Cancelled,
    CancelToken,
    ProgressCallback,
    check_cancelled,
    no_progress,
)
from napari_pvs.training.checkpointing import (
    read_resume_point,
    restore_optimizer,
    save_epoch_checkpoints,
)
from napari_pvs.training.config import TrainConfig, TrainResult
from napari_pvs.training.data import TrainingVolume, split_volumes
from napari_pvs.training.distributed import (
    TrainingOutputs,
    any_process,
    broadcast_weights,
    from_main,
    no_buffer_sync,
    rank_and_world,
    sync_batchnorm,
)
from napari_pvs.training.losses import distributed_masked_loss, masked_loss
from napari_pvs.training.sampling import IndexedVolume, draw_batch, validation_batches
from napari_pvs.training.validation import evaluate_patches


@dataclass
class _Run:
    """What set-up decided for one run: the model on its device, the data, the optimizer and
    where this process stands among the others."""

    model: nn.Module
    config: TrainConfig
    rank: int
    world: int
    share: range  # this process's patches of each global batch
    device: torch.device
    train_items: list[IndexedVolume]
    val_batches: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype
    use_amp: bool
    info: dict[str, Any]  # the checkpoints' training metadata
    out_path: Path | None
    # The step's forward pass and loss: set by _step_functions once the run is resumed.
    forward: Callable | None = None
    loss_of: Callable | None = None

    @property
    def main(self) -> bool:
        """Rank 0: reports progress, reads the resume checkpoint and writes checkpoints."""
        return self.rank == 0

    @property
    def use_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.config.steps_per_epoch


@dataclass
class _Standing:
    """Where a run stands: its history and best epoch so far (what a resume restores)."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_dice: float = -1.0
    best_epoch: int = -1
    start_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None  # best weights of this call, in memory


def fit(
    model,
    volumes: Sequence[TrainingVolume],
    config: TrainConfig | None = None,
    out: str | Path | None = None,
    *,
    resume: bool = True,
    validation: Sequence[TrainingVolume] | None = None,
    training_info: dict[str, Any] | None = None,
    progress: ProgressCallback = no_progress,
    cancel: CancelToken | None = None,
    distributed: bool | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
) -> TrainResult:
    """Train ``model`` on ``volumes``; keep the best (validation Dice) weights in ``out``.

    ``on_epoch(record)`` receives each epoch's history record (``epoch``, ``train_loss``,
    ``val_dice``, ``seconds``) as soon as it is validated, on rank 0 only, so a round can plot
    validation Dice live. ``evaluate(model)``, when given (one process only), replaces the
    epoch's validation Dice: a round passes the project's one validation Dice on its whole
    validation crops, so the live curve and the version's number are the same measure.

    Validation uses ``validation`` if given, else a seed-fixed share of ``volumes`` (the same
    split every run, so rounds stay comparable). Each epoch also writes a resumable
    ``<out>.last.safetensors`` (weights + optimizer); with ``resume`` a run continues from it.
    Stops early after ``config.patience`` epochs without improvement; raises
    :class:`~napari_pvs.progress.Cancelled` when cancelled (saved checkpoints stay).

    Several processes (``distributed``: None = whenever a ``torch.distributed`` process group
    is initialised, see :func:`distributed_context`; False = train alone regardless):
    ``config.batch_size`` is the global batch, each process trains on its contiguous share
    inside DistributedDataParallel, and every step equals one process's step on the global
    batch (within float rounding; dropout masks are drawn per process). Validation is split
    across processes and its counts summed, so all take the same best/stop decisions. Only
    rank 0 reports progress, reads the resume checkpoint and writes checkpoints; when ``fit``
    returns on any process, they are written and every process holds the same weights.
    """
    config = config or TrainConfig()
    run = _set_up(model, volumes, config, out, validation, training_info, distributed)
    if evaluate is not None and run.world > 1:
        raise ValueError("evaluate is for one process; several processes validate on patches")
    standing = _resume(run, resume)
    run.forward, run.loss_of = _step_functions(run)
    report = progress if run.main else no_progress
    stopped_early = False
    epoch = standing.start_epoch - 1
    run_started = time.perf_counter()
    for epoch in range(standing.start_epoch, config.epochs):
        if _should_stop(run, standing, epoch, run_started):
            stopped_early = True
            break
        _run_epoch(run, standing, epoch, report, cancel, on_epoch, evaluate)
    _finish(run, standing)
    return TrainResult(
        best_dice=standing.best_dice,
        best_epoch=standing.best_epoch,
        epochs_run=epoch + 1,
        stopped_early=stopped_early,
        history=standing.history,
        checkpoint=run.out_path,
    )


# ---------------------------------------------------------------------------------------------
# Set-up


def _set_up(
    model,
    volumes: Sequence[TrainingVolume],
    config: TrainConfig,
    out: str | Path | None,
    validation: Sequence[TrainingVolume] | None,
    training_info: dict[str, Any] | None,
    distributed: bool | None,
) -> _Run:
    """Check the request, find this process's place, index the data, place the model on its
    device and build the optimizer: everything the epochs need, before any training."""
    if not volumes:
        raise ValueError("no training volumes given; pass at least one labelled image")
    too_small = [p for p in config.patch if p < 2 * model.size_divisor]
    if too_small:
        raise ValueError(
            f"patch {config.patch} is too small for {model.name!r}: every side must be at least "
            f"{2 * model.size_divisor} voxels (twice its size divisor {model.size_divisor})"
        )
    rank, world = rank_and_world(distributed)
    if config.batch_size % world:
        raise ValueError(
            f"batch_size {config.batch_size} does not split evenly over {world} processes; use a "
            f"global batch size that is a multiple of {world} (e.g. "
            f"{-(-config.batch_size // world) * world})"
        )
    share = range(rank * config.batch_size // world, (rank + 1) * config.batch_size // world)
    device = resolve_device(config.device)
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    train_items, val_items, split_note = _index_data(volumes, validation, config)
    val_batches = validation_batches(val_items, config)[rank::world]
    model = _place_model(model, device, world)
    use_cuda = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_cuda and torch.cuda.is_bf16_supported() else torch.float16
    use_amp = bool(config.amp and use_cuda)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    optimizer, scheduler = _optimizer_and_schedule(model, config)
    info = {
        "config": _jsonable(asdict(config)),
        "split": split_note,
        "modalities": sorted({v.modality for v in volumes}),
        "processes": world,
        **(training_info or {}),
    }
    return _Run(
        model=model,
        config=config,
        rank=rank,
        world=world,
        share=share,
        device=device,
        train_items=train_items,
        val_batches=val_batches,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        amp_dtype=amp_dtype,
        use_amp=use_amp,
        info=info,
        out_path=Path(out) if out is not None else None,
    )


def _index_data(
    volumes: Sequence[TrainingVolume],
    validation: Sequence[TrainingVolume] | None,
    config: TrainConfig,
) -> tuple[list[IndexedVolume], list[IndexedVolume], str]:
    """Training and validation items, and how they were split (stored in the checkpoint)."""
    indexed = [IndexedVolume(v) for v in volumes]
    if validation:
        return indexed, [IndexedVolume(v) for v in validation], "given"
    train_ids, val_ids = split_volumes(len(indexed), config.validation_fraction, config.seed)
    train_items = [indexed[i] for i in train_ids]
    val_items = [indexed[i] for i in val_ids]
    split_note = "same as training (one volume)" if train_ids == val_ids else "seeded split"
    return train_items, val_items, split_note


def _place_model(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """The model on ``device`` (channels-last on CUDA), its BatchNorm synchronised across
    processes when there are several."""
    if world > 1:
        model = sync_batchnorm(model, device)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last_3d)
    return model


def _optimizer_and_schedule(model: nn.Module, config: TrainConfig):
    """AdamW with a cosine learning-rate decay to zero over the run's steps."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    total_steps = config.epochs * config.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    return optimizer, scheduler


def _resume(run: _Run, resume: bool) -> _Standing:
    """With ``resume``, continue from ``<out>.last`` if there is one: rank 0 reads it, every
    process receives the weights, optimizer and scheduler state and the history."""
    resumed = None  # rank 0 reads the resume state; the others receive it
    if run.main and resume and run.out_path is not None:
        resumed = read_resume_point(run.model, run.out_path)
    if run.world > 1:
        shared = [resumed]
        dist.broadcast_object_list(shared, src=0, device=run.device)
        resumed = shared[0]
    if resumed is None:
        return _Standing()
    state, optimizer_state = resumed
    restore_optimizer(run.optimizer, optimizer_state, state["param_groups"])
    run.scheduler.load_state_dict(state["scheduler"])
    return _Standing(
        history=state["history"],
        best_dice=state["best_dice"],
        best_epoch=state["best_epoch"],
        start_epoch=state["epoch"] + 1,
    )


def _step_functions(run: _Run) -> tuple[Callable, Callable]:
    """``(forward, loss_of)`` of a step: through DDP on several processes (every process starts
    from rank 0's, possibly resumed, weights), the model itself alone. ``loss_of`` returns
    ``(to_backward, value)``."""
    if run.world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            TrainingOutputs(run.model),
            device_ids=[run.device.index] if run.use_cuda else None,
            **no_buffer_sync(),
        )

        def forward(image, modalities):
            return ddp(image, modalities)

        def loss_of(outputs, labels):
            return distributed_masked_loss(outputs, labels)

        return forward, loss_of

    def loss_alone(outputs, labels):
        loss = masked_loss(outputs, labels)
        return loss, loss.detach()

    return run.model.training_outputs, loss_alone


# ---------------------------------------------------------------------------------------------
# Epochs and steps


def _should_stop(run: _Run, standing: _Standing, epoch: int, run_started: float) -> bool:
    """Early stopping: ``patience`` epochs without improvement, or the wall-clock budget spent
    (rank 0's clock decides for every process)."""
    if epoch - standing.best_epoch > run.config.patience and standing.best_epoch >= 0:
        return True
    elapsed = time.perf_counter() - run_started
    over_time = run.config.max_minutes is not None and elapsed > 60 * run.config.max_minutes
    return from_main(over_time, run.device) if run.world > 1 else over_time


def _run_epoch(
    run: _Run,
    standing: _Standing,
    epoch: int,
    report: ProgressCallback,
    cancel: CancelToken | None,
    on_epoch: Callable[[dict[str, float]], None] | None,
    evaluate: Callable[[nn.Module], float] | None = None,
) -> None:
    """Train one epoch, validate, record it, keep the best weights and write the checkpoints."""
    started = time.perf_counter()
    losses = _train_epoch(run, epoch, report, cancel)
    if evaluate is not None:
        val_dice = float(evaluate(run.model))
    else:
        val_dice = evaluate_patches(run.model, run.val_batches, run.device, run.world)
    record = {
        "epoch": epoch,
        "train_loss": float(np.mean(losses)),
        "val_dice": val_dice,
        "seconds": time.perf_counter() - started,
    }
    standing.history.append(record)
    if on_epoch is not None and run.main:
        on_epoch(dict(record))
    improved = val_dice >= standing.best_dice  # ties: keep the later, longer-trained weights
    if improved:
        standing.best_dice, standing.best_epoch = val_dice, epoch
        standing.best_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    if run.out_path is not None and run.main:
        save_epoch_checkpoints(
            run.model,
            run.optimizer,
            run.scheduler,
            run.out_path,
            run.info,
            epoch=epoch,
            best_dice=standing.best_dice,
            best_epoch=standing.best_epoch,
            history=standing.history,
            improved=improved,
        )


def _train_epoch(
    run: _Run, epoch: int, report: ProgressCallback, cancel: CancelToken | None
) -> list[float]:
    """The epoch's training steps (seeded dropout, progress per step); their losses."""
    config = run.config
    # Dropout: every process seeds its own stream (rank 0 the seed one process uses).
    torch.manual_seed(config.seed * 100_003 + epoch + 1_000_003 * run.rank)
    run.model.train()
    losses = []
    for step in range(config.steps_per_epoch):
        _check_cancelled(run, cancel)
        losses.append(_train_step(run, epoch, step))
        done = epoch * config.steps_per_epoch + step + 1
        report(done, run.total_steps, f"epoch {epoch + 1}/{config.epochs} loss {losses[-1]:.3f}")
    return losses


def _check_cancelled(run: _Run, cancel: CancelToken | None) -> None:
    """Raise Cancelled on every process when any process was asked to stop."""
    if run.world == 1:
        check_cancelled(cancel)
    elif any_process(cancel is not None and cancel.is_set(), run.device):
        raise Cancelled("cancelled on one of the processes; finished work has been kept")


def _train_step(run: _Run, epoch: int, step: int) -> float:
    """One optimizer step on this process's share of the step's global batch; the loss of the
    global batch."""
    images, labels, modalities = draw_batch(run.train_items, run.config, epoch, step, run.share)
    image_t = torch.from_numpy(images).to(run.device)
    label_t = torch.from_numpy(labels).to(run.device)
    if run.use_cuda:
        image_t = image_t.to(memory_format=torch.channels_last_3d)
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.use_amp):
        outputs = run.forward(image_t, modalities)
    to_backward, loss = run.loss_of(outputs, label_t)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(to_backward).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    return float(loss)


def _finish(run: _Run, standing: _Standing) -> None:
    """Leave the model holding its best weights, the same on every process, and return on no
    process before rank 0 has written its checkpoints."""
    if standing.best_state is not None:
        run.model.load_state_dict(standing.best_state)
    elif run.out_path is not None:
        if run.main and run.out_path.is_file():
            load_weights_into(run.model, run.out_path)
        if run.world > 1:
            broadcast_weights(run.model)
    if run.world > 1:  # returning anywhere means rank 0's checkpoints are written
        any_process(False, run.device)
    run.model.eval()


def _jsonable(value):
    """A JSON round trip of ``value`` (tuples become lists, numpy scalars numbers)."""

    def fallback(item):
        return item.tolist() if hasattr(item, "tolist") else str(item)

    return json.loads(json.dumps(value, default=fallback))

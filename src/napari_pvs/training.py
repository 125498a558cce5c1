"""Training and fine-tuning on labelled 3D patches or whole labelled volumes.

Labels are uint8: 1 = PVS, 0 = not PVS, 255 = unlabelled. The loss (BCE + soft Dice) is
computed only over labelled voxels, so a volume of which the annotator corrected a few patches
trains correctly: that is what active learning produces. Patches are read from lazy arrays
(numpy, dask or zarr) one at a time; memory does not grow with the volume.

Determinism: every patch's sampling and augmentation derive from ``(seed, epoch, step, index in
the batch)``, so a run resumed from its last checkpoint continues exactly as the uninterrupted
run would, and a run split over several processes (``torchrun``, see :func:`distributed_context`)
draws the same global batches as one process: each process draws only its contiguous share.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from napari_pvs.intensity import normalize, robust_range, tissue_mask
from napari_pvs.io import check_label_values
from napari_pvs.metrics import dice
from napari_pvs.models import canonical_modality, resolve_device
from napari_pvs.models.checkpoint import (
    load_weights_into,
    optimizer_tensors,
    read_checkpoint,
    save_checkpoint,
)
from napari_pvs.progress import (
    Cancelled,
    CancelToken,
    ProgressCallback,
    check_cancelled,
    no_progress,
)

#: Label value meaning "not annotated": ignored by the loss and by validation.
UNLABELLED = 255


@dataclass
class TrainingVolume:
    """One labelled image: a whole volume or a patch (arrays may be lazy)."""

    image: Any
    labels: Any
    modality: str = "unknown"
    name: str = ""
    intensity_range: tuple[float, float] | None = None  # robust (low, high); computed if None

    def __post_init__(self) -> None:
        if tuple(self.image.shape) != tuple(self.labels.shape):
            raise ValueError(
                f"image {tuple(self.image.shape)} and labels {tuple(self.labels.shape)} of "
                f"{self.name or 'a training volume'} differ in shape; they must match voxel "
                "for voxel"
            )
        if len(self.image.shape) != 3:
            raise ValueError(f"training images must be 3D, got shape {tuple(self.image.shape)}")
        self.modality = canonical_modality(self.modality)
        # 0 background, 1 PVS, 255 unlabelled; anything else refused, no PVS at all warned about
        check_label_values(self.labels, f"labels of {self.name or 'a training volume'}")


@dataclass
class TrainConfig:
    """Everything that decides a training run (stored in the checkpoint)."""

    epochs: int = 20
    steps_per_epoch: int = 50
    batch_size: int = 2
    patch: tuple[int, int, int] = (64, 64, 64)
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    foreground_fraction: float = 0.6  # share of patches centred on a PVS voxel
    # Share centred on a PVS look-alike: an unlabelled-as-PVS voxel of high local contrast
    # (sulcal CSF, vessels, lacune and lesion borders), where false positives come from.
    hard_negative_fraction: float = 0.2
    validation_fraction: float = 0.2  # share of volumes held out (fixed by seed)
    validation_patches: int = 8
    patience: int = 6  # epochs without validation improvement before stopping
    seed: int = 0
    augment: bool = True
    amp: bool = True  # mixed precision, CUDA only
    device: str = "auto"
    max_minutes: float | None = None  # wall-clock budget: stop after the epoch that exceeds it

    def __post_init__(self) -> None:
        self.patch = tuple(int(p) for p in self.patch)  # type: ignore[assignment]
        if len(self.patch) != 3 or min(self.patch) < 8:
            raise ValueError(f"patch must be three sizes >= 8 voxels, got {self.patch}")
        if self.epochs < 1 or self.steps_per_epoch < 1 or self.batch_size < 1:
            raise ValueError("epochs, steps_per_epoch and batch_size must be at least 1")
        shares = (self.foreground_fraction, self.hard_negative_fraction)
        if min(shares) < 0 or sum(shares) > 1:
            raise ValueError(
                "foreground_fraction and hard_negative_fraction must be >= 0 and sum to at "
                f"most 1, got {self.foreground_fraction} and {self.hard_negative_fraction}"
            )


@dataclass
class TrainResult:
    best_dice: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None


# ---------------------------------------------------------------------------------------------
# Sampling


class _Indexed:
    """A training volume with its intensity range and where its (labelled) voxels are."""

    #: Hard negatives: background voxels in the top 2% of local contrast of their slab.
    HARD_NEGATIVE_QUANTILE = 0.98

    def __init__(self, volume: TrainingVolume, max_points: int = 200_000) -> None:
        self.volume = volume
        self.shape = tuple(int(s) for s in volume.image.shape)
        self.range = volume.intensity_range or robust_range(volume.image)
        foreground, labelled, hard = [], [], []
        slab = 32
        rng = np.random.default_rng(0)
        for z0 in range(0, self.shape[0], slab):
            block = np.asarray(volume.labels[z0 : z0 + slab])
            raw = np.asarray(volume.image[z0 : z0 + slab])
            tissue = tissue_mask(raw, *self.range)
            image = normalize(raw, *self.range)
            fg = np.argwhere(block == 1)
            # Background patches centre on labelled tissue: air outside the head teaches nothing.
            lab = np.argwhere((block != UNLABELLED) & tissue)
            if len(lab) == 0:
                lab = np.argwhere(block != UNLABELLED)
            # PVS look-alikes: thin bright or dark structures stand out from their surroundings.
            # The head's outline is the strongest edge of all and teaches nothing: skip it.
            contrast = np.abs(image - ndimage.gaussian_filter(image, 2.0))
            inner = ndimage.binary_erosion(tissue, np.ones((1, 3, 3), bool), iterations=3)
            negative = (block == 0) & inner
            hn = np.empty((0, 3), dtype=np.int64)
            if negative.any() and inner.any():
                cut = np.quantile(contrast[inner], self.HARD_NEGATIVE_QUANTILE)
                hn = np.argwhere(negative & (contrast > cut))
            labelled.append(_in_volume(_limit(lab, 4096, rng), z0))
            hard.append(_in_volume(_limit(hn, 4096, rng), z0))
            foreground.append(_in_volume(fg, z0))
        self.foreground = _limit(np.concatenate(foreground), max_points, rng)
        self.labelled = _limit(np.concatenate(labelled), max_points, rng)
        self.hard_negatives = _limit(np.concatenate(hard), max_points, rng)
        if len(self.labelled) == 0:
            raise ValueError(
                f"{volume.name or 'a training volume'} has no labelled voxels (all are "
                f"{UNLABELLED} = unlabelled); label at least one patch or drop it"
            )

    def patch(self, centre: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Image (normalised) and labels around ``centre``; padded where it leaves the volume."""
        starts = [int(c) - s // 2 for c, s in zip(centre, size, strict=True)]
        src, dst = [], []
        for start, s, dim in zip(starts, size, self.shape, strict=True):
            lo, hi = max(start, 0), min(start + s, dim)
            src.append(slice(lo, hi))
            dst.append(slice(lo - start, hi - start))
        image = np.zeros(size, np.float32)
        labels = np.full(size, UNLABELLED, np.uint8)
        image[tuple(dst)] = normalize(np.asarray(self.volume.image[tuple(src)]), *self.range)
        labels[tuple(dst)] = np.asarray(self.volume.labels[tuple(src)])
        return image, labels

    def centre(self, rng: np.random.Generator, kind: str = "any") -> np.ndarray:
        """A patch centre: ``kind`` 'foreground', 'hard' (negative) or 'any' labelled voxel."""
        pools = {"foreground": self.foreground, "hard": self.hard_negatives}
        points = pools.get(kind, self.labelled)
        if not len(points):
            points = self.labelled
        return points[rng.integers(len(points))]


def _in_volume(points: np.ndarray, z0: int) -> np.ndarray:
    """Slab coordinates -> volume coordinates (the slab starts at ``z0``)."""
    points[:, 0] += z0
    return points


def _limit(points: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return points if len(points) <= n else points[rng.choice(len(points), n, replace=False)]


def split_volumes(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Fixed (train, validation) indices; with one item, it serves both (stated in history)."""
    if n == 1 or fraction <= 0:
        return list(range(n)), list(range(n))
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(fraction * n)))
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


# ---------------------------------------------------------------------------------------------
# Augmentation


def augment(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """PVS-suited augmentation of one normalised patch (labels keep 0/1/255 exactly)."""
    for axis in range(3):
        if rng.random() < 0.5:
            image, labels = np.flip(image, axis), np.flip(labels, axis)
    if rng.random() < 0.3:  # small rotation: PVS orientation varies with anatomy
        axes = [(0, 1), (0, 2), (1, 2)][rng.integers(3)]
        angle = rng.uniform(-12, 12)
        image = ndimage.rotate(image, angle, axes, reshape=False, order=1, mode="nearest")
        labels = ndimage.rotate(
            labels, angle, axes, reshape=False, order=0, mode="constant", cval=UNLABELLED
        )
    if rng.random() < 0.2:  # resolution jitter: thick slices blur thin PVS
        axis = rng.integers(3)
        factor = rng.uniform(1.3, 2.2)
        zoom = [1.0, 1.0, 1.0]
        zoom[axis] = 1.0 / factor
        small = ndimage.zoom(image, zoom, order=1)
        image = ndimage.zoom(small, np.array(image.shape) / np.array(small.shape), order=1)
    image = np.ascontiguousarray(image, dtype=np.float32)
    if rng.random() < 0.3:  # smooth multiplicative bias field
        grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in image.shape], indexing="ij")
        field_ = sum(rng.normal(0, 0.15) * g for g in grids)
        field_ = field_ + sum(rng.normal(0, 0.1) * g * g for g in grids)
        image = image * np.exp(field_).astype(np.float32)
    if rng.random() < 0.3:  # gamma on the positive part
        gamma = rng.uniform(0.7, 1.5)
        image = np.sign(image) * np.abs(image) ** gamma
    if rng.random() < 0.5:  # global scale and shift
        image = image * rng.uniform(0.85, 1.15) + rng.uniform(-0.08, 0.08)
    if rng.random() < 0.3:
        image = image + rng.normal(0, rng.uniform(0.01, 0.06), image.shape)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(labels)


# ---------------------------------------------------------------------------------------------
# Loss and metric


def masked_loss(outputs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice over labelled voxels; coarse deep-supervision logits are upsampled.

    ``labels`` is ``(B, 1, D, H, W)`` with 0/1 and :data:`UNLABELLED`. Levels are weighted
    1, 1/2, 1/4... (normalised). Returns zero (with a graph) when nothing is labelled.
    """
    return _loss_from_sums(_loss_sums(outputs, labels))


def distributed_masked_loss(
    outputs: list[torch.Tensor], labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`masked_loss` of the global batch when each process holds a share of it.

    The loss is a function of sums over the whole batch (labelled voxels, BCE, the soft-Dice
    terms), not a mean of per-sample losses, so averaging per-process losses (what DDP's
    gradient averaging would do) weights a share with few labelled voxels as much as one
    with many. Instead the sums are all-reduced and each process differentiates the global
    loss through its own share only. Returns ``(to_backward, value)``: ``value`` is the global
    loss (identical on every process); ``to_backward`` is it times the world size, because DDP
    divides the summed gradients by the world size, so the step equals one process's step on
    the global batch.
    """
    local = _loss_sums(outputs, labels)
    total = local.detach().clone()
    dist.all_reduce(total)
    loss = _loss_from_sums(local + (total - local.detach()))  # global value, local gradient
    return loss * dist.get_world_size(), loss.detach()


def _loss_sums(outputs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Per level: BCE sum, labelled voxels, soft intersection, prediction sum, PVS voxels."""
    mask = (labels != UNLABELLED).float()
    target = (labels == 1).float()
    rows = []
    for logits in outputs:
        if logits.shape[2:] != labels.shape[2:]:
            logits = F.interpolate(logits, size=labels.shape[2:], mode="trilinear")
        logits = logits.float()
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        prob = torch.sigmoid(logits) * mask
        rows.append(
            torch.stack(
                [
                    (bce * mask).sum(),
                    mask.sum(),
                    (prob * target).sum(),
                    prob.sum(),
                    (target * mask).sum(),
                ]
            )
        )
    return torch.stack(rows)


def _loss_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """The loss from :func:`_loss_sums` (of one batch, or all-reduced over processes)."""
    weights = sums.new_tensor([0.5**i for i in range(len(sums))])
    bce = sums[:, 0] / sums[:, 1].clamp(min=1.0)
    dice = 1 - (2 * sums[:, 2] + 1.0) / (sums[:, 3] + sums[:, 4] + 1.0)
    return (weights * (bce + dice)).sum() / weights.sum()


def labelled_dice(prob: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> float:
    """Voxel Dice at ``threshold`` over labelled voxels (1.0 when both are empty)."""
    mask = labels != UNLABELLED
    return dice((prob >= threshold) & mask, (labels == 1) & mask)


# ---------------------------------------------------------------------------------------------
# Optimizer state <-> flat tensors (safetensors holds tensors only)


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value)
    return tensors, state["param_groups"]


def _restore_optimizer(optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def last_checkpoint_path(out: str | Path) -> Path:
    """The resumable 'last epoch' checkpoint written next to ``out``."""
    out = Path(out)
    return out.with_name(out.stem + ".last" + out.suffix)


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun): one per GPU, or CPU processes with gloo


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a ``torchrun`` job (world size 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "auto"  # what to pass as TrainConfig.device: cuda:LOCAL_RANK under torchrun
    backend: str | None = None  # "nccl" (CUDA) or "gloo" (CPU); None when not distributed

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that reports progress, prints and writes checkpoints."""
        return self.rank == 0


#: The variables torchrun sets for every process it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def distributed_context(device: str = "auto") -> Iterator[DistributedContext]:
    """Join the ``torchrun`` job this process belongs to, and leave it on exit.

    Reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
    picks the device (``cuda:LOCAL_RANK`` with NCCL when ``device`` is 'auto' or 'cuda' and
    CUDA is present, else the CPU with gloo) and initialises the default process group, which
    :func:`fit` then uses. Without torchrun (no WORLD_SIZE, or 1) it yields a single-process
    context and touches nothing; if a process group already exists it is used and left open.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        backend = str(dist.get_backend())
        chosen = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else device
        yield DistributedContext(rank, world, local, chosen, backend)
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield DistributedContext(device=device)
        return
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE is {world} but {', '.join(missing)} are not set; start the command "
            "with torchrun (e.g. torchrun --nproc_per_node 2 -m napari_pvs.rounds PROJECT)"
        )
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed; run without torchrun")
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        if ":" in str(device):
            raise ValueError(
                f"device {device!r} names one GPU, but under torchrun each process uses the GPU "
                "of its LOCAL_RANK; pass 'cuda' or 'auto'"
            )
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} CUDA "
                "device(s); start at most that many processes per machine (--nproc_per_node)"
            )
        torch.cuda.set_device(local)
        backend, chosen = "nccl", f"cuda:{local}"
    elif resolved.type == "cpu":
        backend, chosen = "gloo", "cpu"
    else:
        raise ValueError(f"training on several processes needs CUDA or the CPU, not {resolved}")
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
    try:
        yield DistributedContext(rank, world, local, chosen, backend)
    finally:
        dist.destroy_process_group()


def _world(distributed: bool | None) -> tuple[int, int]:
    """``(rank, world size)`` of the process group ``fit`` trains in; ``(0, 1)`` alone."""
    ready = dist.is_available() and dist.is_initialized()
    if distributed and not ready:
        raise ValueError(
            "distributed=True but no process group is initialised; run under torchrun inside "
            "napari_pvs.training.distributed_context()"
        )
    if distributed is False or not ready:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _any_process(flag: bool, device: torch.device) -> bool:
    """True on every process if ``flag`` is true on any (cancel reaches all of them)."""
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _from_main(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every process (wall-clock decisions must not differ by process)."""
    value = torch.tensor([float(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def _broadcast_weights(model: nn.Module) -> None:
    """Copy rank 0's weights and buffers into every process's model."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)


def _no_buffer_sync() -> dict[str, bool]:
    """DDP option: buffers are not re-broadcast every step (they are constants or SyncBatchNorm
    statistics, equal everywhere); the name changed in torch 2.13 (still synced at start)."""
    parameters = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    name = "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"
    return {name: False}


class _TrainingOutputs(nn.Module):
    """``model.training_outputs`` as ``forward``: DDP synchronises gradients of forward only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, modalities: list[str]) -> list[torch.Tensor]:
        return self.model.training_outputs(image, modalities)


def _sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm statistics over the global batch (none of the bundled models has any)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if device.type != "cuda":
        raise ValueError(
            f"{getattr(model, 'name', 'the model')!r} has BatchNorm layers, whose statistics "
            "can be synchronised across processes only on CUDA; train it on GPUs or in one "
            "process"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


# ---------------------------------------------------------------------------------------------
# The loop


def _batch(
    items: list[_Indexed],
    config: TrainConfig,
    epoch: int,
    step: int,
    indices: Sequence[int],
    train: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Patches ``indices`` of the step's global batch, each drawn from its own seed.

    Seeding per ``(seed, epoch, step, index)`` makes a patch independent of which process
    draws it: one process draws ``range(batch_size)``, each of N processes its contiguous
    share, and together they draw the same patches with the same augmentations.
    """
    images, labels, modalities = [], [], []
    for index in indices:
        rng = np.random.default_rng([config.seed, epoch, step, index])
        item = items[rng.integers(len(items))]
        draw = rng.random()
        if draw < config.foreground_fraction:
            kind = "foreground"
        elif draw < config.foreground_fraction + config.hard_negative_fraction:
            kind = "hard"
        else:
            kind = "any"
        # Many small items (reviewed patches) mostly hold no PVS: draw a foreground (or hard)
        # centre from an item that has one, so the share stays what the config says.
        pool = {"foreground": "foreground", "hard": "hard_negatives"}.get(kind)
        if pool is not None and not len(getattr(item, pool)):
            having = [other for other in items if len(getattr(other, pool))]
            if having:
                item = having[rng.integers(len(having))]
        centre = item.centre(rng, kind)
        centre = centre + rng.integers(-config.patch[0] // 4, config.patch[0] // 4 + 1, 3)
        image, label = item.patch(centre, config.patch)
        if train and config.augment:
            image, label = augment(image, label, rng)
        images.append(image)
        labels.append(label)
        modalities.append(item.volume.modality)
    return np.stack(images)[:, None], np.stack(labels)[:, None], modalities


def _validation_set(items: list[_Indexed], config: TrainConfig):
    rng = np.random.default_rng([config.seed, 999_999])
    batches = []
    for i in range(config.validation_patches):
        item = items[i % len(items)]
        centre = item.centre(rng, ("foreground", "hard", "any")[i % 3])
        image, label = item.patch(centre, config.patch)
        batches.append((image[None, None], label, item.volume.modality))
    return batches


def evaluate_patches(model, batches, device: torch.device) -> float:
    """Dice over all validation patches pooled (labelled voxels only)."""
    inter, total = _overlap_counts(model, batches, device)
    return 1.0 if total == 0 else 2 * inter / total


def _overlap_counts(model, batches, device: torch.device) -> tuple[float, float]:
    """(prediction & truth, prediction + truth) voxel counts over ``batches``: they add up
    across processes exactly, so every process derives the same validation Dice."""
    model.eval()
    inter = total = 0.0
    with torch.no_grad():
        for image, label, modality in batches:
            prob = torch.sigmoid(model(torch.from_numpy(image).to(device), modality))
            pred = prob[0, 0].float().cpu().numpy() >= 0.5
            mask = label != UNLABELLED
            truth = (label == 1) & mask
            pred &= mask
            inter += float((pred & truth).sum())
            total += float(pred.sum() + truth.sum())
    return inter, total


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
) -> TrainResult:
    """Train ``model`` on ``volumes``; keep the best (validation Dice) weights in ``out``.

    ``on_epoch(record)`` receives each epoch's history record (``epoch``, ``train_loss``,
    ``val_dice``, ``seconds``) as soon as it is validated, on rank 0 only, so a round can plot
    validation Dice live.

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
    if not volumes:
        raise ValueError("no training volumes given; pass at least one labelled image")
    too_small = [p for p in config.patch if p < 2 * model.size_divisor]
    if too_small:
        raise ValueError(
            f"patch {config.patch} is too small for {model.name!r}: every side must be at least "
            f"{2 * model.size_divisor} voxels (twice its size divisor {model.size_divisor})"
        )
    rank, world = _world(distributed)
    if config.batch_size % world:
        raise ValueError(
            f"batch_size {config.batch_size} does not split evenly over {world} processes; use a "
            f"global batch size that is a multiple of {world} (e.g. "
            f"{-(-config.batch_size // world) * world})"
        )
    main = rank == 0
    share = range(rank * config.batch_size // world, (rank + 1) * config.batch_size // world)
    device = resolve_device(config.device)
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    indexed = [_Indexed(v) for v in volumes]
    if validation:
        train_items, val_items = indexed, [_Indexed(v) for v in validation]
        split_note = "given"
    else:
        train_ids, val_ids = split_volumes(len(indexed), config.validation_fraction, config.seed)
        train_items = [indexed[i] for i in train_ids]
        val_items = [indexed[i] for i in val_ids]
        split_note = "same as training (one volume)" if train_ids == val_ids else "seeded split"
    val_batches = _validation_set(val_items, config)[rank::world]

    if world > 1:
        model = _sync_batchnorm(model, device)
    model.to(device)
    use_cuda = device.type == "cuda"
    if use_cuda:
        model.to(memory_format=torch.channels_last_3d)
    amp_dtype = torch.bfloat16 if use_cuda and torch.cuda.is_bf16_supported() else torch.float16
    use_amp = bool(config.amp and use_cuda)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    total_steps = config.epochs * config.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )

    info = {
        "config": _jsonable(asdict(config)),
        "split": split_note,
        "modalities": sorted({v.modality for v in volumes}),
        "processes": world,
        **(training_info or {}),
    }
    history: list[dict[str, float]] = []
    best_dice, best_epoch, start_epoch = -1.0, -1, 0
    out_path = Path(out) if out is not None else None
    last_path = last_checkpoint_path(out_path) if out_path is not None else None
    resumed = None  # rank 0 reads the resume state; the others receive it
    if main and resume and last_path is not None and last_path.is_file():
        meta = load_weights_into(model, last_path)
        resumed = (meta["training"]["resume"], optimizer_tensors(last_path))
        if out_path.is_file():
            read_checkpoint(out_path)  # the best checkpoint must still be intact
    if world > 1:
        shared = [resumed]
        dist.broadcast_object_list(shared, src=0, device=device)
        resumed = shared[0]
    if resumed is not None:
        state, optimizer_state = resumed
        _restore_optimizer(optimizer, optimizer_state, state["param_groups"])
        scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
        best_dice, best_epoch = state["best_dice"], state["best_epoch"]
        start_epoch = state["epoch"] + 1
    if world > 1:  # DDP starts every process from rank 0's (possibly resumed) weights
        ddp = nn.parallel.DistributedDataParallel(
            _TrainingOutputs(model),
            device_ids=[device.index] if use_cuda else None,
            **_no_buffer_sync(),
        )

        def forward(image, modalities):
            return ddp(image, modalities)

        def loss_of(outputs, labels):
            return distributed_masked_loss(outputs, labels)
    else:
        forward = model.training_outputs

        def loss_of(outputs, labels):
            loss = masked_loss(outputs, labels)
            return loss, loss.detach()

    report = progress if main else no_progress
    stopped_early = False
    best_state: dict[str, torch.Tensor] | None = None
    epoch = start_epoch - 1
    run_started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        if epoch - best_epoch > config.patience and best_epoch >= 0:
            stopped_early = True
            break
        elapsed = time.perf_counter() - run_started
        over_time = config.max_minutes is not None and elapsed > 60 * config.max_minutes
        if _from_main(over_time, device) if world > 1 else over_time:
            stopped_early = True
            break
        # Dropout: every process seeds its own stream (rank 0 the seed one process uses).
        torch.manual_seed(config.seed * 100_003 + epoch + 1_000_003 * rank)
        model.train()
        started, losses = time.perf_counter(), []
        for step in range(config.steps_per_epoch):
            if world == 1:
                check_cancelled(cancel)
            elif _any_process(cancel is not None and cancel.is_set(), device):
                raise Cancelled("cancelled on one of the processes; finished work has been kept")
            images, labels, modalities = _batch(train_items, config, epoch, step, share)
            image_t = torch.from_numpy(images).to(device)
            label_t = torch.from_numpy(labels).to(device)
            if use_cuda:
                image_t = image_t.to(memory_format=torch.channels_last_3d)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                outputs = forward(image_t, modalities)
            to_backward, loss = loss_of(outputs, label_t)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(to_backward).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(float(loss))
            done = epoch * config.steps_per_epoch + step + 1
            report(done, total_steps, f"epoch {epoch + 1}/{config.epochs} loss {losses[-1]:.3f}")
        inter, total = _overlap_counts(model, val_batches, device)
        if world > 1:
            counts = torch.tensor([inter, total], dtype=torch.float64, device=device)
            dist.all_reduce(counts)
            inter, total = counts.tolist()
        val_dice = 1.0 if total == 0 else 2 * inter / total
        record = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "val_dice": val_dice,
            "seconds": time.perf_counter() - started,
        }
        history.append(record)
        if on_epoch is not None and main:
            on_epoch(dict(record))
        improved = val_dice >= best_dice  # ties: keep the later, longer-trained weights
        if improved:
            best_dice, best_epoch = val_dice, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if out_path is not None and main:
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
                last_path,
                metrics=metrics,
                training={**info, "resume": resume_state},
                optimizer_state=flat,
            )
    # Leave the model holding its best weights.
    if best_state is not None:
        model.load_state_dict(best_state)
    elif out_path is not None:
        if main and out_path.is_file():
            load_weights_into(model, out_path)
        if world > 1:
            _broadcast_weights(model)
    if world > 1:  # returning anywhere means rank 0's checkpoints are written
        _any_process(False, device)
    model.eval()
    return TrainResult(
        best_dice=best_dice,
        best_epoch=best_epoch,
        epochs_run=epoch + 1,
        stopped_early=stopped_early,
        history=history,
        checkpoint=out_path,
    )


def calibrate_segmentation(
    model,
    volumes: Sequence[TrainingVolume],
    spacings: Sequence[Sequence[float]] | None = None,
    candidates_mm3: Sequence[float] = (0, 1, 2, 3, 4, 5, 6, 8),
    candidates_tta: Sequence[int] = (1, 4),
    min_tta_gain: float = 0.005,
    progress: ProgressCallback = no_progress,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Choose the test-time mirrorings and the smallest PVS cluster to keep, on fully labelled
    volumes the model has not seen.

    Isolated specks of one or two voxels are mostly noise, but real PVS can be that small, and
    averaging mirrored predictions sharpens thin structures but costs a network pass per mirror:
    both are trade-offs to measure, not to guess. Every (mirrorings, cut-off) pair is scored by
    the mean of voxel Dice and cluster F1 (threshold 0.5) over ``volumes``; more mirrorings are
    chosen only when they raise that score by at least ``min_tta_gain``. Returns the
    checkpoint's ``segmentation`` rule and one row per candidate pair. Use volumes held out
    from training and from any test set.
    """
    import tempfile

    import zarr

    from napari_pvs.inference import Predictor, min_cluster_voxels, remove_small_clusters
    from napari_pvs.metrics import evaluate

    spacings = spacings or [(1.0, 1.0, 1.0)] * len(volumes)
    pairs = [(int(t), float(c)) for t in candidates_tta for c in candidates_mm3]
    scores: dict[tuple[int, float], list[tuple[float, float]]] = {pair: [] for pair in pairs}
    steps, step = len(volumes) * len(candidates_tta), 0
    for index, (volume, spacing) in enumerate(zip(volumes, spacings, strict=True)):
        truth = np.asarray(volume.labels) == 1
        for tta in candidates_tta:
            progress(step, steps, f"calibrating on {volume.name or index} ({tta} mirrorings)")
            step += 1
            with tempfile.TemporaryDirectory() as tmp:
                predictor = Predictor(
                    model, modality=volume.modality, threshold=0.5, min_cluster_mm3=0, tta=tta
                )
                predictor.predict(np.asarray(volume.image), Path(tmp) / "p.zarr")
                mask = np.asarray(zarr.open_group(str(Path(tmp) / "p.zarr"))["segmentation"][:])
            for candidate in candidates_mm3:
                kept = mask.copy()
                remove_small_clusters(kept, min_cluster_voxels(candidate, spacing), kept.shape)
                result = evaluate(kept, truth, spacing=spacing)
                scores[(int(tta), float(candidate))].append(
                    (result["dice"], result["cluster"]["f1"])
                )
    progress(steps, steps, "calibrated")
    rows = [
        {
            "tta": tta,
            "min_cluster_mm3": candidate,
            "dice": float(np.mean([d for d, _ in values])),
            "f1": float(np.mean([f for _, f in values])),
        }
        for (tta, candidate), values in scores.items()
    ]

    def score(row: dict[str, float]) -> float:
        return (row["dice"] + row["f1"]) / 2

    best = None
    for tta in sorted(set(int(t) for t in candidates_tta)):
        own = max(
            (row for row in rows if row["tta"] == tta),
            key=lambda row: (score(row), -row["min_cluster_mm3"]),
        )
        if best is None or score(own) >= score(best) + min_tta_gain:
            best = own
    assert best is not None
    rule = {"threshold": 0.5, "min_cluster_mm3": best["min_cluster_mm3"], "tta": best["tta"]}
    return rule, rows


def _jsonable(value):
    """A JSON round trip of ``value`` (tuples become lists, numpy scalars numbers)."""
    def fallback(item):
        return item.tolist() if hasattr(item, "tolist") else str(item)

    return json.loads(json.dumps(value, default=fallback))

"""What decides a training run (:class:`TrainConfig`, stored in the checkpoint) and what it
returns (:class:`TrainResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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

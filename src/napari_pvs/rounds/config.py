"""What decides a round (:class:`RoundConfig`), how it ended (:class:`RoundOutcome`) and the
shape of its events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: A round's event: a plain dict with a ``kind`` (see ``docs/project.md``).
Event = dict[str, Any]


@dataclass
class RoundConfig:
    """What decides a round (stored in the round's ledger row)."""

    steps: int = 200
    batch_size: int = 2
    patch: int = 32  # training patch edge (voxels)
    learning_rate: float = 3e-4
    from_scratch: bool = False
    device: str = "auto"
    seed: int = 0
    max_minutes: float | None = None
    strategy: str | None = None  # queue strategy after the round (default: project setting)
    n: int | None = None  # queue length after the round (default: project setting)
    rerank: bool = True
    # Early stopping: epochs (of ``validate_every`` steps) without a better validation Dice
    # before the round stops (None: train all ``steps``); the best epoch's weights are kept.
    patience: int | None = None
    validate_every: int | None = None  # steps between validations (None: 50)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be at least 1")
        if self.patch < 8:
            raise ValueError(f"patch must be at least 8 voxels, got {self.patch}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be at least 1 epoch, got {self.patience}")
        if self.validate_every is not None and self.validate_every < 1:
            raise ValueError(f"validate_every must be at least 1 step, got {self.validate_every}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")


@dataclass
class RoundOutcome:
    round: int
    status: str  # done | failed | cancelled
    version: int | None  # the new version (done) or the one that stays current
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    stop_hint: str | None = None
    # False when the worse-round guard kept the new version without making it current.
    current: bool = True

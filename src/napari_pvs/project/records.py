"""What the project hands out: the ledger's rows as frozen records, its errors, and the
timestamp every record and event carries."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


class ProjectError(ValueError):
    """Not a project, a corrupt or too-new ledger: names the path; the data are never touched."""


class ProjectLocked(ProjectError):
    """Another live process holds the project for writing."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True)
class VolumeRecord:
    id: int
    name: str
    path: Path
    modality: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    fingerprint: str
    added: str


@dataclass(frozen=True)
class Annotation:
    id: int
    volume_id: int
    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    annotator: str
    created: str
    model_version: int | None
    seconds: float | None
    empty: bool
    patch_id: int | None
    split: str
    pvs_voxels: int | None


@dataclass(frozen=True)
class PatchRecord:
    id: int
    volume_id: int
    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    strategy: str
    score: float
    predicted_pvs: int
    model_version: int | None
    round: int | None
    rank: int
    status: str
    shown: str


@dataclass(frozen=True)
class ModelVersion:
    version: int
    checkpoint: Path
    parent: int | None
    created: str
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    manifest_hash: str | None = None
    round: int | None = None


@dataclass(frozen=True)
class RoundRecord:
    id: int
    started: str
    finished: str | None
    status: str
    base_version: int | None
    new_version: int | None
    config: dict[str, Any]
    snapshot_annotation_ids: list[int]
    message: str | None


@dataclass(frozen=True)
class CandidateRecord:
    """A predicted cluster as the project lists it for yes/no review (ids are stable)."""

    id: int
    volume_id: int
    model_version: int  # the version whose prediction proposed it
    bbox_start: list[int]  # the cluster's box [start, stop), voxel order
    bbox_stop: list[int]
    centre: list[float]  # voxel centroid
    seed: list[int]  # a voxel of the cluster
    voxels: int
    volume_mm3: float
    mean_probability: float
    uncertainty: float  # mean predictive entropy (bits) over its voxels
    rank: int  # 1 = ask first, among the volume's candidates of its version
    status: str  # "open", "yes", "no", "skipped", "edited", "stale"
    annotation_id: int | None = None  # the accepted patch of an "edited" candidate


@dataclass(frozen=True)
class AnswerRecord:
    """A yes/no/skip answer on a candidate: a partial label of the cluster's voxels."""

    id: int
    candidate_id: int
    volume_id: int
    answer: str  # "yes" | "no" | "skip"
    annotator: str
    created: str
    model_version: int  # the version whose prediction proposed the candidate
    split: str  # "train" or "held-out"
    bbox_start: list[int]
    bbox_stop: list[int]
    voxels_written: int  # label voxels this answer set (they were 255 before)
    seconds: float | None = None
    undone: str | None = None  # when it was undone (its voxels are 255 again)


def now() -> str:
    """The ledger's timestamp of every record and event: UTC, ISO 8601, to the millisecond."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")

"""The annotation project: a folder holding a durable label ledger, label stores and models.

A project is what a researcher copies, backs up and reopens years later (layout and contract:
``docs/project.md``). ``ledger.sqlite`` (WAL, ``synchronous=FULL``) records volumes, the patches
shown, every accepted annotation (who, when, which model version it corrected, seconds spent,
empty or not, train or validation), model versions, rounds, settings and an append-only event
log. Each volume has a zarr label store: ``labels`` (0/1, 255 = not reviewed) and ``reviewed``.
An accept is durable the moment it returns (how: :mod:`napari_pvs.project.annotations`).

:class:`Project` (``project.py``) is the facade over one module per concept; no Qt, no napari.
"""

from napari_pvs.project.export import corrected_segmentation
from napari_pvs.project.project import Project
from napari_pvs.project.records import (
    Annotation,
    AnswerRecord,
    CandidateRecord,
    ModelVersion,
    PatchRecord,
    ProjectError,
    ProjectLocked,
    RoundRecord,
    VolumeRecord,
)
from napari_pvs.project.round_log import STOP_MIN_GAIN
from napari_pvs.project.schema import SCHEMA_1, SCHEMA_VERSION
from napari_pvs.project.settings import DEFAULT_SETTINGS
from napari_pvs.project.volumes import UNREVIEWED, fingerprint

__all__ = [
    "DEFAULT_SETTINGS",
    "SCHEMA_1",
    "SCHEMA_VERSION",
    "STOP_MIN_GAIN",
    "UNREVIEWED",
    "Annotation",
    "AnswerRecord",
    "CandidateRecord",
    "ModelVersion",
    "PatchRecord",
    "Project",
    "ProjectError",
    "ProjectLocked",
    "RoundRecord",
    "VolumeRecord",
    "corrected_segmentation",
    "fingerprint",
]

"""Modality names: the spellings accepted, and the hint a file name gives."""

from __future__ import annotations

import re
from pathlib import Path

MODALITIES = ("T1", "T2", "unknown")

_MODALITY_HINT = re.compile(r"(?:^|[^a-z0-9])t([12])w?(?:$|[^a-z0-9])", re.IGNORECASE)


def normalize_modality(modality: str | None) -> str:
    """Map "T1"/"T1w"/"t2w"/None/... to one of :data:`MODALITIES`; reject anything else."""
    if modality is None:
        return "unknown"
    key = str(modality).strip().upper()
    if key in ("T1", "T1W"):
        return "T1"
    if key in ("T2", "T2W"):
        return "T2"
    if key in ("UNKNOWN", ""):
        return "unknown"
    raise ValueError(f"unknown modality {modality!r}; use 'T1', 'T2' or 'unknown'")


def modality_from_name(path: str | Path) -> str:
    """Guess the modality from a BIDS-like hint in the file name ("sub-01_T2w.nii.gz")."""
    name = Path(str(path).rstrip("/")).name
    match = _MODALITY_HINT.search(name)
    return f"T{match.group(1)}" if match else "unknown"

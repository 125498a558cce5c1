"""``rounds/r<N>/events.jsonl``: the record of a round's events, one JSON line each."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from napari_pvs.rounds.config import Event


class EventLog:
    """``rounds/r<N>/events.jsonl``: one JSON line per event, flushed as it happens."""

    def __init__(self, path: Path) -> None:
        self.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, event: Event) -> None:
        self.handle.write(json.dumps({"time": time.time(), **event}, default=str) + "\n")
        self.handle.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.handle.close()

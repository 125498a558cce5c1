"""Progress and cancellation callbacks shared by every long-running core function.

Core functions take ``progress(done, total, message)`` and a ``cancel`` object with an
``is_set()`` method (a :class:`threading.Event` works). Widgets map these to
``napari.utils.progress`` and a Cancel button; the CLI maps them to a terminal line. Keeping
the protocol here means the core never needs to know who is watching.
"""

from __future__ import annotations

import sys
import threading
from typing import Protocol


class ProgressCallback(Protocol):
    def __call__(self, done: int, total: int, message: str) -> None: ...


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


class Cancelled(RuntimeError):
    """Raised inside a core function when its cancel token is set; work saved so far stays."""


def no_progress(done: int, total: int, message: str) -> None:
    """The default progress callback: report nothing."""


def check_cancelled(cancel: CancelToken | None) -> None:
    """Raise :class:`Cancelled` if the caller asked to stop."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled by the user; finished work has been kept")


def new_cancel_token() -> threading.Event:
    """A fresh cancel token (a threading.Event) for callers that want one."""
    return threading.Event()


class TerminalProgress:
    """A progress callback for the CLI: one self-overwriting line on stderr."""

    def __init__(self, stream=None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self._last = -1

    def __call__(self, done: int, total: int, message: str) -> None:
        pct = int(100 * done / total) if total else 100
        if pct == self._last and done != total:
            return
        self._last = pct
        end = "\n" if total and done >= total else ""
        self.stream.write(f"\r{message} {done}/{total} ({pct}%)" + end)
        self.stream.flush()

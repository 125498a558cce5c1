"""Run one long core call off the GUI thread, with a napari progress bar and a Cancel token.

Every long core function takes ``progress(done, total, message)`` and ``cancel`` (see
:mod:`napari_pvs.progress`). :class:`BackgroundJob` is the one place the widgets turn that
protocol into Qt: the call runs in a napari worker thread, progress reports cross to the GUI
thread as a queued signal and drive ``napari.utils.progress``, and the outcome comes back as
exactly one of ``succeeded`` / ``failed`` / ``cancelled``, so a widget never has to catch
anything in the worker itself.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from napari.qt.threading import create_worker
from napari.utils import progress as napari_progress
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QHBoxLayout, QPushButton

from napari_pvs.io import damaged_file_error
from napari_pvs.progress import Cancelled, CancelToken, ProgressCallback

#: Errors whose message is written for the user (the core's contract); anything else is a bug
#: and is shown with its type, with the traceback on stderr.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, OSError)

Work = Callable[[ProgressCallback, CancelToken], Any]


class BackgroundJob(QObject):
    """One background call at a time; ``start`` refuses a second while one runs."""

    progress = Signal(int, int, str)
    succeeded = Signal(object)
    failed = Signal(str)
    cancelled = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._worker = None
        self._cancel: threading.Event | None = None
        self._bar: napari_progress | None = None
        self._running = False
        self.progress.connect(self._on_progress)

    def is_running(self) -> bool:
        return self._running

    def start(self, work: Work, description: str) -> bool:
        """Run ``work(progress, cancel)`` in a worker thread; False if a job is running."""
        if self._running:
            return False
        self._running = True
        self._cancel = threading.Event()
        self._bar = napari_progress(total=0, desc=description)
        cancel, emit = self._cancel, self.progress.emit

        def run() -> tuple[str, Any]:
            try:
                return "ok", work(emit, cancel)
            except Cancelled:
                return "cancelled", None
            except USER_ERRORS as exc:
                return "error", str(exc)
            except Exception as exc:
                damaged = damaged_file_error(None, exc)  # the CLI's and reader's sentence
                if damaged is not None:
                    return "error", str(damaged)
                traceback.print_exc(file=sys.stderr)  # a bug: say what it was, keep the trace
                return "error", f"{type(exc).__name__}: {exc}"

        self._worker = create_worker(run)
        self._worker.returned.connect(self._on_returned)
        self._worker.start()
        return True

    def cancel(self) -> None:
        """Ask the running call to stop (core functions stop within one step)."""
        if self._cancel is not None:
            self._cancel.set()

    def _on_progress(self, done: int, total: int, message: str) -> None:
        # a local reference: updating the bar may process events, and so close it under us
        bar = self._bar
        if bar is None:
            return
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.set_description(message)
        bar.refresh()

    def _on_returned(self, outcome: tuple[str, Any]) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._running = False
        self._worker = None
        kind, value = outcome
        if kind == "ok":
            self.succeeded.emit(value)
        elif kind == "cancelled":
            self.cancelled.emit()
        else:
            self.failed.emit(value)


def run_cancel_row(
    label: str, on_run: Callable[[], Any], on_cancel: Callable[[], Any]
) -> tuple[QHBoxLayout, QPushButton, QPushButton]:
    """A "run" button beside a Cancel button that starts disabled: every job panel's controls."""
    row = QHBoxLayout()
    run_button = QPushButton(label)
    run_button.clicked.connect(on_run)
    cancel_button = QPushButton("Cancel")
    cancel_button.setEnabled(False)
    cancel_button.clicked.connect(on_cancel)
    row.addWidget(run_button)
    row.addWidget(cancel_button)
    return row, run_button, cancel_button

"""Run one long core call off the GUI thread, with a napari progress bar and a Cancel token.

Every long core function takes ``progress(done, total, message)`` and ``cancel`` (see
:mod:`napari_pvs.progress`). :class:`BackgroundJob` is the one place the widgets turn that
protocol into Qt: the call runs in a napari worker thread, progress reports cross to the GUI
thread as a queued signal and drive ``napari.utils.progress``, and the outcome comes back as
exactly one of ``succeeded`` / ``failed`` / ``cancelled``, so a widget never has to catch
anything in the worker itself.
"""

from __future__ import annotations

import atexit
import gc
import math
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

from napari.qt.threading import create_worker
from napari.utils import progress as napari_progress
from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from napari_pvs.io import damaged_file_error
from napari_pvs.progress import Cancelled, CancelToken, ProgressCallback

#: Errors whose message is written for the user (the core's contract); anything else is a bug
#: and is shown with its type, with the traceback on stderr.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, OSError)

Work = Callable[[ProgressCallback, CancelToken], Any]

#: A job's napari progress bar appears once it has run this long (a shorter one shows none; the
#: panel's own progress line shows every job at once). Opening napari's bar adds a widget to
#: its activity dialog and processes every pending event in that call: 150-250 ms of GUI
#: thread on a 2-core machine under software OpenGL (bench_gui), so the quick jobs (Create,
#: Rank, Report, Find candidates: 1-2 s) go without it.
BAR_DELAY_MS = 2500

#: At most this many progress reports a second cross to the GUI thread (each costs it a turn).
PROGRESS_REPORTS_PER_SECOND = 5.0


#: Worker calls still running (their done event -> their cancel event, if any).
_RUNNING: dict[threading.Event, threading.Event | None] = {}
_RUNNING_LOCK = threading.Lock()
#: How long the interpreter's exit waits for worker calls still running.
EXIT_WAIT_S = 30.0


def _tracked(run: Callable[[], Any], cancel: threading.Event | None = None) -> Callable[[], Any]:
    """``run``, registered as running until it returns (see :func:`_wait_for_workers`)."""
    done = threading.Event()
    with _RUNNING_LOCK:
        _RUNNING[done] = cancel

    def tracked() -> Any:
        try:
            return run()
        finally:
            with _RUNNING_LOCK:
                _RUNNING.pop(done, None)
            done.set()

    return tracked


def _wait_for_workers() -> None:
    """At exit, let the worker calls still running end (cancelled where they can be) before
    the interpreter shuts thread pools and zarr's event loop down. A call left reading a store
    then failed, or waited for that loop forever while Qt's thread pool waited for the call:
    napari closed during a count of PVS never exited (found by the GUI benchmark). Registered
    with the hooks ``concurrent.futures`` shuts its pools down by, which run before
    ``atexit``'s, newest first: this one runs before theirs."""
    with _RUNNING_LOCK:
        running = dict(_RUNNING)
    for cancel in running.values():
        if cancel is not None:
            cancel.set()
    deadline = time.monotonic() + EXIT_WAIT_S
    for done in running:
        done.wait(max(0.0, deadline - time.monotonic()))


# threading's exit hooks run before the pools' shutdown and atexit; atexit where it has none
getattr(threading, "_register_atexit", atexit.register)(_wait_for_workers)


#: A job that imported at least this many modules (the first prediction imports torch, the
#: first layers pint, scipy and pandas) freezes the heap when it returns.
FREEZE_AFTER_MODULES = 50
_modules_at_freeze = [0]


def freeze_heap_after_imports() -> bool:
    """Move every object alive now out of the garbage collector's reach (``gc.freeze``) when
    many modules were imported since the last time; True if it froze.

    A full collection scans every tracked object: once torch, napari and their kin are
    imported, 600,000 of them, 0.8-1.1 s on the 2-core machine, and napari runs one on the
    GUI thread for each layer it removes (and Python runs them as allocations pile up). The
    modules, classes and functions imported live as long as the session, so scanning them
    finds nothing: frozen, the same collection takes under a millisecond. What is alive when
    it freezes and later becomes garbage in a reference cycle is not collected (the layers
    open at that moment, for instance); a job that imports nothing new freezes nothing.
    """
    if len(sys.modules) - _modules_at_freeze[0] < FREEZE_AFTER_MODULES:
        return False
    _modules_at_freeze[0] = len(sys.modules)
    gc.freeze()
    return True


def keep_activity_indicator_still(viewer) -> bool:
    """Show napari's "in progress" indicator (its status bar's animated GIF, on while any
    progress bar runs) as one still frame. Returns False where the window has no such
    indicator (another napari version, no window): nothing is changed then.

    Every frame of that animation repaints the window, and a window holding the OpenGL canvas
    is composited with it on each repaint: under software OpenGL (Xvfb, and the VNC or
    X2Go desktops of many clusters) the renderer then took about a third of a 2-core machine
    for as long as a job ran, and Segment from the GUI took 1.9x the CLI's time (256^3,
    measured); with the indicator still, 1.0x. The step's own progress line and napari's
    progress bars go on moving.
    """
    window = getattr(viewer, "window", None)
    with warnings.catch_warnings():  # napari warns of private access from plugin code
        warnings.simplefilter("ignore", FutureWarning)
        status_bar = getattr(window, "_status_bar", None)
        item = getattr(status_bar, "_activity_item", None)
        indicator = getattr(item, "_inProgressIndicator", None)
    movie = indicator.movie() if indicator is not None else None
    if movie is None:
        return False
    if not movie.property(_STILL_PROPERTY):
        movie.setProperty(_STILL_PROPERTY, True)
        movie.frameChanged.connect(lambda _frame: movie.setPaused(True))
    return True


_STILL_PROPERTY = "napari_pvs_still"


def throttled(report: ProgressCallback, per_second: float = PROGRESS_REPORTS_PER_SECOND):
    """``report`` called at most ``per_second`` times a second, in the worker thread.

    A new phase (another message), a step back and the last step (``done >= total``) always
    pass, so the bar never ends short of its total nor shows a stale phase.
    """
    interval = 1.0 / per_second
    last: list = [None, -math.inf, None]  # message, time, done

    def report_now_and_then(done: int, total: int, message: str) -> None:
        now = time.monotonic()
        message_changed = message != last[0]
        final = total > 0 and done >= total
        backwards = last[2] is not None and done < last[2]
        if message_changed or final or backwards or now - last[1] >= interval:
            last[:] = [message, now, done]
            report(done, total, message)

    return report_now_and_then


class BackgroundJob(QObject):
    """One background call at a time; ``start`` refuses a second while one runs.

    The napari progress bar appears only once the call has run :data:`BAR_DELAY_MS` (making
    one costs the GUI thread 10-80 ms under software OpenGL, and a call done sooner needs
    none: the step's status line says what runs). ``progress_bar=False``: never one (short
    writes started on a key press, such as a candidate's answer).
    """

    started = Signal(str)
    progress = Signal(int, int, str)
    succeeded = Signal(object)
    failed = Signal(str)
    cancelled = Signal()

    def __init__(self, parent: QObject | None = None, progress_bar: bool = True) -> None:
        super().__init__(parent)
        self._progress_bar = progress_bar
        self._worker = None
        self._cancel: threading.Event | None = None
        self._bar: napari_progress | None = None
        self._bar_timer = QTimer(self)
        self._bar_timer.setSingleShot(True)
        self._bar_timer.setInterval(BAR_DELAY_MS)
        self._bar_timer.timeout.connect(self._open_bar)
        self._description = ""
        #: the last report, for a bar opened after it: (done, total, message)
        self._last: tuple[int, int, str] | None = None
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
        self._bar, self._description, self._last = None, description, None
        if self._progress_bar:
            self._bar_timer.start()
        cancel, emit = self._cancel, throttled(self.progress.emit)

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

        self._worker = create_worker(_tracked(run, cancel))
        self._worker.returned.connect(self._on_returned)
        self._worker.start()
        self.started.emit(description)
        return True

    def cancel(self) -> None:
        """Ask the running call to stop (core functions stop within one step)."""
        if self._cancel is not None:
            self._cancel.set()

    def _open_bar(self) -> None:
        """The call is still running after :data:`BAR_DELAY_MS`: show napari's bar."""
        if not self._running or self._bar is not None:
            return
        self._bar = napari_progress(total=0, desc=self._description)
        if self._last is not None:
            self._on_progress(*self._last)

    def _on_progress(self, done: int, total: int, message: str) -> None:
        self._last = (done, total, message)
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
        self._bar_timer.stop()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        freeze_heap_after_imports()
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


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 5 s``, ``1 h 2 min``: a time left that reads at a glance."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class JobProgress(QWidget):
    """The panel's own progress: a bar, "12/40 windows · 8 s left", and a Cancel button.

    Follows a :class:`BackgroundJob` (:meth:`follow`) or is driven directly (:meth:`begin`,
    :meth:`update`, :meth:`finish`, e.g. by a training round's events). The time left is
    extrapolated from the rate since the current phase (its message) began. ``cancel_requested``
    fires on Cancel.
    """

    cancel_requested = Signal()

    def __init__(self, unit: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.unit = unit
        self.bar = QProgressBar()
        self.bar.setTextVisible(True)
        self.detail = QLabel("")
        self.detail.setWordWrap(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self._on_cancel)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.bar, 1)
        row.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.detail)
        self._phase: tuple[str, float, int] | None = None
        self.bar.setRange(0, 1)
        self.bar.setValue(0)

    def follow(self, job: BackgroundJob) -> None:
        """Show ``job``'s runs here; Cancel cancels it."""
        job.started.connect(self.begin)
        job.progress.connect(self.update)
        job.succeeded.connect(lambda _value: self.finish("done"))
        job.failed.connect(lambda _message: self.finish("failed"))
        job.cancelled.connect(lambda: self.finish("cancelled"))
        self.cancel_requested.connect(job.cancel)

    def begin(self, description: str = "") -> None:
        self._phase = None
        self.bar.setRange(0, 0)  # busy until the first report with a total
        self.detail.setText(description)
        self.cancel_button.setEnabled(True)

    def update(self, done: int, total: int, message: str) -> None:
        now = time.perf_counter()
        if self._phase is None or self._phase[0] != message or done < self._phase[2]:
            self._phase = (message, now, done)
        if total <= 0:
            self.bar.setRange(0, 0)
            self.detail.setText(message)
            return
        self.bar.setRange(0, total)
        self.bar.setValue(min(done, total))
        text = f"{message}: {done}/{total}" + (f" {self.unit}" if self.unit else "")
        _, since, first = self._phase
        if done > first and done < total:
            left = (now - since) / (done - first) * (total - done)
            text += f" · {format_seconds(left)} left"
        self.detail.setText(text)

    def finish(self, text: str) -> None:
        self._phase = None
        self.bar.setRange(0, 1)
        self.bar.setValue(1 if text == "done" else 0)
        self.detail.setText(text)
        self.cancel_button.setEnabled(False)

    def _on_cancel(self) -> None:
        self.cancel_button.setEnabled(False)
        self.detail.setText("cancelling…")
        self.cancel_requested.emit()


class Refresher(QObject):
    """Reads what a view shows (the ledger, a store's attributes) off the GUI thread.

    ``request()`` asks for a read; it starts at the next event-loop turn, so the requests of
    one turn (a round's end emits several changes) make one read, in a worker thread, whose
    result goes to ``shown`` on the GUI thread. A request while a read runs is served by one
    more read after it: the view ends on the newest state and reads never pile up. No
    progress bar: a refresh is not a task the user started. ``read`` raising is reported
    through ``failed`` (its message).
    """

    shown = Signal(object)
    failed = Signal(str)

    def __init__(self, read: Callable[[], Any], parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._read = read
        self._worker = None
        self._again = False
        self._soon = QTimer(self)
        self._soon.setSingleShot(True)
        self._soon.setInterval(0)
        self._soon.timeout.connect(self._start)

    def is_running(self) -> bool:
        """A read asked for or running (the view is about to change)."""
        return self._worker is not None or self._soon.isActive()

    def request(self) -> None:
        if self._worker is not None:
            self._again = True
        elif not self._soon.isActive():
            self._soon.start()

    def _start(self) -> None:
        read = self._read

        def run() -> tuple[str, Any]:
            try:
                return "ok", read()
            except Exception as exc:  # a project closed under the read, a damaged store...
                return "error", f"could not refresh: {exc}"

        self._again = False
        self._worker = create_worker(_tracked(run))
        self._worker.returned.connect(self._on_returned)
        self._worker.start()

    def _on_returned(self, outcome: tuple[str, Any]) -> None:
        self._worker = None
        if self._again:  # the state changed while reading: this result is already old
            self._start()
            return
        kind, value = outcome
        if kind == "ok":
            self.shown.emit(value)
        else:
            self.failed.emit(value)


class ReadAhead(QObject):
    """One value read in a worker before it is asked for: the next candidate's surroundings
    while the user looks at this one, so that the key press shows them without a read on the
    GUI thread. ``start(key, read)`` replaces an earlier request; ``take(key)`` gives the value
    read for ``key`` once, else None (not read yet, another key, or the read failed): the caller
    then reads it itself, and reports what goes wrong there."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._key: Any = None
        self._value: Any = None

    def start(self, key: Any, read: Callable[[], Any]) -> None:
        if key == self._key:
            return
        self._key, self._value = key, None

        def run() -> tuple[Any, Any]:
            try:
                return key, read()
            except Exception:  # the caller reads again on the GUI thread and reports it
                return key, None

        worker = create_worker(_tracked(run))
        worker.returned.connect(self._on_returned)
        worker.start()

    def _on_returned(self, outcome: tuple[Any, Any]) -> None:
        key, value = outcome
        if key == self._key:
            self._value = value

    def take(self, key: Any) -> Any:
        if key != self._key or self._value is None:
            return None
        value, self._key, self._value = self._value, None, None
        return value

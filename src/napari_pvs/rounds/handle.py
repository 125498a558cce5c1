"""A round whose training runs in a spawned worker process, and the handle the GUI and CLI
poll: a crash, an out-of-memory kill or a cancel of the worker cannot take the caller down or
damage the ledger; the previous version stays current and the round is marked failed or
cancelled with a message."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue as queue_module
import signal
import threading
import time
from pathlib import Path
from typing import Any

from napari_pvs.rounds.commit import abandon_round, commit_round
from napari_pvs.rounds.config import Event, RoundConfig, RoundOutcome
from napari_pvs.rounds.events import EventLog
from napari_pvs.rounds.prepare import prepare_round
from napari_pvs.rounds.worker import worker_main

#: Grace period for a cancelled worker before it is terminated.
CANCEL_GRACE_S = 30.0


def _reap(process, grace_s: float = 5.0) -> None:
    """Wait for a worker that has sent its outcome to exit; stop it if it lingers."""
    process.join(grace_s)
    if process.is_alive():
        process.terminate()
        process.join(grace_s)


class RoundHandle:
    """A round whose training runs in a spawned worker process.

    Call :meth:`poll` often (a GUI timer): it returns the events since the last call and, when
    the worker has finished, applies the outcome to the ledger in this process. The public
    events are those of ``docs/project.md``; ``done`` comes after the commit.
    """

    def __init__(self, project, plan: dict[str, Any]) -> None:
        context = mp.get_context("spawn")
        self.project = project
        self.plan = plan
        self.round = plan["round"]
        self._events = context.Queue()
        self._cancel = context.Event()
        self._cancel_requested: float | None = None
        self.outcome: RoundOutcome | None = None
        self.events: list[Event] = []
        self._log = EventLog(Path(plan["folder"]) / "events.jsonl")
        self.process = context.Process(
            target=worker_main,
            args=(plan, self._events, self._cancel),
            name=f"napari-pvs-round-{self.round}",
            daemon=True,
        )
        self.process.start()
        project._round_handles.append(self)

    @property
    def running(self) -> bool:
        return self.outcome is None

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def cancel(self) -> None:
        """Ask the worker to stop at its next step; :meth:`poll`/:meth:`wait` report it."""
        if self.outcome is None and self._cancel_requested is None:
            self._cancel.set()
            self._cancel_requested = time.monotonic()

    def stop(self, timeout: float = CANCEL_GRACE_S) -> RoundOutcome:
        """Cancel and wait until the worker is gone; terminate it if it does not stop within
        ``timeout``."""
        self.cancel()
        try:
            outcome = self.wait(timeout=timeout)
            _reap(self.process)
            return outcome
        except TimeoutError:
            self.process.terminate()
            self.process.join(10)
            self._abandon("cancelled", "cancelled (the worker was stopped)")
            return self.outcome

    def _drain(self, timeout: float = 0.0) -> list[Event]:
        got = []
        while True:
            try:
                got.append(
                    self._events.get(timeout=timeout) if timeout else self._events.get_nowait()
                )
            except queue_module.Empty:
                return got
            except (EOFError, OSError):  # the worker died mid-message
                return got

    def poll(self) -> list[Event]:
        """Events since the last poll (non-blocking); applies the outcome when finished."""
        if self.outcome is not None:
            return []
        alive = self.process.is_alive()
        new = self._drain(timeout=0.0 if alive else 0.5)
        public: list[Event] = []
        for event in new:
            kind = event["kind"]
            if kind == "_result":
                public.append(self._apply(event["result"]))
            elif kind == "cancelled":
                public.append(event)
                self._abandon("cancelled", "cancelled")
            elif kind == "failed":
                public.append(event)
                self._abandon("failed", event["message"])
            else:
                public.append(event)
            if self.outcome is not None:
                break
        if self.outcome is None and not alive:
            code = self.process.exitcode
            reason = (
                f"killed by signal {signal.Signals(-code).name}"
                if code is not None and code < 0
                else f"exit code {code}"
            )
            message = f"failed: the round's worker process ended unexpectedly ({reason})"
            self._abandon("failed", message)
            public.append({"kind": "failed", "message": self.outcome.message})
        elif (
            self.outcome is None
            and self._cancel_requested is not None
            and time.monotonic() - self._cancel_requested > CANCEL_GRACE_S
        ):
            self.process.terminate()
            self.process.join(10)
            self._abandon("cancelled", "cancelled (the worker was stopped)")
            public.append({"kind": "cancelled"})
        self.events.extend(public)
        return public

    def _apply(self, result: dict[str, Any]) -> Event:
        try:
            self.outcome = commit_round(self.project, self.plan, result)
        except Exception as exc:  # e.g. the checkpoint failed its check: a failed round
            self._abandon("failed", f"failed at commit: {type(exc).__name__}: {exc}")
            return {"kind": "failed", "message": self.outcome.message}
        event = {"kind": "done", "version": self.outcome.version, "metrics": self.outcome.metrics,
                 "current": self.outcome.current, "message": self.outcome.message}  # fmt: skip
        self._log.write(event)
        self._finish()
        return event

    def _abandon(self, status: str, message: str) -> None:
        self.outcome = abandon_round(self.project, self.plan, status, message)
        self._finish()

    def _finish(self) -> None:
        with contextlib.suppress(ValueError):
            self.project._round_handles.remove(self)
        self._log.close()
        if self.process.is_alive():  # it has reported; reap it without blocking the caller
            threading.Thread(target=_reap, args=(self.process,), daemon=True).start()

    def wait(self, timeout: float | None = None) -> RoundOutcome:
        """Block until the round has finished and been applied; TimeoutError after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.outcome is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"round {self.round} is still running after {timeout} s")
            self.poll()
            if self.outcome is None:
                time.sleep(0.1)
        return self.outcome


def start_round(project, config: RoundConfig | None = None) -> RoundHandle:
    """Freeze the snapshot here and start the round's training in a worker process."""
    plan = prepare_round(project, config)
    try:
        return RoundHandle(project, plan)
    except BaseException as exc:
        abandon_round(project, plan, "failed", f"failed: could not start the worker: {exc}")
        raise

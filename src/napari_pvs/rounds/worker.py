"""The spawned round worker process: part 2 of a round, its output in ``worker.log``, its
events back through a queue. :class:`~napari_pvs.rounds.handle.RoundHandle` starts it;
``spawn`` pickles :func:`worker_main` by its module path, so it stays a module-level function."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Any

from napari_pvs.progress import Cancelled
from napari_pvs.rounds.config import Event
from napari_pvs.rounds.events import EventLog
from napari_pvs.rounds.execute import execute_round


def run_as_batch_work() -> str:
    """Schedule this process as CPU-bound batch work (Linux ``SCHED_BATCH``); say how it runs.

    The scheduler then takes the worker for CPU-bound work and mildly disfavours its threads
    when they wake (they do not preempt the viewer's GUI thread), while it keeps nice 0's share
    of the machine against other programs (``sched(7)``). An earlier ``nice 5``
    also made the worker lose to every other program: with the other core of a 2-core machine
    busy, a GUI round took 91-94 s where the command line's took 77 s, and 74 s as batch work,
    with the heartbeat's longest wait 91-128 ms either way. Elsewhere the priority is left as
    it is.
    """
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is None or not hasattr(os, "sched_setscheduler"):
        return "default scheduling"
    try:
        os.sched_setscheduler(0, batch, os.sched_param(0))
    except OSError as exc:
        return f"default scheduling (SCHED_BATCH refused: {exc})"
    if os.sched_getscheduler(0) != batch:
        return "default scheduling"
    return "batch scheduling (SCHED_BATCH)"


class _WorkerCancel:
    """Cancel when asked, or when the process that started the worker has died."""

    def __init__(self, event) -> None:
        self.event = event

    def is_set(self) -> bool:
        parent = mp.parent_process()
        return self.event.is_set() or (parent is not None and not parent.is_alive())


def worker_main(plan: dict[str, Any], events, cancel_event) -> None:
    """The spawned round worker: part 2 of the round; reports through ``events``."""
    log_path = Path(plan["folder"]) / "worker.log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    print(f"round worker: {run_as_batch_work()}, nice {os.nice(0)}", flush=True)
    log = EventLog(Path(plan["folder"]) / "events.jsonl")

    def emit(event: Event) -> None:
        log.write(event)
        events.put(event)

    try:
        result = execute_round(plan, emit, _WorkerCancel(cancel_event))
        events.put({"kind": "_result", "result": result})
    except Cancelled:
        events.put({"kind": "cancelled"})
    except BaseException as exc:
        import traceback

        traceback.print_exc()
        events.put({"kind": "failed", "message": f"failed: {type(exc).__name__}: {exc}"})
    finally:
        log.close()

"""A whole round in this process (blocking): the CLI, benchmarks and scripts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from napari_pvs.progress import Cancelled, CancelToken, ProgressCallback
from napari_pvs.rounds.commit import abandon_round, commit_round
from napari_pvs.rounds.config import Event, RoundConfig, RoundOutcome
from napari_pvs.rounds.events import EventLog
from napari_pvs.rounds.execute import execute_round
from napari_pvs.rounds.prepare import prepare_round


def run_round(
    project,
    config: RoundConfig | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    *,
    on_event: Callable[[Event], None] | None = None,
) -> RoundOutcome:
    """Run a whole round in this process (blocking). Returns the outcome, never raises for a
    failed or cancelled round (a bad request — no annotations — raises ValueError)."""
    plan = prepare_round(project, config)
    log = EventLog(Path(plan["folder"]) / "events.jsonl")

    def emit(event: Event) -> None:
        log.write(event)
        if on_event is not None:
            on_event(event)
        if progress is not None:
            if event["kind"] == "step":
                loss = "" if event["loss"] is None else f" loss {event['loss']:.3f}"
                progress(event["step"], event["total"], f"round {plan['round']}{loss}")
            elif event["kind"] == "stage":
                progress(0, 0, event["message"])

    try:
        result = execute_round(plan, emit, cancel)
        outcome = commit_round(project, plan, result)
        emit({"kind": "done", "version": outcome.version, "metrics": outcome.metrics,
              "current": outcome.current, "message": outcome.message})  # fmt: skip
    except (Cancelled, KeyboardInterrupt) as exc:
        outcome = abandon_round(project, plan, "cancelled", "cancelled")
        emit({"kind": "cancelled"})
        if isinstance(exc, KeyboardInterrupt):
            raise
    except Exception as exc:  # a failed round is an outcome, reported with its reason
        outcome = abandon_round(project, plan, "failed", f"failed: {type(exc).__name__}: {exc}")
        emit({"kind": "failed", "message": outcome.message})
    finally:
        log.close()
    return outcome

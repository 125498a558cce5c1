"""Fine-tuning rounds of an annotation project: snapshot, train, validate, re-predict, re-rank.

A round has three parts, so that the training can run in another process:

1. :func:`prepare_round` (the process holding the project): freezes the accepted annotations
   (ledger row ``running`` with their ids) and copies their image and label crops into
   ``rounds/r<N>/snapshot.zarr`` — labels inside each box, 255 outside it, and 255 on every
   voxel of a validation box in a training crop. Accepts made later go to the next round.
2. :func:`execute_round` (a worker, or in-process): reads only the snapshot, fine-tunes the
   current version (or a fresh model) with :func:`napari_pvs.training.fit`, scores the base
   and the new model on the validation crops, writes ``models/v<N>.safetensors``, predicts
   the volumes that have annotations or a queue into ``rounds/r<N>/predictions/`` and ranks
   them. It never writes the ledger.
3. :func:`commit_round` (the project's process): moves the predictions into place and commits
   the version, ``current``, the round status and the new queues in one transaction.

:func:`run_round` does all three in this process (the CLI, benchmarks, ``torchrun``);
:func:`start_round` runs part 2 in a spawned worker process and returns a
:class:`RoundHandle`, so a crash, an out-of-memory kill or a cancel of the worker cannot take
the caller down or damage the ledger: the previous version stays current and the round is
marked failed or cancelled with a message.

``python -m napari_pvs.rounds PROJECT [--steps ...]`` runs one round; under
``torchrun --nproc_per_node N -m napari_pvs.rounds PROJECT`` every process trains its share
of each batch (DDP inside ``training.fit``), and only rank 0 opens the project, writes files
and commits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import queue as queue_module
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_pvs import atomic
from napari_pvs.progress import Cancelled, CancelToken, ProgressCallback, check_cancelled

#: Image context (voxels) copied around each annotated box into the snapshot.
SNAPSHOT_CONTEXT = 16
#: Training steps per epoch of a round (fit validates and keeps the best weights per epoch).
STEPS_PER_EPOCH = 50
#: Grace period for a cancelled worker before it is terminated.
CANCEL_GRACE_S = 30.0

Event = dict[str, Any]


@dataclass
class RoundConfig:
    """What decides a round (stored in the round's ledger row)."""

    steps: int = 200
    batch_size: int = 2
    patch: int = 32  # training patch edge (voxels)
    learning_rate: float = 3e-4
    from_scratch: bool = False
    device: str = "auto"
    seed: int = 0
    max_minutes: float | None = None
    strategy: str | None = None  # queue strategy after the round (default: project setting)
    n: int | None = None  # queue length after the round (default: project setting)
    rerank: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be at least 1")
        if self.patch < 8:
            raise ValueError(f"patch must be at least 8 voxels, got {self.patch}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")


@dataclass
class RoundOutcome:
    round: int
    status: str  # done | failed | cancelled
    version: int | None  # the new version (done) or the one that stays current
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    stop_hint: str | None = None


# ---------------------------------------------------------------------------------------------
# 1. Prepare (project process)


def _crop_box(start, stop, shape, context: int) -> tuple[list[int], list[int]]:
    lo = [max(0, int(a) - context) for a in start]
    hi = [min(int(s), int(b) + context) for b, s in zip(stop, shape, strict=True)]
    return lo, hi


def _local(box_start, box_stop, crop_start) -> tuple[slice, ...]:
    return tuple(
        slice(int(a) - c, int(b) - c)
        for a, b, c in zip(box_start, box_stop, crop_start, strict=True)
    )


def _clip_local(box_start, box_stop, crop_start, crop_stop) -> tuple[slice, ...] | None:
    """The part of a box inside a crop, in crop coordinates (None if they do not meet)."""
    lo = [max(int(a), c) for a, c in zip(box_start, crop_start, strict=True)]
    hi = [min(int(b), c) for b, c in zip(box_stop, crop_stop, strict=True)]
    if any(a >= b for a, b in zip(lo, hi, strict=True)):
        return None
    return _local(lo, hi, crop_start)


def prepare_round(project, config: RoundConfig | None = None) -> dict[str, Any]:
    """Freeze the accepted annotations into a snapshot and return the round's plan (JSON-able).

    ValueError when there is no training annotation, or another round is running.
    """
    from napari_pvs.intensity import robust_range
    from napari_pvs.models.checkpoint import manifest_hash

    config = config or RoundConfig()
    project._require_writable()
    if not project.annotations(split="train"):
        raise ValueError(
            "the project has no accepted training annotations yet; review and accept some "
            "patches first (napari-pvs project queue / project accept)"
        )
    record = project._begin_round(asdict(config))
    try:
        return _write_plan(project, record, config, robust_range, manifest_hash)
    except BaseException as exc:
        status = "cancelled" if isinstance(exc, Cancelled | KeyboardInterrupt) else "failed"
        project._finish_round(record.id, status, f"preparing the snapshot failed: {exc}")
        raise


def _write_plan(project, record, config, robust_range, manifest_hash) -> dict[str, Any]:
    import zarr

    folder = project.path / "rounds" / f"r{record.id}"
    (folder / "train").mkdir(parents=True, exist_ok=True)
    ids = set(record.snapshot_annotation_ids)
    annotations = [a for a in project.annotations() if a.id in ids]
    volumes: dict[int, Any] = {}
    ranges: dict[int, tuple[float, float]] = {}
    manifest = []
    snapshot = folder / "snapshot.zarr"
    with atomic.atomic_output(snapshot, overwrite=True) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        for annotation in annotations:
            vid = annotation.volume_id
            if vid not in volumes:
                with contextlib.suppress(ValueError):
                    volumes[vid] = project.open_volume(vid)  # removed volumes do not train
                if vid in volumes:
                    ranges[vid] = tuple(float(v) for v in robust_range(volumes[vid].data))
            if vid not in volumes:
                continue
            volume = volumes[vid]
            lo, hi = _crop_box(annotation.start, annotation.stop, volume.shape, SNAPSHOT_CONTEXT)
            crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            image = np.asarray(volume.data[crop], np.float32)
            store = project.labels(vid)
            labels = np.full(image.shape, 255, np.uint8)
            inside = _local(annotation.start, annotation.stop, lo)
            labels[inside] = store["labels"][
                tuple(slice(a, b) for a, b in zip(annotation.start, annotation.stop, strict=True))
            ]
            if annotation.split == "train":  # no validation voxel is ever trained on
                for other in annotations:
                    if other.split == "validation" and other.volume_id == vid:
                        part = _clip_local(other.start, other.stop, lo, hi)
                        if part is not None:
                            labels[part] = 255
            group = root.create_group(f"a{annotation.id}")
            group.create_array("image", data=image, chunks=image.shape)
            group.create_array("labels", data=labels, chunks=labels.shape)
            group.attrs["napari_pvs"] = {
                "annotation": annotation.id,
                "volume_id": vid,
                "split": annotation.split,
                "modality": volume.modality,
                "crop_start": lo,
                "box_start": list(annotation.start),
                "box_stop": list(annotation.stop),
                "intensity_range": list(ranges[vid]),
            }
            manifest.append(
                {
                    "annotation": annotation.id,
                    "volume": project.volume(vid).fingerprint,
                    "box": [*annotation.start, *annotation.stop],
                    "split": annotation.split,
                    "labelled": int((labels != 255).sum()),
                }
            )
        root.attrs["napari_pvs"] = {"round": record.id, "annotations": sorted(ids)}
    settings = project.settings()
    targets = []
    for volume in project.volumes():
        if project.annotations(volume.id) or project.queue(volume.id):
            targets.append(
                {
                    "id": volume.id,
                    "name": volume.name,
                    "path": str(volume.path),
                    "modality": volume.modality,
                    "labels": str(project._label_store_path(volume.id)),
                    "skipped": project.excluded_boxes(volume.id),
                    "prediction": str(folder / "predictions" / f"{volume.id}.zarr"),
                }
            )
    return {
        "round": record.id,
        "project": str(project.path),
        "folder": str(folder),
        "snapshot": str(snapshot),
        "base_version": record.base_version,
        "base_checkpoint": str(project.checkpoint_path(record.base_version)),
        "new_version": record.new_version,
        "checkpoint": str(project.path / "models" / f"v{record.new_version}.safetensors"),
        "config": asdict(config),
        "manifest_hash": manifest_hash(manifest),
        "volumes": targets,
        "predictor": project.predictor_options(device=config.device),
        "queue": {
            "strategy": config.strategy or settings["strategy"],
            "n": int(config.n or settings["n"]),
            "patch": int(settings["patch"]),
        },
    }


# ---------------------------------------------------------------------------------------------
# 2. Execute (worker or in-process; never touches the ledger)


def load_snapshot(path: str | Path) -> tuple[list, list]:
    """``(training, validation)`` :class:`~napari_pvs.training.TrainingVolume` lists."""
    import zarr

    from napari_pvs.training import TrainingVolume

    root = zarr.open_group(str(path), mode="r")
    train, validation = [], []
    for name in sorted(root.group_keys(), key=lambda k: int(k[1:])):
        group = root[name]
        info = dict(group.attrs)["napari_pvs"]
        labels = np.asarray(group["labels"][:])
        if not (labels != 255).any():
            continue  # a training box lying wholly inside validation boxes
        item = TrainingVolume(
            image=np.asarray(group["image"][:]),
            labels=labels,
            modality=info["modality"],
            name=name,
            intensity_range=tuple(info["intensity_range"]),
        )
        (validation if info["split"] == "validation" else train).append(item)
    return train, validation


def validation_dice(model, crops: list, device: str | Any = "cpu") -> tuple[float | None, int]:
    """Pooled voxel Dice over the labelled voxels of the validation crops (whole crops, one
    deterministic pass each, the model's calibrated threshold) and the labelled voxel count.

    Every round scores its base and its new model on the same crops, so the gain is fair even
    when the validation set has grown since the previous round.
    """
    import torch

    from napari_pvs.intensity import normalize
    from napari_pvs.models import resolve_device

    if not crops:
        return None, 0
    device = resolve_device(device) if isinstance(device, str) else device
    threshold = float((getattr(model, "segmentation_rule", None) or {}).get("threshold", 0.5))
    model.to(device).eval()
    inter = total = labelled = 0
    with torch.no_grad():
        for crop in crops:
            image = normalize(np.asarray(crop.image), *crop.intensity_range)
            logits = model(torch.from_numpy(image)[None, None].to(device), crop.modality)
            pred = torch.sigmoid(logits)[0, 0].float().cpu().numpy() >= threshold
            labels = np.asarray(crop.labels)
            mask = labels != 255
            truth = (labels == 1) & mask
            pred &= mask
            inter += int((pred & truth).sum())
            total += int(pred.sum() + truth.sum())
            labelled += int(mask.sum())
    return (1.0 if total == 0 else 2.0 * inter / total), labelled


_LOSS = re.compile(r"loss\s+([0-9.eE+-]+|nan|inf)")


def _fresh_model(base_model, seed: int):
    import torch

    from napari_pvs.models import build_model

    torch.manual_seed(int(seed))
    model = build_model(base_model.name, **base_model.config)
    model.segmentation_rule = dict(getattr(base_model, "segmentation_rule", {}) or {})
    return model


def execute_round(
    plan: dict[str, Any],
    emit: Callable[[Event], None] | None = None,
    cancel: CancelToken | None = None,
    *,
    main: bool = True,
    device: str | None = None,
) -> dict[str, Any] | None:
    """Train, validate, write ``v<N>``, predict and rank as ``plan`` says; return the result.

    ``emit`` receives the round's events (plain dicts). Raises ``Cancelled`` when cancelled.
    With ``main=False`` (a non-zero ``torchrun`` rank) the process only trains its share.
    ``device`` overrides the plan's (each torchrun process trains on its own GPU).
    """
    from napari_pvs.models.checkpoint import load_checkpoint, save_checkpoint
    from napari_pvs.training import TrainConfig, fit

    emit = emit or (lambda event: None)
    config = RoundConfig(**plan["config"])
    if device is not None:
        config.device = device
    started = time.perf_counter()
    emit({"kind": "stage", "message": f"round {plan['round']}: loading the snapshot"})
    train, validation = load_snapshot(plan["snapshot"])
    if not train:
        raise ValueError(
            "every training patch of this round lies inside validation patches; accept "
            "patches elsewhere"
        )
    base, _ = load_checkpoint(plan["base_checkpoint"], device="cpu")
    model = _fresh_model(base, config.seed) if config.from_scratch else base
    base_dice, labelled = validation_dice(base, validation, config.device) if main else (None, 0)
    if main and base_dice is not None:
        emit({"kind": "validation", "step": 0, "dice": base_dice})
    check_cancelled(cancel)
    steps_per_epoch = min(config.steps, STEPS_PER_EPOCH)
    epochs = math.ceil(config.steps / steps_per_epoch)
    total = epochs * steps_per_epoch
    train_config = TrainConfig(
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        batch_size=config.batch_size,
        patch=(config.patch,) * 3,
        learning_rate=config.learning_rate,
        validation_patches=max(3, min(12, 3 * len(validation or train))),
        patience=epochs,
        seed=config.seed,
        device=config.device,
        max_minutes=config.max_minutes,
    )

    def on_progress(done: int, total_steps: int, message: str) -> None:
        found = _LOSS.search(message)
        loss = float(found.group(1)) if found else None
        emit({"kind": "step", "step": int(done), "total": int(total_steps), "loss": loss})

    emit({"kind": "stage", "message": f"training {total} steps on {len(train)} patches"})
    work = Path(plan["folder"]) / "train"  # made by prepare_round: other ranks write nothing
    info = {
        "manifest_hash": plan["manifest_hash"],
        "round": plan["round"],
        "base_version": plan["base_version"],
        "from_scratch": config.from_scratch,
        "annotations": sorted(int(t.name[1:]) for t in train),
        "validation_annotations": sorted(int(v.name[1:]) for v in validation),
    }
    result = fit(
        model,
        train,
        train_config,
        out=work / "model.safetensors",
        resume=False,
        validation=validation or train,
        training_info=info,
        progress=on_progress if main else (lambda *_: None),
        cancel=cancel,
    )
    if not main:
        return None
    for record in result.history:
        emit(
            {
                "kind": "validation",
                "step": (int(record["epoch"]) + 1) * steps_per_epoch,
                "dice": float(record["val_dice"]),
                "source": "fit",
            }
        )
    check_cancelled(cancel)
    new_dice, _ = validation_dice(model, validation, config.device)
    metrics = {
        "validation_dice": new_dice,
        "base_validation_dice": base_dice,
        "validation_patches": len(validation),
        "validation_voxels": labelled,
        "train_patches": len(train),
        "steps": total,
        "best_epoch": result.best_epoch,
        "fit_val_dice": result.best_dice,
        "train_loss": result.history[-1]["train_loss"] if result.history else None,
        "from_scratch": config.from_scratch,
        "train_seconds": round(time.perf_counter() - started, 2),
    }
    if new_dice is not None:
        emit({"kind": "validation", "step": total, "dice": new_dice})
    checkpoint = Path(plan["checkpoint"])
    with atomic.atomic_output(checkpoint, overwrite=True) as tmp:
        save_checkpoint(model, tmp, metrics=metrics, training={**info, "config": plan["config"]})
    emit({"kind": "stage", "message": f"wrote {checkpoint.name}"})
    queues = _predict_and_rank(plan, model, emit, cancel)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    return {"version": plan["new_version"], "metrics": metrics, "queues": queues}


def _predict_and_rank(plan, model, emit, cancel) -> dict[str, list[dict[str, Any]]]:
    import zarr

    from napari_pvs.inference import Predictor
    from napari_pvs.io import open_volume
    from napari_pvs.ranking import rank_patches

    queues: dict[str, list[dict[str, Any]]] = {}
    targets = plan["volumes"]
    for index, target in enumerate(targets, start=1):
        check_cancelled(cancel)
        emit(
            {
                "kind": "stage",
                "message": f"predicting {target['name']} ({index}/{len(targets)}) with "
                f"v{plan['new_version']}",
            }
        )
        volume = open_volume(target["path"], modality=target["modality"])
        out = Path(target["prediction"])
        _remove(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        Predictor(model, modality=target["modality"], **plan["predictor"]).predict(
            volume, out, cancel=cancel
        )
        atomic.fsync_path(out)
        if not plan["config"]["rerank"]:
            continue
        labels = zarr.open_group(target["labels"], mode="r")["labels"]
        try:
            ranked = rank_patches(
                out,
                n=plan["queue"]["n"],
                patch=plan["queue"]["patch"],
                strategy=plan["queue"]["strategy"],
                exclude=labels,
                exclude_boxes=[tuple(b) for b in target["skipped"]],
                seed=plan["config"]["seed"],
                image=volume,
            )
        except ValueError as exc:  # nothing left to rank: say so, keep the round
            emit({"kind": "stage", "message": f"no queue for {target['name']}: {exc}"})
            ranked = []
        queues[str(target["id"])] = [asdict(r) for r in ranked]
    return queues


# ---------------------------------------------------------------------------------------------
# 3. Commit (project process)


def commit_round(project, plan: dict[str, Any], result: dict[str, Any]) -> RoundOutcome:
    """Move the round's predictions into place and commit it (one ledger transaction)."""
    from napari_pvs.ranking import RankedPatch

    number = int(plan["new_version"])
    queues: dict[int, list[RankedPatch]] = {}
    for target in plan["volumes"]:
        source = Path(target["prediction"])
        if source.is_dir():
            final = project.prediction_path(target["id"], number)
            final.parent.mkdir(parents=True, exist_ok=True)
            _remove(final)
            os.replace(source, final)
            atomic.fsync_folder(final.parent)
        rows = result["queues"].get(str(target["id"]))
        if rows is None:
            continue
        # Patches reviewed while the round ran are not queued again.
        reviewed = project.labels(target["id"])["reviewed"]
        kept = []
        for row in rows:
            box = tuple(
                slice(a, b) for a, b in zip(row["bbox_start"], row["bbox_stop"], strict=True)
            )
            if not np.asarray(reviewed[box]).any():
                kept.append(RankedPatch(**{**row, "rank": len(kept) + 1}))
        queues[int(target["id"])] = kept
    version = project._commit_round(
        plan["round"],
        metrics=result["metrics"],
        manifest_hash=plan["manifest_hash"],
        queues=queues,
    )
    _clean_work(plan)
    return RoundOutcome(
        round=plan["round"],
        status="done",
        version=version.version,
        metrics=result["metrics"],
        message=f"v{version.version} is current",
        stop_hint=project.stop_hint(),
    )


def abandon_round(project, plan: dict[str, Any], status: str, message: str) -> RoundOutcome:
    """Record a failed or cancelled round; the previous version stays current."""
    current = project.current_version().version
    message = f"{message}; v{current} stays current"
    project._finish_round(plan["round"], status, message)
    _clean_work(plan)
    return RoundOutcome(round=plan["round"], status=status, version=current, message=message)


def _clean_work(plan: dict[str, Any]) -> None:
    """Drop the round's intermediate files (fit's checkpoints, unplaced predictions); the
    snapshot, events and worker log stay as the round's record."""
    for name in ("predictions", "train"):
        shutil.rmtree(Path(plan["folder"]) / name, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# ---------------------------------------------------------------------------------------------
# Running a round


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
    log = _EventLog(Path(plan["folder"]) / "events.jsonl")

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
        emit({"kind": "done", "version": outcome.version, "metrics": outcome.metrics})
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


class _EventLog:
    """``rounds/r<N>/events.jsonl``: one JSON line per event, flushed as it happens."""

    def __init__(self, path: Path) -> None:
        self.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, event: Event) -> None:
        self.handle.write(json.dumps({"time": time.time(), **event}, default=str) + "\n")
        self.handle.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.handle.close()


class _WorkerCancel:
    """Cancel when asked, or when the process that started the worker has died."""

    def __init__(self, event) -> None:
        self.event = event

    def is_set(self) -> bool:
        parent = mp.parent_process()
        return self.event.is_set() or (parent is not None and not parent.is_alive())


def _worker_main(plan: dict[str, Any], events, cancel_event) -> None:
    """The spawned round worker: part 2 of the round; reports through ``events``."""
    log_path = Path(plan["folder"]) / "worker.log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    log = _EventLog(Path(plan["folder"]) / "events.jsonl")

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
        self._log = _EventLog(Path(plan["folder"]) / "events.jsonl")
        self.process = context.Process(
            target=_worker_main,
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
        """Cancel and wait; terminate the worker if it does not stop within ``timeout``."""
        self.cancel()
        try:
            return self.wait(timeout=timeout)
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
        event = {"kind": "done", "version": self.outcome.version, "metrics": self.outcome.metrics}
        self._log.write(event)
        self._finish()
        return event

    def _abandon(self, status: str, message: str) -> None:
        self.outcome = abandon_round(self.project, self.plan, status, message)
        self._finish()

    def _finish(self) -> None:
        with contextlib.suppress(ValueError):
            self.project._round_handles.remove(self)
        self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self._log.close()

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


# ---------------------------------------------------------------------------------------------
# python -m napari_pvs.rounds PROJECT (also under torchrun)


def add_round_arguments(parser: argparse.ArgumentParser) -> None:
    """The round options shared by ``napari-pvs round`` and ``python -m napari_pvs.rounds``."""
    defaults = RoundConfig()
    parser.add_argument("project", metavar="DIR", help="the project folder")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps")
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="patches per step (global)"
    )
    parser.add_argument("--patch", type=int, default=defaults.patch, help="training patch edge")
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, help="learning rate")
    parser.add_argument(
        "--from-scratch", action="store_true", help="train a fresh model instead of fine-tuning"
    )
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--max-minutes", type=float, default=None, help="training time budget")
    parser.add_argument("--strategy", default=None, help="queue strategy after the round")
    parser.add_argument("--n", type=int, default=None, help="queue length after the round")
    parser.add_argument("--no-rerank", action="store_true", help="predict but do not re-rank")


def config_from_args(args: argparse.Namespace) -> RoundConfig:
    return RoundConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        patch=args.patch,
        learning_rate=args.lr,
        from_scratch=args.from_scratch,
        device=args.device,
        seed=args.seed,
        max_minutes=args.max_minutes,
        strategy=args.strategy,
        n=args.n,
        rerank=not args.no_rerank,
    )


def format_event(event: Event) -> str | None:
    """One printable line per event (the step lines are left to the progress bar)."""
    kind = event["kind"]
    if kind == "stage":
        return event["message"]
    if kind == "validation":
        source = " (fit, best-epoch selection)" if event.get("source") == "fit" else ""
        return f"validation Dice {event['dice']:.4f} at step {event['step']}{source}"
    if kind == "done":
        return f"done: v{event['version']} is current"
    if kind == "failed":
        return event["message"]
    if kind == "cancelled":
        return "cancelled"
    return None


def format_outcome(outcome: RoundOutcome) -> str:
    lines = [f"round {outcome.round}: {outcome.status}: {outcome.message}"]
    m = outcome.metrics
    if m:

        def fmt(value):
            return "n/a" if value is None else f"{value:.4f}"

        lines.append(
            f"validation Dice {fmt(m.get('validation_dice'))} (base "
            f"{fmt(m.get('base_validation_dice'))}) on {m.get('validation_patches')} patches; "
            f"{m.get('train_patches')} training patches, {m.get('steps')} steps, "
            f"{m.get('seconds')} s"
        )
    if outcome.stop_hint:
        lines.append(f"hint: {outcome.stop_hint}")
    return "\n".join(lines)


def _distributed(device: str):
    """torchrun's process group when WORLD_SIZE > 1 (``training.distributed_context``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return contextlib.nullcontext(None)
    from napari_pvs import training

    context = getattr(training, "distributed_context", None)
    if context is None:
        raise ValueError(
            "this napari-pvs cannot train on several processes (no "
            "training.distributed_context); run without torchrun"
        )
    return context(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m napari_pvs.rounds",
        description="Run one fine-tuning round of an annotation project in this process "
        "(under torchrun: on several processes, rank 0 commits).",
    )
    add_round_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_command(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"napari-pvs round: error: {exc}", file=sys.stderr)
        return 2


def run_command(args: argparse.Namespace) -> int:
    """What ``napari-pvs round`` and ``python -m napari_pvs.rounds`` do: one round, printed.

    Exit status 0 when the round is done, 1 when it failed or was cancelled.
    """
    config = config_from_args(args)
    with _distributed(config.device) as context:
        if context is None or not context.distributed:
            return _run_alone(args.project, config)
        return _run_distributed(args.project, config, context)


def _run_alone(folder: str, config: RoundConfig) -> int:
    from napari_pvs.progress import TerminalProgress
    from napari_pvs.project import Project

    bar = TerminalProgress()

    def show(event: Event) -> None:
        line = format_event(event)
        if line:
            print(line, flush=True)

    def progress(done: int, total: int, message: str) -> None:
        if total:
            bar(done, total, message)

    with Project.open(folder) as project:
        outcome = run_round(project, config, progress, on_event=show)
    print(format_outcome(outcome), flush=True)
    return 0 if outcome.status == "done" else 1


def _run_distributed(folder: str, config: RoundConfig, context) -> int:
    """Rank 0 prepares and commits; every rank trains its share; only rank 0 writes."""
    import torch.distributed as dist

    from napari_pvs.project import Project

    project = Project.open(folder) if context.is_main else None
    config.device = context.device
    holder: list[Any] = [None]
    try:
        if project is not None:
            try:
                holder[0] = {"plan": prepare_round(project, config)}
            except Exception as exc:
                holder[0] = {"error": str(exc)}
        dist.broadcast_object_list(holder, src=0)
        if "error" in holder[0]:
            if context.is_main:
                print(f"napari-pvs round: error: {holder[0]['error']}", file=sys.stderr)
            return 2
        plan = holder[0]["plan"]
        if project is None:
            execute_round(plan, main=False, device=context.device)
            return 0
        log = _EventLog(Path(plan["folder"]) / "events.jsonl")

        def emit(event: Event) -> None:
            log.write(event)
            line = format_event(event)
            if line:
                print(line, flush=True)

        try:
            result = execute_round(plan, emit, device=context.device)
            outcome = commit_round(project, plan, result)
        except Cancelled:
            outcome = abandon_round(project, plan, "cancelled", "cancelled")
        except Exception as exc:
            outcome = abandon_round(project, plan, "failed", f"failed: {type(exc).__name__}: {exc}")
        finally:
            log.close()
        print(format_outcome(outcome), flush=True)
        return 0 if outcome.status == "done" else 1
    finally:
        if project is not None:
            project.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

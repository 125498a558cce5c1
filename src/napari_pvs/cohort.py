"""Predict many volumes as tasks on a dask.distributed cluster, one model load per worker.

A cohort of hundreds of scans is embarrassingly parallel: each volume is one task that runs
the ordinary chunked :class:`napari_pvs.inference.Predictor` into its own zarr group (so each
task is itself memory-bounded and resumable). By default a :class:`distributed.LocalCluster`
is started; pass ``scheduler="tcp://host:8786"`` to use an existing cluster. Workers load the
model once (cached per worker process, keyed by the model spec) and reuse it for every volume.

Tasks fail one by one: a damaged or unreadable volume (or any other error in its task, even a
worker that dies) becomes that volume's ``error`` while every other volume is still written;
the caller lists the failures at the end (the CLI exits with code 2 when any failed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_pvs.progress import CancelToken, ProgressCallback, check_cancelled, no_progress

if TYPE_CHECKING:  # torch comes with inference: imported where a prediction runs
    from napari_pvs.inference import PredictionSummary

#: Seconds to wait for an existing scheduler to answer before giving up with a clear error.
CONNECT_TIMEOUT = 10.0

# Per worker process: model spec -> (models, metadata list). Filled on first use.
_MODEL_CACHE: dict[tuple, tuple[list, list[dict]]] = {}


@dataclass
class CohortResult:
    """One volume's outcome: its output store, what ran, and any warnings for the user."""

    input: str
    out: str
    summary: PredictionSummary | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    worker_pid: int = field(default_factory=os.getpid)
    #: Models this worker process had loaded after the task: stays 1 however many volumes it ran.
    models_loaded: int = 0


def trained_modalities(metadata: dict[str, Any]) -> set[str] | None:
    """Modalities a checkpoint was trained on (``training.modalities``), or None if unrecorded."""
    recorded = (metadata.get("training") or {}).get("modalities") or metadata.get("modalities")
    return {str(m) for m in recorded} if recorded else None


def modality_warning(metadata: dict[str, Any], modality: str) -> str | None:
    """A one-line warning when ``modality`` is not one the model was trained on."""
    known = trained_modalities(metadata)
    if known is None or modality in known:
        return None
    return (
        f"the model was trained on {', '.join(sorted(known))} images but this volume is "
        f"{modality!r}; predictions may be poor (pass --modality if the volume is mislabelled)"
    )


def load_models(spec: str | Sequence[str], device: str = "auto") -> tuple[list, list[dict]]:
    """Load ``spec`` ('default', a checkpoint path, or a list of them: an ensemble), cached."""
    from napari_pvs.models import resolve_device
    from napari_pvs.models.checkpoint import load_model

    specs = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    resolved = str(resolve_device(device))
    key = (tuple(str(s) for s in specs), resolved)
    if key not in _MODEL_CACHE:
        loaded = [load_model(str(s), device=resolved) for s in specs]
        _MODEL_CACHE[key] = ([m for m, _ in loaded], [meta for _, meta in loaded])
    return _MODEL_CACHE[key]


def output_name(path: str | Path) -> str:
    """``sub-01_T2w.nii.gz`` -> ``sub-01_T2w.zarr``: the store name for one input."""
    name = Path(str(path).rstrip("/")).name
    for suffix in (".nii.gz", ".nii", ".ome.zarr", ".zarr"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return f"{name}.zarr"


def predict_volume(
    path: str | Path,
    out: str | Path,
    model: str | Sequence[str] = "default",
    modality: str | None = None,
    options: dict[str, Any] | None = None,
    threads: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    overwrite: bool = False,
) -> CohortResult:
    """Open one volume, load (or reuse) the model, predict into ``out``; the task body."""
    import torch

    from napari_pvs.inference import Predictor
    from napari_pvs.io import open_volume

    if threads:
        torch.set_num_threads(int(threads))
    options = dict(options or {})
    volume = open_volume(path, modality=modality)
    models, metadata = load_models(model, options.get("device", "auto"))
    warnings = [w for meta in metadata if (w := modality_warning(meta, volume.modality))]
    predictor = Predictor(models, modality=volume.modality, **options)
    summary = predictor.predict(volume, out, progress=progress, cancel=cancel, overwrite=overwrite)
    return CohortResult(
        str(path), str(out), summary, sorted(set(warnings)), models_loaded=len(_MODEL_CACHE)
    )


def failure_message(path: str | Path, exc: BaseException) -> str:
    """One line for a volume's failed task: the damaged-file sentence, the user error, or the
    exception's type and message (never a traceback)."""
    from napari_pvs.io import damaged_file_error

    damaged = damaged_file_error(path, exc)
    if damaged is not None:
        return str(damaged)
    if isinstance(exc, ValueError | OSError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _task(path, out, model, modality, options, threads, overwrite) -> CohortResult:
    try:
        return predict_volume(
            path, out, model, modality, options, threads=threads, overwrite=overwrite
        )
    except Exception as exc:  # one volume's failure must not stop the others
        return CohortResult(str(path), str(out), error=failure_message(path, exc))


def connect(
    scheduler: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    timeout: float | None = None,
):
    """A ``distributed.Client``: to ``scheduler`` if given, else to a new LocalCluster."""
    from distributed import Client, LocalCluster

    timeout = CONNECT_TIMEOUT if timeout is None else timeout
    if scheduler:
        try:
            return Client(scheduler, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            raise ValueError(
                f"could not reach the dask scheduler at {scheduler!r} within {timeout:g} s "
                f"({type(exc).__name__}); check the address (e.g. tcp://host:8786) and that "
                "'dask scheduler' is running there, or leave out --scheduler to use this machine"
            ) from exc
        except ValueError as exc:
            raise ValueError(
                f"invalid dask scheduler address {scheduler!r} ({exc}); use e.g. tcp://host:8786"
            ) from exc
    cores = os.cpu_count() or 1
    workers = n_workers or max(1, cores // max(1, threads_per_worker))
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        dashboard_address=None,
    )
    return Client(cluster)


def predict_cohort(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    model: str | Sequence[str] = "default",
    modality: str | Sequence[str | None] | None = None,
    options: dict[str, Any] | None = None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    overwrite: bool = False,
    timeout: float | None = None,
    outs: Sequence[str | Path] | None = None,
) -> list[CohortResult]:
    """Predict every input into ``out_dir/<name>.zarr`` (or ``outs``) as dask tasks.

    ``modality`` is one for every input or one per input. Returns one :class:`CohortResult`
    per input, in input order; a volume whose task fails
    (for any reason) gets ``error`` set while the others still finish and are written.
    Before any work, every output is checked not to be (or lie in, or hold) any input, and the
    folder to be writable. Cancelling stops waiting, cancels pending tasks and raises
    :class:`napari_pvs.progress.Cancelled`.
    """
    from distributed import as_completed

    from napari_pvs import atomic

    progress = progress or no_progress
    if not inputs:
        raise ValueError("no input volumes given")
    missing = [str(p) for p in inputs if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"input volume(s) not found: {', '.join(missing)}")
    names = [output_name(p) for p in inputs] if outs is None else [Path(o).name for o in outs]
    if len(names) != len(inputs):
        raise ValueError(f"got {len(inputs)} inputs but {len(names)} outputs")
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(
            f"several inputs would write the same output ({', '.join(clashes)}); give the "
            "inputs distinct file names or predict them in separate calls"
        )
    modalities = (
        list(modality) if isinstance(modality, list | tuple) else [modality] * len(inputs)
    )
    out_dir = Path(out_dir)
    outs = [out_dir / n for n in names] if outs is None else [Path(o) for o in outs]
    for target in outs:  # existing stores are resumed (or refused) by their own task
        atomic.check_output(target, inputs=inputs, overwrite=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    timeout = CONNECT_TIMEOUT if timeout is None else timeout
    client = connect(scheduler, n_workers, threads_per_worker, timeout)
    try:
        futures = [
            client.submit(
                _task,
                str(Path(p).resolve()),
                str(o.resolve()),
                model,
                m,
                options,
                threads_per_worker,
                overwrite,
                pure=False,
                key=f"napari-pvs-predict-{i}-{n}",
            )
            for i, (p, o, n, m) in enumerate(zip(inputs, outs, names, modalities, strict=True))
        ]
        by_key = {f.key: i for i, f in enumerate(futures)}
        results: list[CohortResult | None] = [None] * len(futures)
        progress(0, len(futures), "volumes")
        for done, future in enumerate(as_completed(futures), start=1):
            if cancel is not None and cancel.is_set():
                client.cancel(futures)
                check_cancelled(cancel)
            index = by_key[future.key]
            try:
                results[index] = future.result()
            except Exception as exc:  # the task itself died (e.g. its worker was killed)
                results[index] = CohortResult(
                    str(inputs[index]), str(outs[index]), error=failure_message(inputs[index], exc)
                )
            progress(done, len(futures), "volumes")
        return [r for r in results if r is not None]
    finally:
        cluster = getattr(client, "cluster", None)
        client.close()
        if cluster is not None and not scheduler:
            cluster.close()

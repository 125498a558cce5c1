"""The prediction store: its layout, run signature, creation, lock, resume and completion.

A store is a zarr v3 group holding one array per output (``probability``, ``segmentation`` and,
with several samples per window, the uncertainty measures), all with the input's shape, plus
``_chunks_done`` (one flag per output chunk). Why it is built this way:

* **Resumable.** A chunk is marked done only after its files are fsynced
  (:mod:`napari_pvs.inference.writer`); a rerun with the same settings (the group's ``run``
  signature) skips finished chunks. A store written with other settings is refused with a
  message that says what differs.
* **Safe.** An existing folder that is not a prediction store is never written into or replaced.
  A lock file inside the store (:func:`napari_pvs.atomic.hold_lock`) keeps a second run from
  writing it meanwhile. ``overwrite`` builds the new store under a hidden sibling name
  (resumable too) and swaps it in only when complete, so a failed or interrupted overwrite
  leaves the old store whole. ``complete`` is set last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from napari_pvs import atomic
from napari_pvs.inference.inputs import VolumeSource
from napari_pvs.inference.planning import WindowPlan
from napari_pvs.io import ATTRS_KEY
from napari_pvs.io.predictions import PVS_COUNT, pvs_count_record

#: Version of the prediction store layout; bump when the layout changes.
STORE_FORMAT = 1
DONE_ARRAY = "_chunks_done"
#: Hidden sibling an ``overwrite`` run builds its store under until it is complete.
OVERWRITE_MARK = f"{atomic.TEMP_MARK}overwrite-"


def store_lock_path(store: str | Path) -> Path:
    """The lock file a run holds inside a prediction store while it writes it.

    It lives in the ``_chunks_done`` array's folder, which zarr never lists, so readers of the
    store see nothing unusual while a run is going on.
    """
    return Path(store) / DONE_ARRAY / atomic.LOCK_NAME


def overwrite_staging_path(out: str | Path) -> Path:
    """Where ``overwrite`` builds the replacement of ``out`` (swapped in when complete)."""
    out = Path(out)
    return out.with_name(f"{OVERWRITE_MARK}{out.name}")


def _store_run(path: Path) -> dict | None:
    """The ``run`` signature of a prediction store at ``path``, or None if it is not one."""
    try:
        group = zarr.open_group(str(path), mode="r")
        ours = dict(group.attrs).get(ATTRS_KEY, {})
    except Exception:  # not a zarr group (or unreadable): not one of our stores
        return None
    run = ours.get("run") if isinstance(ours, dict) else None
    return run if isinstance(run, dict) else None


def weights_digest(model: torch.nn.Module) -> str:
    """A short digest of a model's weights, for the run signature (other weights: another run)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


#: Voxels of the strided sample the input's digest is taken from.
DIGEST_SAMPLE_VOXELS = 32768


def input_digest(data, max_voxels: int = DIGEST_SAMPLE_VOXELS) -> str:
    """A short digest of the input's voxels (a strided sample of about ``max_voxels``), for
    the run signature: a store made from another scan of the same shape is never resumed."""
    from napari_pvs.intensity import strided_sample

    return sample_digest(strided_sample(data, max_voxels))


def sample_digest(sample: np.ndarray) -> str:
    """:func:`input_digest` of its sample already drawn."""
    sample = np.ascontiguousarray(sample)
    digest = hashlib.sha256(f"{sample.dtype.str}{sample.shape}".encode())
    digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


@dataclass
class OpenedStore:
    """A prediction store a run holds: its group, done grid, the path written and the lock.

    ``path`` is ``out`` itself, or with ``overwrite`` over an existing store its hidden staging
    sibling, swapped onto ``out`` by :func:`complete_store`.
    """

    group: zarr.Group
    done: np.ndarray
    path: Path
    lock: atomic.HeldLock


def open_store(
    out: Path,
    signature: dict,
    plan: WindowPlan,
    src: VolumeSource,
    arrays: Sequence[str],
    overwrite: bool,
    locks: contextlib.ExitStack,
) -> OpenedStore:
    """Create the output group, or reopen a compatible one, holding its lock.

    With ``overwrite`` over an existing store, the staging sibling is written; its own lock,
    and the lock of ``out``, are held (in ``locks``) until the run ends.
    """
    wanted = json.loads(json.dumps(signature))
    atomic.check_writable_folder(out.parent)
    atomic.restore_interrupted(out)
    target = out
    if out.exists():
        if _store_run(out) is None:
            if not (out.is_dir() and not any(out.iterdir())):
                raise ValueError(
                    f"{out} exists and is not a napari-pvs prediction store; refusing to "
                    "write into or replace it; choose another output path"
                )
        elif overwrite:
            locks.enter_context(atomic.hold_lock(store_lock_path(out), f"prediction store {out}"))
            target = overwrite_staging_path(out)
            if target.exists() and _store_run(target) != wanted:
                atomic.remove_path(target)  # an earlier overwrite with other settings: ours
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        create_store(target, wanted, plan, src, arrays)
    lock = locks.enter_context(atomic.hold_lock(store_lock_path(target), f"prediction store {out}"))
    group = zarr.open_group(str(target), mode="r+")
    found = dict(group.attrs).get(ATTRS_KEY, {}).get("run")
    if found != wanted:
        differ = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
        details = "; ".join(f"{k}: {found.get(k)!r} -> {wanted.get(k)!r}" for k in differ)
        raise ValueError(
            f"{out} holds a prediction from a different run "
            f"({details}); rerun with the same settings to resume, pass overwrite=True "
            "(CLI: --overwrite) to replace it once the new one is complete, or choose "
            "another output path"
        )
    done = np.asarray(group[DONE_ARRAY][...]).astype(bool)
    return OpenedStore(group, done, target, lock)


def create_store(
    target: Path, wanted: dict, plan: WindowPlan, src: VolumeSource, arrays: Sequence[str]
) -> None:
    """The empty store (metadata, arrays, done grid) built aside and renamed into place,
    so a store under ``target`` always has its full metadata and run signature."""
    temp = atomic.temp_path(target)
    group = zarr.open_group(str(temp), mode="w")
    geometry = {
        "spacing": list(src.spacing),
        "affine": src.affine.tolist(),
        "axes": list(src.axes),
        "modality": wanted["modality"],
        "source": src.source,
    }
    group.attrs[ATTRS_KEY] = {**geometry, "run": wanted, "complete": False}
    for name in arrays:
        dtype = "uint8" if name == "segmentation" else "float16"
        array = group.create_array(
            name, shape=plan.shape, chunks=plan.chunks, dtype=dtype, fill_value=0
        )
        array.attrs[ATTRS_KEY] = geometry
    group.create_array(
        DONE_ARRAY,
        shape=plan.chunk_grid,
        chunks=(1, 1, 1),
        dtype="uint8",
        fill_value=0,
        compressors=None,
    )
    atomic.fsync_path(temp)
    try:
        os.rename(temp, target)  # onto nothing, or an empty folder; never a full one
    except OSError:
        atomic.remove_path(temp)
        if not target.exists():
            raise
        return  # another run created it meanwhile: its lock and signature decide
    atomic.fsync_folder(target.parent)


def complete_store(
    store: OpenedStore, out: Path, pvs_count: tuple[int, int | None] | None = None
) -> None:
    """Mark a fully written store complete, with its segmentation's ``pvs_count`` (voxels,
    clusters) recorded where given; an overwrite's staging store then replaces ``out`` in one
    swap (the lock file held inside it moves with it)."""
    group = store.group
    attrs = dict(group.attrs[ATTRS_KEY])
    attrs["complete"] = True
    if pvs_count is not None:
        attrs[PVS_COUNT] = pvs_count_record(*pvs_count)
    group.attrs[ATTRS_KEY] = attrs  # zarr writes metadata by rename: atomic
    if store.path != out:  # overwrite: the complete new store replaces the old one in one swap
        atomic.commit(store.path, out)
        store.lock.path = store_lock_path(out)  # our lock file moved with the store
    else:
        atomic.fsync_path(out / "zarr.json")

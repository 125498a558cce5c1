"""Temporary names beside a target, and sweeping what killed writers left behind."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

TEMP_MARK = ".napari-pvs-tmp-"
OLD_MARK = ".napari-pvs-old-"
#: Prefix of the folders a contents swap keeps inside a mount point (see :func:`swap_contents`).
SWAP_MARK = ".napari-pvs-swap-"
HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]

PathLike = str | os.PathLike


def temp_path(target: PathLike) -> Path:
    """A unique temporary name beside ``target`` (same folder, so renaming is atomic).

    The name carries this host and process id, so :func:`sweep` can remove what a killed
    writer left behind without touching a live writer's files.
    """
    target = Path(target)
    return target.with_name(
        f"{TEMP_MARK}{HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{target.name}"
    )


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sweep(target: PathLike) -> None:
    """Remove leftovers of killed writes of ``target``: temporary siblings of dead processes
    on this host, and old copies a finished directory replacement did not get to delete."""
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    suffix = f"-{target.name}"
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not name.endswith(suffix):
            continue
        if (name.startswith(OLD_MARK) and target.exists()) or _dead_temporary(name):
            remove_path(Path(entry.path))


def _dead_temporary(name: str) -> bool:
    """True for a :func:`temp_path` name made on this host by a process that is gone."""
    if not name.startswith(TEMP_MARK):
        return False
    parts = name[len(TEMP_MARK) :].split("-", 3)
    ours = len(parts) == 4 and parts[0] == HOST_TAG and parts[1].isdigit()
    return ours and not pid_alive(int(parts[1]))


def sweep_folder(folder: PathLike) -> list[Path]:
    """Remove every temporary in ``folder`` (not below it) that a dead process on this host
    left behind, whatever its target; returns what was removed."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    removed = [Path(e.path) for e in entries if _dead_temporary(e.name)]
    for path in removed:
        remove_path(path)
    return removed


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_settled(temp: Path) -> None:
    """Remove a failed write's temporary output, again if it reappears for a moment.

    A store is written by worker threads (dask, zarr); when one fails, others may still be
    finishing a chunk, and zarr recreates the folders it writes into.
    """
    was_dir = temp.is_dir()
    remove_path(temp)
    if was_dir:
        for _ in range(5):
            time.sleep(0.1)
            if temp.exists():
                remove_path(temp)

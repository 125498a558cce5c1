"""Putting a finished temporary in place: an atomic rename, a folder exchange, or (for a
folder that cannot be moved, such as a mount point) a crash-safe swap of its contents."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import uuid
from pathlib import Path

from napari_pvs.atomic.names import HOST_TAG, OLD_MARK, SWAP_MARK, PathLike, pid_alive, remove_path
from napari_pvs.atomic.sync import fsync_folder, fsync_path


def restore_interrupted(target: PathLike) -> Path | None:
    """Put back a store that a killed directory replacement had moved aside.

    Only the fallback replacement (where the file system cannot swap two folders atomically)
    has such a moment: the old store renamed to a hidden ``OLD_MARK`` name, the new one not
    yet in place. Returns the restored path, or None when there was nothing to restore.
    """
    target = Path(target)
    if target.is_dir() and not target.is_symlink():
        settle_contents(target)
        return None
    if target.exists() or target.is_symlink():
        return None
    parent = target.parent if str(target.parent) else Path(".")
    try:
        candidates = [
            Path(e.path)
            for e in os.scandir(parent)
            if e.name.startswith(OLD_MARK) and e.name.endswith(f"-{target.name}")
        ]
    except OSError:
        return None
    if not candidates:
        return None
    newest = max(candidates, key=lambda p: p.stat().st_mtime)
    os.replace(newest, target)
    fsync_folder(parent)
    return target


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    result = renameat2(
        _AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # this file system cannot exchange: use the two-rename fallback
    raise OSError(code, os.strerror(code), str(b))


#: errno of a rename that cannot move a folder itself: a mount point (EBUSY), or the new
#: folder on another file system than the old one (EXDEV, e.g. the parent of a mount point).
_CANNOT_MOVE_FOLDER = (errno.EBUSY, errno.EXDEV)


def commit(temp: PathLike, target: PathLike) -> Path:
    """fsync ``temp`` and rename it onto ``target``.

    A file replaces its target atomically. A directory (a zarr store) replaces an existing one
    atomically too where the file system can swap two folders (Linux ``renameat2``; ext4, xfs,
    btrfs, tmpfs); elsewhere the old store first moves aside to a hidden name, and a crash
    between the two renames leaves it whole there, put back by :func:`restore_interrupted`
    (which :func:`check_output` runs). A folder that cannot be moved at all (a mount point)
    keeps its place and has its contents swapped instead (:func:`swap_contents`). Never a
    half-written store under the final name.
    """
    temp, target = Path(temp), Path(target)
    fsync_path(temp)
    if temp.is_dir() and target.is_dir() and not target.is_symlink():
        if os.path.ismount(target):
            return swap_contents(temp, target)
        try:
            exchanged = exchange(temp, target)
        except OSError as exc:
            if exc.errno not in _CANNOT_MOVE_FOLDER:
                raise
            return swap_contents(temp, target)
        if exchanged:
            fsync_folder(target.parent)
            remove_path(temp)  # now the old store
        else:
            old = target.with_name(f"{OLD_MARK}{uuid.uuid4().hex[:12]}-{target.name}")
            try:
                os.replace(target, old)
            except OSError as exc:
                if exc.errno not in _CANNOT_MOVE_FOLDER:
                    raise
                return swap_contents(temp, target)
            os.replace(temp, target)
            fsync_folder(target.parent)
            remove_path(old)
    else:
        os.replace(temp, target)
    fsync_folder(target.parent)
    return target




def _swap_dir(target: Path, swap_id: str, state: str) -> Path:
    return target / f"{SWAP_MARK}{swap_id}-{state}"


def _user_entries(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if not name.startswith(SWAP_MARK))


def _move_entries(source: Path, destination: Path) -> None:
    """Move every entry of ``source`` (but our own swap folders) into ``destination``."""
    for name in _user_entries(source):
        os.replace(source / name, destination / name)
    fsync_folder(source)
    fsync_folder(destination)


def _copy_tree(source: Path, destination: Path) -> None:
    """Copy a folder tree; the first failure (a full disk) is raised as the ``OSError`` it is
    (``shutil.copytree`` would gather failures into one error without an errno)."""
    destination.mkdir()
    for root, dirs, files in os.walk(source):
        here = destination / Path(root).relative_to(source)
        for name in dirs:
            if (Path(root) / name).is_symlink():  # os.walk lists links to folders here
                os.symlink(os.readlink(Path(root) / name), here / name)
            else:
                (here / name).mkdir()
        for name in files:
            shutil.copy2(Path(root) / name, here / name, follow_symlinks=False)


def swap_contents(new: PathLike, target: PathLike) -> Path:
    """Replace the contents of folder ``target`` with those of folder ``new``, crash-safe.

    For a folder that cannot itself be renamed (a mount point, or one on another file system
    than ``new``): the new tree is copied into a hidden folder inside ``target`` first, so a
    full disk fails there, before anything old is touched (the copy is removed and the error
    raised). ``new`` is removed on success. See the steps above.
    """
    new, target = Path(new), Path(target)
    settle_contents(target)
    swap_id = uuid.uuid4().hex[:12]
    staging = _swap_dir(target, swap_id, f"staging-{HOST_TAG}-{os.getpid()}")
    try:
        _copy_tree(new, staging)
        fsync_path(staging)
        ready = _swap_dir(target, swap_id, "ready")
        os.replace(staging, ready)
        fsync_folder(target)
    except BaseException:
        remove_path(staging)
        raise
    old = _swap_dir(target, swap_id, "old")
    old.mkdir()
    _move_entries(target, old)
    committing = _swap_dir(target, swap_id, "commit")
    os.replace(ready, committing)
    fsync_folder(target)
    _finish_swap(target, committing, old)
    remove_path(new)
    return target


def _finish_swap(target: Path, committing: Path, old: Path) -> None:
    _move_entries(committing, target)
    committing.rmdir()
    fsync_folder(target)
    remove_path(old)


def settle_contents(target: PathLike) -> None:
    """Finish or undo a contents swap of ``target`` that a killed process left half-way.

    Before the commit point the old entries go back (a ``ready`` copy is dropped); after it
    the new ones are moved in; a staging copy of a dead process and an old copy a finished
    swap did not delete are removed. A no-op when nothing is left (one ``listdir``).
    """
    target = Path(target)
    try:
        names = [n for n in os.listdir(target) if n.startswith(SWAP_MARK)]
    except OSError:
        return
    by_id: dict[str, dict[str, Path]] = {}
    for name in names:
        swap_id, _, state = name[len(SWAP_MARK) :].partition("-")
        by_id.setdefault(swap_id, {})[state] = target / name
    for swap_id, parts in by_id.items():
        old = parts.get("old")
        if "commit" in parts:  # past the commit point: the new contents win
            _finish_swap(target, parts["commit"], old or _swap_dir(target, swap_id, "old"))
            continue
        if "ready" in parts:  # before it: the old contents go back
            if old is not None:
                _move_entries(old, target)
            remove_path(parts["ready"])
        if old is not None:  # emptied just now, or a finished swap's old copy
            remove_path(old)
        for state, path in parts.items():
            if state.startswith("staging-"):
                host, _, pid = state[len("staging-") :].partition("-")
                if host == HOST_TAG and pid.isdigit() and not pid_alive(int(pid)):
                    remove_path(path)

"""One write discipline for every file and store the package writes.

Everything is written under a temporary name beside its target, fsynced, then renamed into
place, so a killed process leaves either the old output or the new one under the final name,
never a truncated file. Before long work starts, :func:`check_output` refuses an output that is
one of the command's inputs (or inside one, or holds one), an existing output without
``overwrite``, and a folder that cannot be written. :func:`hold_lock` keeps a second process
from writing what another one is writing. No Qt, no torch: the core and every adapter use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import getpass
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

TEMP_MARK = ".napari-pvs-tmp-"
OLD_MARK = ".napari-pvs-old-"
#: Prefix of the folders a contents swap keeps inside a mount point (see :func:`swap_contents`).
SWAP_MARK = ".napari-pvs-swap-"
#: Name of the lock file :func:`hold_lock` creates (inside a store, or beside a file).
LOCK_NAME = ".napari-pvs-lock"
#: errno values that mean "the disk or the folder refused the write", not a bug.
_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "the file is too large for this file system",
}
#: What SQLite says (it carries no errno) for the errno it means.
_SQLITE_TEXTS = {
    "database or disk is full": errno.ENOSPC,
    "attempt to write a readonly database": errno.EROFS,
}
_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]

PathLike = str | os.PathLike


class OutputError(OSError):
    """A write the disk or folder refused (full, read-only, no permission), in one sentence."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class Locked(ValueError):
    """Another live process holds the lock; ``holder`` has its host, pid, user and since."""

    def __init__(self, message: str, holder: dict | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


def _resolved(path: PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path)))).resolve()


def overlaps(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` are the same path or one lies inside the other."""
    pa, pb = _resolved(a), _resolved(b)
    if pa == pb or pa in pb.parents or pb in pa.parents:
        return True
    try:
        return pa.exists() and pb.exists() and os.path.samefile(pa, pb)
    except OSError:
        return False


def check_output(
    target: PathLike,
    *,
    inputs: Iterable[PathLike | None] = (),
    overwrite: bool = False,
    flag: str = "--overwrite",
    kind: str | None = None,
) -> Path:
    """Refuse a write before any work: onto an input, over an existing output, into no folder.

    Raises ``ValueError`` (target is an input or inside one), ``FileExistsError`` (exists and
    no ``overwrite``; or exists as a folder where ``kind="file"`` is written, or the reverse)
    or ``PermissionError``/``NotADirectoryError`` (the folder cannot be written), each naming
    the path and the fix. A missing folder is fine when it can be created. Also puts back a
    store left aside by a directory replacement that was killed half-way (see :func:`commit`).
    Returns the target as a ``Path``.
    """
    target = Path(target)
    restore_interrupted(target)
    for source in inputs:
        if source is not None and str(source) and overlaps(target, source):
            raise ValueError(
                f"output {target} is the input {source} (or inside it, or holds it): refusing "
                "to write onto an input; choose another output path"
            )
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise FileExistsError(
                f"{target} already exists; choose another path or pass {flag} to replace it"
            )
        if kind == "file" and target.is_dir():
            raise FileExistsError(f"{target} is a folder; refusing to replace it with a file")
        if kind == "dir" and not target.is_dir():
            raise FileExistsError(f"{target} is a file; refusing to replace it with a folder")
    check_writable_folder(target.parent)
    return target


def check_writable_folder(folder: PathLike) -> Path:
    """The folder (or, if it does not exist yet, its nearest existing parent) can be written.

    Probed by creating and removing a file, not guessed from permission bits.
    """
    folder = Path(folder) if str(folder) else Path(".")
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(
            f"cannot write in {folder}: {existing} is a file, not a folder; choose another path"
        )
    probe = existing / f"{TEMP_MARK}probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.touch()
    except OSError as exc:
        raise PermissionError(
            f"cannot write in {existing} ({exc.strerror or exc}); choose a folder you can "
            "write to"
        ) from exc
    probe.unlink()
    return folder


def temp_path(target: PathLike) -> Path:
    """A unique temporary name beside ``target`` (same folder, so renaming is atomic).

    The name carries this host and process id, so :func:`sweep` can remove what a killed
    writer left behind without touching a live writer's files.
    """
    target = Path(target)
    return target.with_name(
        f"{TEMP_MARK}{_HOST_TAG}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{target.name}"
    )


def _pid_alive(pid: int) -> bool:
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
            _remove(Path(entry.path))


def _dead_temporary(name: str) -> bool:
    """True for a :func:`temp_path` name made on this host by a process that is gone."""
    if not name.startswith(TEMP_MARK):
        return False
    parts = name[len(TEMP_MARK) :].split("-", 3)
    ours = len(parts) == 4 and parts[0] == _HOST_TAG and parts[1].isdigit()
    return ours and not _pid_alive(int(parts[1]))


def sweep_folder(folder: PathLike) -> list[Path]:
    """Remove every temporary in ``folder`` (not below it) that a dead process on this host
    left behind, whatever its target; returns what was removed."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    removed = [Path(e.path) for e in entries if _dead_temporary(e.name)]
    for path in removed:
        _remove(path)
    return removed


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


def fsync_path(path: PathLike) -> None:
    """Flush a file, or every file and folder under a directory, to the disk."""
    path = Path(path)
    if path.is_dir():
        for root, _dirs, files in os.walk(path):
            for name in files:
                _fsync_file(Path(root) / name)
            fsync_folder(root)
    else:
        _fsync_file(path)


def fsync_files(paths: Iterable[PathLike]) -> None:
    """fsync each existing file of ``paths`` (missing ones are skipped: e.g. empty chunks)."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            _fsync_file(Path(path))


def sync_files(paths: Iterable[PathLike], folder: PathLike) -> None:
    """Make ``paths`` (files under ``folder``) durable: one ``syncfs`` of the file system that
    holds ``folder`` where Linux has it (cheaper than many fsyncs), else an fsync per file."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(folder, os.O_RDONLY)
            try:
                if libc.syncfs(fd) == 0:
                    return
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            fsync_files(paths)  # no syncfs here: one fsync per file
            return
    fsync_files(paths)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: PathLike) -> None:
    """Make renames and new entries in ``folder`` durable (a no-op where folders cannot be
    opened, e.g. on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some file systems refuse fsync on folders
            os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _remove_settled(temp: Path) -> None:
    """Remove a failed write's temporary output, again if it reappears for a moment.

    A store is written by worker threads (dask, zarr); when one fails, others may still be
    finishing a chunk, and zarr recreates the folders it writes into.
    """
    was_dir = temp.is_dir()
    _remove(temp)
    if was_dir:
        for _ in range(5):
            time.sleep(0.1)
            if temp.exists():
                _remove(temp)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
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
            exchanged = _exchange(temp, target)
        except OSError as exc:
            if exc.errno not in _CANNOT_MOVE_FOLDER:
                raise
            return swap_contents(temp, target)
        if exchanged:
            fsync_folder(target.parent)
            _remove(temp)  # now the old store
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
            _remove(old)
    else:
        os.replace(temp, target)
    fsync_folder(target.parent)
    return target


# --------------------------------------------------------------------------------------------
# contents swap: replacing a folder that cannot be moved (a mount point)
#
# Everything happens inside the folder, on its own file system, under hidden SWAP_MARK names:
#   1. copy the new tree into  <swap>-<id>-staging-<host>-<pid>   (a kill: swept, old whole)
#   2. rename it to            <swap>-<id>-ready                  (complete and fsynced)
#   3. move each old entry into <swap>-<id>-old                   (a kill: rolled back)
#   4. rename ready to         <swap>-<id>-commit                 (the commit point)
#   5. move each new entry out of commit, remove it, remove old   (a kill: rolled forward)
# settle_contents (run by check_output through restore_interrupted) finishes or undoes a
# swap a kill interrupted, so the folder always ends with the old or the new contents whole.


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
    staging = _swap_dir(target, swap_id, f"staging-{_HOST_TAG}-{os.getpid()}")
    try:
        _copy_tree(new, staging)
        fsync_path(staging)
        ready = _swap_dir(target, swap_id, "ready")
        os.replace(staging, ready)
        fsync_folder(target)
    except BaseException:
        _remove(staging)
        raise
    old = _swap_dir(target, swap_id, "old")
    old.mkdir()
    _move_entries(target, old)
    committing = _swap_dir(target, swap_id, "commit")
    os.replace(ready, committing)
    fsync_folder(target)
    _finish_swap(target, committing, old)
    _remove(new)
    return target


def _finish_swap(target: Path, committing: Path, old: Path) -> None:
    _move_entries(committing, target)
    committing.rmdir()
    fsync_folder(target)
    _remove(old)


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
            _remove(parts["ready"])
        if old is not None:  # emptied just now, or a finished swap's old copy
            _remove(old)
        for state, path in parts.items():
            if state.startswith("staging-"):
                host, _, pid = state[len("staging-") :].partition("-")
                if host == _HOST_TAG and pid.isdigit() and not _pid_alive(int(pid)):
                    _remove(path)


def os_error_message(exc: BaseException, path: PathLike | None = None) -> str | None:
    """One sentence for an error the disk or folder caused (full, read-only, denied), or None.

    Recognises ``OSError`` by errno and errors that only carry the OS text (safetensors'
    ``SafetensorError: ... No space left on device (os error 28)``, SQLite's ``database or disk
    is full`` and ``attempt to write a readonly database``).
    """
    code = getattr(exc, "errno", None)
    reason = _WRITE_ERRNOS.get(code) if code is not None else None
    if reason is None:
        text = str(exc)
        for known, what in _WRITE_ERRNOS.items():
            if f"os error {known})" in text or os.strerror(known) in text:
                reason, code = what, known
                break
        for said, known in _SQLITE_TEXTS.items():
            if reason is None and said in text.lower():
                reason, code = _WRITE_ERRNOS[known], known
    if reason is None:
        return None
    where = path or getattr(exc, "filename", None)
    target = f" {where}" if where else ""
    fix = (
        "free some space or choose another folder"
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        else "choose a folder you can write to"
    )
    return f"could not write{target}: {reason}; {fix}"


def write_error(exc: BaseException, target: PathLike, existed: bool) -> OutputError | None:
    """The :class:`OutputError` for a failed write of ``target``, or None if not a disk error."""
    message = os_error_message(exc, target)
    if message is None:
        return None
    kept = (
        f"the existing {Path(target).name} is unchanged" if existed else "nothing was written"
    )
    return OutputError(getattr(exc, "errno", None) or errno.EIO, f"{message} ({kept})")


@contextlib.contextmanager
def atomic_output(
    target: PathLike,
    *,
    inputs: Iterable[PathLike | None] = (),
    overwrite: bool = False,
    flag: str = "--overwrite",
    kind: str | None = None,
) -> Iterator[Path]:
    """Write ``target`` through a temporary sibling: ``with atomic_output(out) as tmp: ...``.

    Checks as :func:`check_output` (creating a missing folder); the body writes ``tmp`` (a file,
    or a store directory: the body creates it); on success it is fsynced and renamed into
    place, on any error or interrupt it is removed and an existing ``target`` is left exactly
    as it was. A full disk or refused write becomes an :class:`OutputError` saying so.
    """
    target = check_output(target, inputs=inputs, overwrite=overwrite, flag=flag, kind=kind)
    existed = target.exists()
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target)
    temp = temp_path(target)
    try:
        yield temp
        if not temp.exists():
            raise RuntimeError(f"nothing was written for {target}")
        commit(temp, target)
    except BaseException as exc:
        _remove_settled(temp)
        mapped = write_error(exc, target, existed) if isinstance(exc, Exception) else None
        if mapped is not None and not isinstance(exc, OutputError):
            raise mapped from exc
        raise


def write_bytes(target: PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Atomically write a small file (JSON, CSV): temporary name, fsync, rename."""
    with atomic_output(target, overwrite=overwrite, kind="file") as temp:
        temp.write_bytes(data)
    return Path(target)


def write_text(target: PathLike, text: str, *, overwrite: bool = False) -> Path:
    """Atomically write a small text file (UTF-8)."""
    return write_bytes(target, text.encode("utf-8"), overwrite=overwrite)


def write_json(target: PathLike, value, *, overwrite: bool = False, indent: int = 2) -> Path:
    """Atomically write ``value`` as JSON."""
    return write_text(target, json.dumps(value, indent=indent), overwrite=overwrite)


# --------------------------------------------------------------------------------------------
# locks


def _holder_text(holder: dict) -> str:
    if not holder:
        return "another process"
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
    return (
        f"process {holder.get('pid', '?')} of {holder.get('user', '?')} on "
        f"{holder.get('host', '?')} (since {when})"
    )


def _read_holder(path: Path) -> dict:
    try:
        value = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _this_holder() -> dict:
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment (containers)
        user = str(os.getuid()) if hasattr(os, "getuid") else "?"
    return {"host": socket.gethostname(), "pid": os.getpid(), "user": user, "since": time.time()}


class HeldLock:
    """A lock :func:`hold_lock` holds: its file ``path`` and the ``record`` written in it.

    If the folder holding the lock file is renamed while it is held (a store swapped into
    place), set ``path`` to the new location so the file is removed there on release.
    """

    def __init__(self, path: Path, record: dict) -> None:
        self.path = path
        self.record = record


@contextlib.contextmanager
def hold_lock(path: PathLike, what: str) -> Iterator[HeldLock]:
    """Hold an exclusive lock file at ``path`` while writing ``what``; yields a :class:`HeldLock`.

    The file holds JSON ``{host, pid, user, since}``. The lock itself is an ``flock`` on it,
    which the kernel drops when the holder dies, so a lock left by a killed process is simply
    taken over (the record says whose it was: ``took_over``). Where ``flock`` is missing, a
    record whose process is dead on this host is taken over instead. A live holder makes this
    raise :class:`Locked` naming it. The file is removed on release.
    """
    path = Path(path)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_holder(path)
                    raise Locked(
                        f"{what} is being written by {_holder_text(holder)}; wait for that run "
                        "to finish (or stop it), then try again",
                        holder,
                    ) from None
            # A holder releasing the lock unlinks the file: make sure ours is still the one there.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        break
    try:
        previous = _read_holder(path)
        if fcntl is None and previous:
            alive = previous.get("host") != socket.gethostname() or _pid_alive(
                int(previous.get("pid", 0))
            )
            if alive and previous.get("pid") != os.getpid():
                raise Locked(
                    f"{what} is being written by {_holder_text(previous)}; wait for that run "
                    "to finish (or stop it), then try again",
                    previous,
                )
        record = _this_holder()
        if previous:
            record["took_over"] = previous
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    held = HeldLock(path, record)
    try:
        yield held
    finally:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(held.path)):
                held.path.unlink()
        os.close(fd)

"""An exclusive lock file a second writer is refused by, taken over when its holder died."""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from napari_pvs.atomic.names import PathLike, pid_alive

#: Name of the lock file :func:`hold_lock` creates (inside a store, or beside a file).
LOCK_NAME = ".napari-pvs-lock"


class Locked(ValueError):
    """Another live process holds the lock; ``holder`` has its host, pid, user and since."""

    def __init__(self, message: str, holder: dict | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}




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


def os_user() -> str:
    """The OS user's name (who holds a lock, who reviewed by default), or "" when the uid has
    none (a container's bare user)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError, ImportError):
        return ""


def _this_holder() -> dict:
    user = os_user() or (str(os.getuid()) if hasattr(os, "getuid") else "?")
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
            alive = previous.get("host") != socket.gethostname() or pid_alive(
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

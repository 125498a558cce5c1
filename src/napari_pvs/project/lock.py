"""The project's write lock: one writing process at a time, stale locks of dead ones taken over."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from napari_pvs import atomic
from napari_pvs.project.records import ProjectError, ProjectLocked, now


class WriteLock:
    """An exclusive write lock: ``flock`` on ``PROJECT/lock`` + holder JSON (host, pid, since).

    The kernel drops an ``flock`` when its process dies, so a lock file whose ``flock`` can be
    taken belongs to a dead process: a stale lock, taken over (and reported).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.stale: dict[str, Any] | None = None

    def acquire(self) -> None:
        for _attempt in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise ProjectError(
                        f"cannot lock {self.path} ({exc.strerror}); the project's file system "
                        "must support file locks"
                    ) from exc
                holder = self.read()
                raise ProjectLocked(
                    f"project {self.path.parent} is open for writing by "
                    f"{holder.get('user', '?')}@{holder.get('host', '?')} (pid "
                    f"{holder.get('pid', '?')}) since {holder.get('since', '?')}; close it there "
                    "first, or open it read-only",
                    holder,
                ) from None
            # The file we locked must still be the one at the path (a closing holder unlinks it).
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read_json_fd(fd)
            if previous:
                self.stale = previous
            pid = os.getpid()
            holder = {
                "host": socket.gethostname(),
                "pid": pid,
                "user": atomic.os_user() or str(os.getuid()),
                "since": now(),
                "process_start": _process_start_time(pid),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            os.fsync(fd)
            self.fd = fd
            return
        raise ProjectError(f"could not take the lock {self.path}: it kept changing; try again")

    def read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _read_json_fd(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 65536, 0)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {"unreadable": True}


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a reused pid from the original)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]

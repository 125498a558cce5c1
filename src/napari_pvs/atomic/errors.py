"""One sentence for a write the disk or folder refused (full, read-only, denied)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from napari_pvs.atomic.names import PathLike

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


class OutputError(OSError):
    """A write the disk or folder refused (full, read-only, no permission), in one sentence."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


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

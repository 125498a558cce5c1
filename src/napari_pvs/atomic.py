"""One write discipline for every file and store the package writes.

Everything is written under a temporary name beside its target, fsynced, then renamed into
place, so a killed process leaves either the old output or the new one under the final name,
never a truncated file. Before long work starts, :func:`check_output` refuses an output that is
one of the command's inputs (or inside one, or holds one), an existing output without
``overwrite``, and a folder that cannot be written. No Qt, no torch: the core and every adapter
use it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

TEMP_MARK = ".napari-pvs-tmp-"
OLD_MARK = ".napari-pvs-old-"


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path)))).resolve()


def overlaps(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` are the same path or one lies inside the other."""
    pa, pb = _resolved(a), _resolved(b)
    if pa == pb or pa in pb.parents or pb in pa.parents:
        return True
    try:
        return pa.exists() and pb.exists() and os.path.samefile(pa, pb)
    except OSError:
        return False


def check_output(
    target: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    flag: str = "--overwrite",
) -> Path:
    """Refuse a write before any work: onto an input, over an existing output, into no folder.

    Raises ``ValueError`` (target is an input), ``FileExistsError`` (exists, no ``overwrite``)
    or ``PermissionError``/``FileNotFoundError`` (folder missing or not writable), each naming
    the path and the fix. Returns the target as a ``Path``.
    """
    target = Path(target)
    for source in inputs:
        if source is not None and overlaps(target, source):
            raise ValueError(
                f"output {target} is the input {source} (or inside it): refusing to write onto "
                "an input; choose another output path"
            )
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{target} already exists; choose another path or pass {flag} to replace it"
        )
    check_writable_folder(target.parent if str(target.parent) else Path("."))
    return target


def check_writable_folder(folder: str | os.PathLike) -> Path:
    """The folder exists and this process may create files in it (probed, not guessed)."""
    folder = Path(folder) if str(folder) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist; create it first")
    probe = folder / f"{TEMP_MARK}probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.touch()
    except OSError as exc:
        raise PermissionError(
            f"cannot write in {folder} ({exc.strerror}); choose a folder you can write to"
        ) from exc
    probe.unlink()
    return folder


def temp_path(target: str | os.PathLike) -> Path:
    """A unique temporary name beside ``target`` (same folder, so renaming is atomic)."""
    target = Path(target)
    return target.with_name(f"{TEMP_MARK}{uuid.uuid4().hex[:12]}-{target.name}")


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or every file and folder under a directory, to the disk."""
    path = Path(path)
    if path.is_dir():
        for root, _dirs, files in os.walk(path):
            for name in files:
                _fsync_file(Path(root) / name)
            fsync_folder(root)
    else:
        _fsync_file(path)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make renames and new entries in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def commit(temp: str | os.PathLike, target: str | os.PathLike) -> Path:
    """fsync ``temp`` and rename it onto ``target``.

    A file replaces its target atomically. A directory (a zarr store) replaces an existing
    one in two renames: the old store moves aside to a hidden name first, so a crash in between
    leaves the old store whole beside the new one, never a half-written store.
    """
    temp, target = Path(temp), Path(target)
    fsync_path(temp)
    if temp.is_dir() and target.exists():
        old = target.with_name(f"{OLD_MARK}{uuid.uuid4().hex[:12]}-{target.name}")
        os.replace(target, old)
        os.replace(temp, target)
        fsync_folder(target.parent)
        _remove(old)
    else:
        os.replace(temp, target)
    fsync_folder(target.parent)
    return target


@contextlib.contextmanager
def atomic_output(
    target: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    flag: str = "--overwrite",
) -> Iterator[Path]:
    """Write ``target`` through a temporary sibling: ``with atomic_output(out) as tmp: ...``.

    Checks as :func:`check_output`; the body writes ``tmp`` (a file or a store directory);
    on success it is fsynced and renamed into place, on any error or interrupt it is removed
    and an existing ``target`` is left exactly as it was.
    """
    target = check_output(target, inputs=inputs, overwrite=overwrite, flag=flag)
    temp = temp_path(target)
    try:
        yield temp
        if not temp.exists():
            raise RuntimeError(f"nothing was written for {target}")
        commit(temp, target)
    except BaseException:
        _remove(temp)
        raise


def write_bytes(target: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    """Atomically write a small file (JSON, CSV): temporary name, fsync, rename."""
    with atomic_output(target, overwrite=overwrite) as temp:
        temp.write_bytes(data)
    return Path(target)


def write_text(target: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Atomically write a small text file (UTF-8)."""
    return write_bytes(target, text.encode("utf-8"), overwrite=overwrite)

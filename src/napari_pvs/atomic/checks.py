"""The checks made before any long work: not onto an input, not over an output without
``overwrite``, into a folder that can be written."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from pathlib import Path

from napari_pvs.atomic.names import TEMP_MARK, PathLike
from napari_pvs.atomic.replace import restore_interrupted


def resolved(path: PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path)))).resolve()


def overlaps(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` are the same path or one lies inside the other."""
    pa, pb = resolved(a), resolved(b)
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

"""The write discipline as one context manager, and the small-file forms."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from napari_pvs.atomic.checks import check_output
from napari_pvs.atomic.errors import OutputError, write_error
from napari_pvs.atomic.names import PathLike, remove_settled, sweep, temp_path
from napari_pvs.atomic.replace import commit


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
        remove_settled(temp)
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

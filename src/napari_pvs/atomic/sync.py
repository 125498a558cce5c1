"""fsync of files and folders, so a rename never publishes bytes still in the page cache."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from napari_pvs.atomic.names import PathLike


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

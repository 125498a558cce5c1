"""One write discipline for every file and store the package writes.

Everything is written under a temporary name beside its target, fsynced, then renamed into
place, so a killed process leaves either the old output or the new one under the final name,
never a truncated file. Before long work starts, :func:`check_output` refuses an output that is
one of the command's inputs (or inside one, or holds one), an existing output without
``overwrite``, and a folder that cannot be written. :func:`hold_lock` keeps a second process
from writing what another one is writing. No Qt, no torch: the core and every adapter use it.

Modules: ``checks`` (before any work), ``names`` (temporaries and sweeping them), ``sync``
(fsync), ``replace`` (rename, folder exchange, contents swap of a mount point, restore),
``output`` (:func:`atomic_output` and the small-file forms), ``errors`` (one sentence for a
refused write), ``locks`` (:func:`hold_lock`).
"""

from napari_pvs.atomic.checks import check_output, check_writable_folder, overlaps
from napari_pvs.atomic.errors import OutputError, os_error_message, write_error
from napari_pvs.atomic.locks import LOCK_NAME, HeldLock, Locked, hold_lock, os_user
from napari_pvs.atomic.names import (
    OLD_MARK,
    SWAP_MARK,
    TEMP_MARK,
    remove_path,
    sweep,
    sweep_folder,
    temp_path,
)
from napari_pvs.atomic.output import atomic_output, write_bytes, write_json, write_text
from napari_pvs.atomic.replace import commit, restore_interrupted, settle_contents, swap_contents
from napari_pvs.atomic.sync import fsync_files, fsync_folder, fsync_path, sync_files

__all__ = [
    "LOCK_NAME", "OLD_MARK", "SWAP_MARK", "TEMP_MARK", "HeldLock", "Locked", "OutputError",
    "atomic_output", "check_output", "check_writable_folder", "commit", "fsync_files",
    "fsync_folder", "fsync_path", "hold_lock", "os_error_message", "os_user", "overlaps",
    "remove_path",
    "restore_interrupted", "settle_contents", "swap_contents", "sweep", "sweep_folder",
    "sync_files", "temp_path", "write_bytes", "write_error", "write_json", "write_text",
]

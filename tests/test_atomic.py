"""The one write discipline: checks before work, temporary sibling + fsync + rename, locks.

Kill tests run the writer in a subprocess, stop it with SIGKILL in the middle of a write (it
signals when it is there) and check that the old file or store is still whole.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

import napari_pvs
from napari_pvs import atomic

#: Children run the very package this test imported.
SRC = str(Path(napari_pvs.__file__).resolve().parents[1])


def start_child(code: str, *args: str) -> subprocess.Popen:
    """Run ``code`` in a fresh interpreter; it prints 'ready' when it is mid-write."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_WAIT_POLICY": "PASSIVE"}
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = child.stdout.readline().strip()
    if line != "ready":
        child.kill()
        raise AssertionError(f"child did not get ready: {line!r} {child.stderr.read()}")
    return child


def kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(atomic.TEMP_MARK))


# ------------------------------------------------------------------------------- checks


def test_check_output_refuses_inputs_existing_outputs_and_unwritable_folders(tmp_path):
    image = tmp_path / "in.zarr"
    image.mkdir()
    (image / "labels").mkdir()
    for target in (image, image / "labels" / "pvs", tmp_path):
        with pytest.raises(ValueError, match="refusing to write onto an input"):
            atomic.check_output(target, inputs=[image], overwrite=True)
    link = tmp_path / "link.zarr"
    link.symlink_to(image)
    with pytest.raises(ValueError, match="input"):
        atomic.check_output(link, inputs=[image], overwrite=True)

    existing = tmp_path / "out.nii.gz"
    existing.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        atomic.check_output(existing)
    assert atomic.check_output(existing, overwrite=True) == existing
    with pytest.raises(FileExistsError, match="is a folder"):
        atomic.check_output(image, overwrite=True, kind="file")

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        atomic.check_output(blocker / "sub" / "out.zarr")
    # a folder that does not exist yet is fine when it can be created
    assert atomic.check_output(tmp_path / "new" / "deeper" / "out.json")
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_refused_before_any_work(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="cannot write in"):
            atomic.check_output(folder / "out.zarr")
    finally:
        folder.chmod(0o755)


# ------------------------------------------------------------------------------- writes


def test_file_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "table.csv"
    atomic.write_text(target, "old")
    with pytest.raises(FileExistsError):
        atomic.write_text(target, "new")
    with pytest.raises(RuntimeError, match="boom"), atomic.atomic_output(
        target, overwrite=True
    ) as temp:
        temp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old" and leftovers(tmp_path) == []
    atomic.write_text(target, "new", overwrite=True)
    assert target.read_text() == "new"
    atomic.write_json(tmp_path / "sub" / "m.json", {"a": 1})  # missing folder is created
    assert json.loads((tmp_path / "sub" / "m.json").read_text()) == {"a": 1}


def _store(path: Path, value: int) -> Path:
    group = zarr.open_group(str(path), mode="w")
    group.create_array("a", data=np.full((8, 8), value, np.uint8), chunks=(4, 4))
    return path


@pytest.mark.parametrize("swap", [True, False], ids=["exchange", "two-renames"])
def test_directory_store_is_swapped_whole(tmp_path, monkeypatch, swap):
    if not swap:
        monkeypatch.setattr(atomic.replace, "exchange", lambda a, b: False)
    target = _store(tmp_path / "s.zarr", 1)
    with pytest.raises(KeyError), atomic.atomic_output(target, overwrite=True) as temp:
        _store(temp, 2)
        raise KeyError("failed half-way")
    assert zarr.open_group(str(target))["a"][0, 0] == 1
    with atomic.atomic_output(target, overwrite=True) as temp:
        _store(temp, 2)
    assert zarr.open_group(str(target))["a"][...].min() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_store_moved_aside_by_a_killed_replacement_is_put_back(tmp_path):
    # the two-rename fallback's one window: old store renamed aside, new one not yet in place
    target = tmp_path / "s.zarr"
    aside = _store(tmp_path / f"{atomic.OLD_MARK}0123456789ab-s.zarr", 7)
    assert not target.exists()
    atomic.check_output(target, overwrite=True)  # every write checks first, and restores
    assert not aside.exists() and zarr.open_group(str(target))["a"][0, 0] == 7


def test_disk_errors_become_one_sentence_and_keep_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "m.json"
    atomic.write_text(target, "old")

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(atomic.OutputError) as caught:
        atomic.write_text(target, "new", overwrite=True)
    assert str(caught.value) == (
        f"could not write {target}: no space left on the device; free some space or choose "
        "another folder (the existing m.json is unchanged)"
    )
    monkeypatch.undo()
    assert target.read_text() == "old" and leftovers(tmp_path) == []
    safetensors_text = RuntimeError("I/O error: No space left on device (os error 28)")
    assert "no space left" in atomic.os_error_message(safetensors_text, "x")
    assert atomic.os_error_message(ValueError("bad value")) is None


# ------------------------------------------------------------------------------- kill -9

WRITER = """
import sys, time
from pathlib import Path
import numpy as np, zarr
from napari_pvs import atomic
target, kind = Path(sys.argv[1]), sys.argv[2]
with atomic.atomic_output(target, overwrite=True) as temp:
    if kind == "file":
        with open(temp, "wb") as handle:
            handle.write(b"n" * 1000)
            handle.flush()
            print("ready", flush=True)
            time.sleep(60)
    else:
        group = zarr.open_group(str(temp), mode="w")
        array = group.create_array("a", shape=(8, 8), chunks=(4, 4), dtype="uint8")
        array[:4] = 9
        print("ready", flush=True)
        time.sleep(60)
"""


def test_kill_during_file_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "seg.nii.gz"
    target.write_bytes(b"the old, whole file")
    kill(start_child(WRITER, str(target), "file"))
    assert target.read_bytes() == b"the old, whole file"
    assert len(leftovers(tmp_path)) == 1  # the dead writer's temporary file...
    atomic.write_bytes(target, b"new", overwrite=True)
    assert leftovers(tmp_path) == []  # ...is swept by the next write of the same target
    assert target.read_bytes() == b"new"


def test_kill_during_store_write_keeps_the_old_store(tmp_path):
    target = _store(tmp_path / "s.zarr", 1)
    kill(start_child(WRITER, str(target), "store"))
    np.testing.assert_array_equal(zarr.open_group(str(target))["a"][...], np.ones((8, 8)))


# ------------------------------------------------------------------------------- locks

HOLDER = """
import sys, time
from napari_pvs import atomic
with atomic.hold_lock(sys.argv[1], "the store"):
    print("ready", flush=True)
    time.sleep(60)
"""


def test_lock_refuses_a_second_writer_and_is_taken_over_after_a_kill(tmp_path):
    lock = tmp_path / atomic.LOCK_NAME
    child = start_child(HOLDER, str(lock))
    try:
        message = f"the store is being written by process {child.pid}"
        with pytest.raises(atomic.Locked, match=message), atomic.hold_lock(lock, "the store"):
            pass
    finally:
        kill(child)
    assert json.loads(lock.read_text())["pid"] == child.pid  # a killed holder leaves its record
    with atomic.hold_lock(lock, "the store") as held:
        assert held.record["pid"] == os.getpid()
        assert held.record["took_over"]["pid"] == child.pid
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(atomic.Locked), atomic.hold_lock(lock, "the store"):  # one process
            pass
    assert not lock.exists()  # released: removed


# ------------------------------------------------------------------------------- mount points


def _tree(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def _contents(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()
    }


OLD_TREE = {"a.txt": "old a", "b.txt": "old b", "sub/c.txt": "old c"}
NEW_TREE = {"x.txt": "new x", "y.txt": "new y", "sub/d.txt": "new d", "z.txt": "new z"}


def test_a_folder_that_cannot_be_moved_gets_its_contents_swapped(tmp_path, monkeypatch):
    # A mount point: renameat2 and rename both answer EBUSY (simulated: mounting needs root).
    def busy(a, b):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(b))

    monkeypatch.setattr(atomic.replace, "exchange", busy)
    target = _tree(tmp_path / "mnt", OLD_TREE)
    with atomic.atomic_output(target, overwrite=True) as temp:
        _tree(temp, NEW_TREE)
    assert target.is_dir() and _contents(target) == NEW_TREE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]  # no temporary left anywhere


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    try:
        return subprocess.run(command, capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.fixture
def mount_point(tmp_path):
    """A real mount point (a small tmpfs); skipped where mounting needs privileges we lack."""
    folder = tmp_path / "mnt"
    if not _mount_tmpfs(folder, "1m"):
        pytest.skip("mounting a tmpfs needs root")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_init_onto_a_real_mount_point_keeps_the_mount_and_swaps_the_contents(mount_point):
    target = _tree(mount_point, {"old.txt": "old"})
    with atomic.atomic_output(target, overwrite=True) as temp:
        _tree(temp, NEW_TREE)
    assert os.path.ismount(target) and _contents(target) == NEW_TREE


def test_a_full_disk_during_a_contents_swap_is_one_sentence_and_keeps_the_old(mount_point):
    target = _tree(mount_point, OLD_TREE)
    with pytest.raises(atomic.OutputError) as caught, atomic.atomic_output(
        target, overwrite=True
    ) as temp:
        _tree(temp, {"small.txt": "s"})
        (temp / "big.bin").write_bytes(os.urandom(2 * 1024 * 1024))  # the tmpfs holds 1 MB
    assert "no space left on the device" in str(caught.value)
    assert f"the existing {target.name} is unchanged" in str(caught.value)
    assert _contents(target) == OLD_TREE
    assert [p.name for p in target.iterdir() if p.name.startswith(atomic.SWAP_MARK)] == []


def test_sqlite_disk_errors_are_one_sentence():
    import sqlite3

    full = sqlite3.OperationalError("database or disk is full")
    assert "no space left on the device" in atomic.os_error_message(full, "ledger.sqlite")
    readonly = sqlite3.OperationalError("attempt to write a readonly database")
    assert "read-only" in atomic.os_error_message(readonly, "ledger.sqlite")


SWAPPER = """
import os, shutil, sys, time
from pathlib import Path
from napari_pvs import atomic
new, target, stage = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
real_replace, real_copy = os.replace, shutil.copy2

def pause():
    print("ready", flush=True)
    time.sleep(60)

def replace(src, dst):
    real_replace(src, dst)
    if stage == "moving-old" and Path(dst).parent.name.endswith("-old"):
        pause()
    if stage == "moving-new" and Path(src).parent.name.endswith("-commit"):
        pause()

def copy(src, dst, **kwargs):
    real_copy(src, dst, **kwargs)
    if stage == "copying":
        pause()

os.replace, shutil.copy2 = replace, copy
atomic.swap_contents(new, target)
"""


@pytest.mark.parametrize(
    ("stage", "survivor"),
    [("copying", OLD_TREE), ("moving-old", OLD_TREE), ("moving-new", NEW_TREE)],
)
def test_kill_during_a_contents_swap_leaves_old_or_new_whole(tmp_path, stage, survivor):
    target = _tree(tmp_path / "mnt", OLD_TREE)
    new = _tree(tmp_path / "new", NEW_TREE)
    kill(start_child(SWAPPER, str(new), str(target), stage))
    assert _contents(target) not in (OLD_TREE, NEW_TREE)  # caught half-way: a mix on disk...
    atomic.check_output(target, overwrite=True)  # ...which the next write's check settles
    assert _contents(target) == survivor
    assert [p.name for p in target.iterdir() if p.name.startswith(atomic.SWAP_MARK)] == []

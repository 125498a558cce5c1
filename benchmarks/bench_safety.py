"""Replay every case of issues 11 and 20 against the real CLI and API, and print a table.

Each case runs what a careful user, an unlucky machine or a hostile file would do: commands in
subprocesses (``python -m napari_pvs.cli``), ``kill -9`` in the middle of each kind of write
(NIfTI, OME-Zarr, checkpoint, prediction store, CSV), a full disk (a 2 MB tmpfs, mounted when
running as root; otherwise the row says SKIP), read-only folders, damaged and hostile files.
For each it checks what is left on disk against a fingerprint taken before. The table has one
row per case: what happened, whether anything the user had was lost, whether a traceback was
printed, and the peak memory of the commands the case ran (each child's own peak RSS, from
``wait4``; "-" where the case ran nothing measured). A row fails when it lost anything, printed a
traceback, peaked above 1.5 GB, or its outcome starts with FAIL (the behaviour the issue asks for
is missing: a refusal that did not come, a sentence that did not come).

Usage: nice -n 10 python benchmarks/bench_safety.py [--keep] [--only TEXT]
       (about 3-5 min on 2 busy cores for the issue-11 rows; --only i20 runs the issue-20 rows)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import zarr
from safetensors.torch import save_file

import napari_pvs
from napari_pvs import atomic, io
from napari_pvs.models import build_model
from napari_pvs.models.checkpoint import METADATA_KEY, read_checkpoint, save_checkpoint

PACKAGE_ROOT = str(Path(napari_pvs.__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": PACKAGE_ROOT, "OMP_WAIT_POLICY": "PASSIVE"}
PREDICT = ["--device", "cpu", "--window", "16", "--batch", "2"]
TINY = {"channels": [4, 8], "num_res_units": 1, "feature_channels": 4}

ROWS: list[tuple[str, str, str, str, str]] = []  # case, outcome, lost, traceback, peak
#: Peak RSS (bytes) of every child the running case waited for.
PEAKS: list[int] = []
PEAK_LIMIT = 1.5 * 2**30


# ------------------------------------------------------------------------------ helpers


def fingerprint(path: Path) -> str:
    """sha256 over every file (name and bytes) under ``path``; 'missing' if there is none.

    Left out: temporary files of a killed write and a killed run's lock record, which the next
    write sweeps or takes over (they are not the user's data; rows report them).
    """
    if not path.exists():
        return "missing"
    digest = hashlib.sha256()

    def ours(p: Path) -> bool:
        return p.name == atomic.LOCK_NAME or any(
            part.startswith(atomic.TEMP_MARK) for part in p.relative_to(path).parts
        )

    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and not ours(p))
    for file in files:
        digest.update(str(file.relative_to(path.parent)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


#: Highest ``VmHWM`` seen so far of each running child, by pid.
_HWM: dict[int, int] = {}


def sample(process: subprocess.Popen) -> None:
    """Note the child's peak RSS so far (``VmHWM``: reset by exec, so the child's own; the
    ``ru_maxrss`` of ``wait4`` would start from this harness's size at fork)."""
    try:
        with open(f"/proc/{process.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    value = int(line.split()[1]) * 1024
                    _HWM[process.pid] = max(value, _HWM.get(process.pid, 0))
                    return
    except (OSError, ValueError):
        return


def reap(process: subprocess.Popen) -> int:
    """Wait for ``process``, sampling its peak RSS every 20 ms into :data:`PEAKS` (growth in
    its last 20 ms can be missed)."""
    while process.returncode is None:
        sample(process)
        pid, status = os.waitpid(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
        else:
            time.sleep(0.02)
    if process.pid in _HWM:
        PEAKS.append(_HWM.pop(process.pid))
    return process.returncode


def measured(command: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``command``; its peak RSS is recorded, and a timeout is an exit code, not an error
    (exit -9: the case hung and was killed)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=ENV)
        timer = __import__("threading").Timer(timeout, process.kill)
        timer.start()
        try:
            code = reap(process)
        finally:
            timer.cancel()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(command, code, out.read(), err.read())


def cli(*args: str, timeout: float = 600, slow_fsync: float = 0.0) -> subprocess.CompletedProcess:
    """Run ``napari-pvs ARGS`` in a fresh interpreter (optionally with a slow disk)."""
    code = "import sys\n"
    if slow_fsync:
        code += (
            "import os, time\n_fsync = os.fsync\n"
            f"os.fsync = lambda fd: (time.sleep({slow_fsync}), _fsync(fd))[1]\n"
        )
    code += "from napari_pvs.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return measured([sys.executable, "-c", code, *args], timeout)


def py(code: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run Python ``code`` in a fresh interpreter, measured like :func:`cli`."""
    return measured([sys.executable, "-c", textwrap.dedent(code), *args], timeout)


def start_cli(*args: str, slow_fsync: float = 0.0) -> subprocess.Popen:
    code = "import sys\n"
    if slow_fsync:
        code += (
            "import os, time\n_fsync = os.fsync\n"
            f"os.fsync = lambda fd: (time.sleep({slow_fsync}), _fsync(fd))[1]\n"
        )
    code += "from napari_pvs.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def said(result: subprocess.CompletedProcess | tuple[int, str]) -> str:
    """'exit N: <the error or warning line>' (shortened); flags a traceback loudly."""
    rc, err = (result.returncode, result.stderr) if hasattr(result, "stderr") else result
    if "Traceback" in err:
        return f"exit {rc}: TRACEBACK {err.strip().splitlines()[-1][:80]}"
    lines = [line for line in err.strip().splitlines() if "napari-pvs" in line]
    line = lines[-1] if lines else ""
    for marker in (": error: ", ": warning: "):
        if marker in line:
            line = line.split(marker, 1)[1]
            break
    line = line.replace(str(WORK), "")
    return f"exit {rc}" + (f": {line[:88]}" + ("..." if len(line) > 88 else "") if line else "")


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], limit: float = 120) -> bool:
    """SIGKILL ``process`` as soon as ``ready()``; False if it finished first."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        sample(process)
        if process.poll() is not None:
            reap(process)  # records its peak
            return False
        if ready():
            process.send_signal(signal.SIGKILL)
            reap(process)
            return True
        time.sleep(0.005)
    process.kill()
    reap(process)
    return True


def temp_beside(target: Path) -> bool:
    return any(
        p.name.startswith(atomic.TEMP_MARK) and p.name.endswith(target.name)
        for p in target.parent.iterdir()
    )


def lost(before: dict[Path, str], extra: str = "") -> str:
    gone = [p.name for p, digest in before.items() if fingerprint(p) != digest]
    return ("YES: " + ", ".join(gone) + (f"; {extra}" if extra else "")) if gone else "no"


def row(case: str) -> Callable:
    """Register a case; its exceptions become a row too (so the table is always complete)."""

    def wrap(function: Callable[[], tuple[str, str]]) -> Callable:
        def run() -> None:
            PEAKS.clear()
            try:
                outcome, loss = function()
            except Exception as exc:  # the harness itself failed: say so in the row
                outcome, loss = f"HARNESS ERROR {type(exc).__name__}: {exc}"[:100], "?"
            traceback = "yes" if "TRACEBACK" in outcome else "no"
            peak = f"{max(PEAKS) / 2**20:.0f} MB" if PEAKS else "-"
            if PEAKS and max(PEAKS) > PEAK_LIMIT:
                peak += " (over 1.5 GB)"
            ROWS.append((case, outcome, loss, traceback, peak))
            print(f"  {case}: {outcome} | lost: {loss} | traceback: {traceback} | peak {peak}",
                  flush=True)  # fmt: skip

        CASES.append((case, run))
        return run

    return wrap


CASES: list[tuple[str, Callable[[], None]]] = []


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """Mount a tmpfs at ``folder`` (root only); yields False when mounting is not permitted."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True
    )
    try:
        yield mounted.returncode == 0
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


# ------------------------------------------------------------------------------ fixtures

WORK = Path(tempfile.mkdtemp(prefix="bench-safety-"))


def noisy(shape, seed=0) -> np.ndarray:
    volume = np.random.default_rng(seed).normal(100.0, 20.0, shape).astype(np.float32)
    volume[:, :2] = 0
    return volume


def pvs(shape) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    labels[shape[0] // 4 : shape[0] // 2, shape[1] // 2, shape[2] // 2] = 1
    return labels


def setup() -> dict[str, Path]:
    import torch

    torch.manual_seed(0)
    paths = {"ckpt": save_checkpoint(build_model("unet", **TINY), WORK / "tiny.safetensors")}
    shape = (24, 28, 20)
    paths["scan"] = io.save_nifti(WORK / "scan_T2w.nii.gz", noisy(shape), np.diag([2, 2, 2, 1.0]))
    paths["image"] = io.save_ome_zarr(
        WORK / "image_T2w.zarr", noisy(shape), labels={"pvs": pvs(shape)}, levels=1
    )
    big = noisy((160, 160, 128), seed=3)
    paths["big_nii"] = io.save_nifti(WORK / "big.nii", big, np.eye(4))
    paths["big_gz"] = io.save_nifti(WORK / "big.nii.gz", big, np.eye(4))
    paths["mid_nii"] = io.save_nifti(WORK / "mid_T2w.nii", noisy((96, 96, 96), 4), np.eye(4))
    return paths


# ------------------------------------------------------------------------------ data lost


def cases(p: dict[str, Path]) -> None:
    ckpt = str(p["ckpt"])

    @row("predict scan.nii.gz --out scan.nii.gz")
    def _():
        before = {p["scan"]: fingerprint(p["scan"])}
        result = cli("predict", str(p["scan"]), "--out", str(p["scan"]), "--model", ckpt, *PREDICT)
        return said(result), lost(before)

    @row("predict --out existing.nii.gz (no --overwrite)")
    def _():
        existing = WORK / "existing.nii.gz"
        shutil.copy(p["scan"], existing)
        before = {existing: fingerprint(existing)}
        result = cli("predict", str(p["scan"]), "--out", str(existing), "--model", ckpt, *PREDICT)
        return said(result), lost(before)

    for command in ("predict", "frangi"):

        @row(f"{command} in.zarr --out in.zarr --overwrite")
        def _(command=command):
            before = {p["image"]: fingerprint(p["image"])}
            extra = ["--model", ckpt, *PREDICT] if command == "predict" else ["--modality", "T2"]
            result = cli(command, str(p["image"]), "--out", str(p["image"]), "--overwrite", *extra)
            return said(result), lost(before)

    train = [
        "train", "--images", str(p["image"]), "--model", "unet", "--config", json.dumps(TINY),
        "--epochs", "1", "--steps-per-epoch", "2", "--patch", "16", "--device", "cpu",
    ]  # fmt: skip

    @row("train --out an existing checkpoint")
    def _():
        out = WORK / "existing.safetensors"
        shutil.copy(p["ckpt"], out)
        before = {out: fingerprint(out)}
        return said(cli(*train, "--out", str(out))), lost(before)

    @row("train --out a read-only folder (before epoch 1?)")
    def _():
        with tmpfs(WORK / "ro", "ro,size=1m") as ok:
            if not ok:
                return "SKIP: mounting a read-only tmpfs needs root", "no"
            started = time.monotonic()
            result = cli(*train, "--out", str(WORK / "ro" / "m.safetensors"))
            took = time.monotonic() - started
            epoch = "epoch" in result.stdout + result.stderr
        return f"{said(result)} ({'after' if epoch else 'before'} epoch 1, {took:.1f} s)", "no"

    @row("convert --overwrite with a failing conversion")
    def _():
        out = WORK / "converted.zarr"
        cli("convert", str(p["scan"]), str(out), "--levels", "1")
        raw = p["big_gz"].read_bytes()
        truncated = WORK / "truncated.nii.gz"
        truncated.write_bytes(raw[: len(raw) // 2])
        before = {out: fingerprint(out)}
        result = cli("convert", str(truncated), str(out), "--overwrite", "--levels", "1")
        return said(result), lost(before)

    @row("kill -9 during a NIfTI write (io.save_nifti)")
    def _():
        target = WORK / "big_seg.nii.gz"
        shutil.copy(p["big_gz"], target)
        before = {target: fingerprint(target)}
        code = textwrap.dedent(
            f"""
            import numpy as np
            from napari_pvs import io
            data = np.random.default_rng(9).normal(0, 1, (160, 160, 128)).astype(np.float32)
            io.save_nifti({str(target)!r}, data, np.eye(4), overwrite=True)
            """
        )
        child = subprocess.Popen([sys.executable, "-c", code], env=ENV, stderr=subprocess.PIPE)
        killed = kill_when(child, lambda: temp_beside(target))
        loadable = io.open_volume(target).shape == (160, 160, 128)
        return f"killed mid-write: {killed}; old file loads: {loadable}", lost(before)

    @row("kill -9 during a labels save (NIfTI, same path)")
    def _():
        target = WORK / "labels.nii.gz"
        io.save_nifti(target, pvs((160, 160, 128)), np.eye(4))
        before = {target: fingerprint(target)}
        code = textwrap.dedent(
            f"""
            import numpy as np
            from napari_pvs import _writer
            labels = (np.random.default_rng(2).random((160, 160, 128)) > 0.5).astype(np.uint8)
            _writer.save_labels({str(target)!r}, labels, {{"name": "pvs", "metadata": {{}}}})
            """
        )
        child = subprocess.Popen([sys.executable, "-c", code], env=ENV, stderr=subprocess.PIPE)
        killed = kill_when(child, lambda: temp_beside(target))
        return f"killed mid-write: {killed}", lost(before)

    @row("kill -9 during an OME-Zarr write (convert --overwrite)")
    def _():
        out = WORK / "big.zarr"
        cli("convert", str(p["scan"]), str(out), "--levels", "1")
        before = {out: fingerprint(out)}
        child = start_cli("convert", str(p["big_nii"]), str(out), "--overwrite", "--chunks", "32")
        killed = kill_when(child, lambda: temp_beside(out))
        return f"killed mid-write: {killed}; store opens: {bool(io.open_volume(out).shape)}", lost(
            before
        )

    @row("kill -9 during OME-Zarr labels write (napari writer)")
    def _():
        store = io.save_ome_zarr(
            WORK / "labelled.zarr", noisy((96, 96, 96)), labels={"pvs": pvs((96, 96, 96))}
        )
        before = {store: fingerprint(store)}
        code = textwrap.dedent(
            f"""
            import os, time
            _fsync = os.fsync
            os.fsync = lambda fd: (time.sleep(0.05), _fsync(fd))[1]
            import numpy as np
            from napari_pvs import _writer
            labels = (np.random.default_rng(2).random((96, 96, 96)) > 0.5).astype(np.uint8)
            _writer.save_labels({str(store)!r}, labels, {{"name": "pvs", "metadata": {{}}}})
            """
        )
        child = subprocess.Popen([sys.executable, "-c", code], env=ENV, stderr=subprocess.PIPE)
        killed = kill_when(child, lambda: temp_beside(store / "labels" / "pvs"))
        same = np.array_equal(io.open_labels(store, "pvs").data.compute(), pvs((96, 96, 96)))
        return f"killed mid-write: {killed}; old labels read back: {same}", lost(before)

    @row("kill -9 during a checkpoint write (train --overwrite)")
    def _():
        out = WORK / "trained.safetensors"
        shutil.copy(p["ckpt"], out)
        before = {out: fingerprint(out)}
        child = start_cli(*train, "--out", str(out), "--overwrite", slow_fsync=0.5)
        staged = out.with_name("trained.overwrite.safetensors")
        killed = kill_when(child, lambda: temp_beside(staged) or temp_beside(out))
        loads = read_checkpoint(out)[1]["model"]["name"] == "unet"
        return f"killed mid-write: {killed}; old checkpoint verifies: {loads}", lost(before)

    @row("kill -9 during a prediction store write, then rerun")
    def _():
        out = WORK / "resumed.zarr"
        args = ["predict", str(p["mid_nii"]), "--out", str(out), "--model", ckpt, *PREDICT]
        child = start_cli(*args)
        done = out / "_chunks_done" / "c"

        def some_done() -> bool:
            return done.exists() and sum(1 for f in done.rglob("*") if f.is_file()) >= 3

        killed = kill_when(child, some_done)
        lock = (out / "_chunks_done" / atomic.LOCK_NAME).exists()
        rerun = cli(*args)
        clean = WORK / "clean.zarr"
        cli("predict", str(p["mid_nii"]), "--out", str(clean), "--model", ckpt, *PREDICT)
        same = all(
            np.array_equal(zarr.open_group(str(out))[n][...], zarr.open_group(str(clean))[n][...])
            for n in ("probability", "segmentation")
        )
        return (
            f"killed: {killed}, stale lock left: {lock}; rerun {said(rerun)}, equals clean: {same}",
            "no" if same else "YES: store differs from a clean run",
        )

    @row("kill -9 during a CSV write (rank --overwrite)")
    def _():
        store = WORK / "clean.zarr"
        if not store.exists():
            cli("predict", str(p["image"]), "--out", str(store), "--model", ckpt, *PREDICT)
        cli("rank", str(store), "--n", "3", "--patch", "8", "--strategy", "random")
        table = WORK / "clean.ranking-random.csv"
        before = {table: fingerprint(table), table.with_suffix(".json"): fingerprint(
            table.with_suffix(".json"))}  # fmt: skip
        child = start_cli(
            "rank", str(store), "--n", "5", "--patch", "8", "--strategy", "random", "--seed", "1",
            "--overwrite", slow_fsync=0.5,
        )  # fmt: skip
        killed = kill_when(child, lambda: temp_beside(table) or temp_beside(table.with_suffix(
            ".json")))  # fmt: skip
        return f"killed mid-write: {killed}", lost(before)

    @row("cohort predict: 1 damaged volume among 3")
    def _():
        inputs = []
        for i in range(3):
            inputs.append(
                io.save_ome_zarr(WORK / f"sub-{i}_T2w.zarr", noisy((20, 24, 18), i), levels=1,
                                 chunks=8)
            )
        chunk = next(f for f in sorted((inputs[1] / "0").rglob("*")) if f.is_file()
                     and "." not in f.name)  # fmt: skip
        data = bytearray(chunk.read_bytes())
        data[4:24] = b"x" * 20
        chunk.write_bytes(bytes(data))
        out = WORK / "cohort"
        result = cli("predict", *map(str, inputs), "--out", str(out), "--model", ckpt, *PREDICT,
                     "--workers", "1")  # fmt: skip
        written = [
            i
            for i in range(3)
            if (out / f"sub-{i}_T2w.zarr").exists()
            and zarr.open_group(str(out / f"sub-{i}_T2w.zarr")).attrs["napari_pvs"]["complete"]
        ]
        listed = "1 of 3 volume(s) failed" in result.stderr
        return (
            f"exit {result.returncode}; complete: {written}; failure listed last: {listed}",
            "no" if written == [0, 2] else "YES: good volumes not written",
        )

    @row("predict --overwrite started during another run")
    def _():
        out = WORK / "two_runs.zarr"
        args = ["predict", str(p["big_nii"]), "--out", str(out), "--model", ckpt, *PREDICT]
        first = start_cli(*args, "--window", "8")
        lock = out / "_chunks_done" / atomic.LOCK_NAME
        deadline = time.monotonic() + 120
        while not lock.exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        second = cli(*args, "--overwrite", "--mc", "2")
        first.send_signal(signal.SIGKILL)
        first.wait()
        return said(second) + " (the first run kept going)", "no"

    @row("--float32 run, then --overwrite with other settings")
    def _():
        out = WORK / "settings.zarr"
        base = ["predict", str(p["mid_nii"]), "--out", str(out), "--model", ckpt, *PREDICT]
        cli(*base, "--float32")
        before = {out: fingerprint(out)}
        child = start_cli(*base, "--overwrite", "--mc", "2")
        staged = out.with_name(f"{atomic.TEMP_MARK}overwrite-{out.name}")
        killed = kill_when(child, lambda: (staged / "_chunks_done" / "c").exists())  # half-way
        kept = lost(before)
        rerun = cli(*base, "--overwrite", "--mc", "2")
        clean = WORK / "settings_clean.zarr"
        cli("predict", str(p["mid_nii"]), "--out", str(clean), "--model", ckpt, *PREDICT, "--mc",
            "2")  # fmt: skip
        same = all(
            np.array_equal(zarr.open_group(str(out))[n][...], zarr.open_group(str(clean))[n][...])
            for n in ("probability", "segmentation", "entropy")
        )
        return (
            f"killed overwrite: {killed}, old store kept whole: {kept == 'no'}; rerun "
            f"{said(rerun)}; equals a clean run: {same}",
            kept if same else "YES: mixed store",
        )

    # -------------------------------------------------------------------------- silently wrong

    @row("evaluate: half-unlabelled (255) ground truth")
    def _():
        shape = (24, 28, 20)
        gt = pvs(shape)  # PVS along x = 10, kept; a third of the volume not labelled
        gt[:, :, 13:] = 255
        pred = (gt == 1).astype(np.uint8)
        gt_path = io.save_nifti(WORK / "gt255.nii.gz", gt, np.eye(4))
        pred_path = io.save_nifti(WORK / "pred255.nii.gz", pred, np.eye(4))
        out = WORK / "m255.json"
        result = cli("evaluate", str(pred_path), str(gt_path), "--out", str(out))
        dice = json.loads(out.read_text())["dice"] if out.exists() else None
        from napari_pvs.metrics import evaluate

        as_before = evaluate(pred, (gt != 0).astype(np.uint8))["dice"]  # 255 counted as PVS
        return f"{said(result)}; Dice {dice} (the old scoring, 255 as PVS: {as_before:.3f})", "no"

    @row("train: labels 0/255 only")
    def _():
        shape = (24, 28, 20)
        only = np.where(pvs(shape) == 1, 255, 0).astype(np.uint8)
        store = io.save_ome_zarr(WORK / "only255.zarr", noisy(shape), labels={"pvs": only},
                                 levels=1)  # fmt: skip
        args = [*train, "--out", str(WORK / "m255.safetensors")]
        args[2] = str(store)
        return said(cli(*args)), "no"

    @row("train: PVS coded 2")
    def _():
        shape = (24, 28, 20)
        store = io.save_ome_zarr(WORK / "coded2.zarr", noisy(shape), levels=1)
        labels = WORK / "coded2_labels.nii.gz"  # written by another tool
        io.save_nifti(labels, pvs(shape) * 2, np.eye(4))
        args = [*train, "--labels", str(labels), "--out", str(WORK / "m2.safetensors")]
        args[2] = str(store)
        return said(cli(*args)), "no"

    tensors, meta = read_checkpoint(p["ckpt"])

    def hostile(name: str, text: str) -> Path:
        path = WORK / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={METADATA_KEY: text})
        return path

    @row("checkpoint with min_cluster_mm3: 1e308")
    def _():
        bad = json.loads(json.dumps(meta))
        bad["segmentation"]["min_cluster_mm3"] = 1e308
        path = hostile("rule", json.dumps(bad))
        return said(cli("predict", str(p["scan"]), "--out", str(WORK / "r.zarr"), "--model",
                        str(path), *PREDICT)), "no"  # fmt: skip

    # -------------------------------------------------------------------------- tracebacks

    @row("evaluate a store with a corrupted zstd chunk")
    def _():
        store = io.save_ome_zarr(WORK / "zstd.zarr", noisy((24, 28, 20)), levels=1,
                                 ome_version="0.5")  # fmt: skip
        chunk = next(f for f in sorted((store / "0").rglob("*")) if f.is_file()
                     and f.name != "zarr.json")  # fmt: skip
        data = bytearray(chunk.read_bytes())
        data[4:24] = b"x" * 20
        chunk.write_bytes(bytes(data))
        return said(cli("evaluate", str(store), str(p["image"]), "--out",
                        str(WORK / "z.json"))), "no"  # fmt: skip

    @row("predict a truncated .nii.gz")
    def _():
        raw = p["scan"].read_bytes()
        cut = WORK / "cut_T2w.nii.gz"
        cut.write_bytes(raw[: len(raw) * 2 // 3])
        return said(cli("predict", str(cut), "--out", str(WORK / "cut.zarr"), "--model", ckpt,
                        *PREDICT)), "no"  # fmt: skip

    for index, (name, text) in enumerate((
        ("metadata a JSON list", json.dumps([meta])),
        ("metadata nested 200k deep", "[" * 200_000 + "]" * 200_000),
        ('format_version: "abc"', json.dumps({**meta, "format_version": "abc"})),
    )):

        @row(f"checkpoint {name}")
        def _(index=index, text=text):
            path = hostile(f"hostile-{index}", text)
            return said(cli("predict", str(p["scan"]), "--out", str(WORK / "h.zarr"),
                            "--model", str(path), *PREDICT)), "no"  # fmt: skip

    # -------------------------------------------------------------------------- checkpoints

    @row("checkpoint declaring 32768 channels")
    def _():
        wide = json.loads(json.dumps(meta))
        wide["model"]["config"]["channels"] = [32768, 32768]
        path = hostile("wide", json.dumps(wide))
        code = (
            "import resource, sys\nfrom napari_pvs.models.checkpoint import load_checkpoint\n"
            "try:\n    load_checkpoint(sys.argv[1])\nexcept ValueError as e:\n"
            "    print('refused:', e)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, 'MB peak')\n"
        )
        result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                                text=True, env=ENV)  # fmt: skip
        lines = result.stdout.strip().splitlines()
        verdict = "refused" if lines and lines[0].startswith("refused") else "LOADED"
        peak = lines[-1] if lines else result.stderr[-80:]
        return f"{verdict}; {peak} (whole process, torch included)", "no"

    @row("checkpoint config naming a text_model path")
    def _():
        from napari_pvs.models.cross_modal import CrossModalPVSNet

        embeddings = np.random.default_rng(0).normal(size=(3, 8, 384)).astype(np.float32)
        model = CrossModalPVSNet(channels=[4, 8], graph_layers=1, k=4, heads=2,
                                 prompt_embeddings=embeddings)  # fmt: skip
        model.config["text_model"] = str(WORK / "not-a-model")
        path = save_checkpoint(model, WORK / "text.safetensors")
        code = textwrap.dedent(
            """
            import sys
            import transformers
            from napari_pvs.models import text
            calls = []
            def record(name):
                return lambda *a, **k: calls.append(name)
            text.encode_texts = text._encode_cached = record("napari-pvs text encoder")
            transformers.AutoModel.from_pretrained = record("AutoModel.from_pretrained")
            transformers.AutoTokenizer.from_pretrained = record("AutoTokenizer.from_pretrained")
            from napari_pvs.models.checkpoint import load_checkpoint
            load_checkpoint(sys.argv[1])
            print(f"loaded; text model loads: {len(calls)} {calls}")
            """
        )
        result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                                text=True, env=ENV)  # fmt: skip
        return (result.stdout.strip() or result.stderr.strip()[-80:]), "no"

    @row("OME-Zarr label name '../other.zarr/labels/pvs'")
    def _():
        store = io.save_ome_zarr(WORK / "names.zarr", noisy((24, 28, 20)),
                                 labels={"pvs": pvs((24, 28, 20))}, levels=1)  # fmt: skip
        zarr.open_group(str(store / "labels"), mode="r+").attrs["labels"] = [
            "../../image_T2w.zarr/labels/pvs"
        ]
        return said(cli("evaluate", str(p["image"]), str(store), "--out",
                        str(WORK / "n.json"))), "no"  # fmt: skip

    # -------------------------------------------------------------------------- own cases

    @row("disk full (2 MB tmpfs): convert --overwrite")
    def _():
        with tmpfs(WORK / "full1", "size=2m") as ok:
            if not ok:
                return "SKIP: mounting a tmpfs needs root", "no"
            out = WORK / "full1" / "out.zarr"
            cli("convert", str(p["scan"]), str(out), "--levels", "1")
            before = {out: fingerprint(out)}
            result = cli("convert", str(p["big_nii"]), str(out), "--overwrite", "--levels", "1")
            left = [q.name for q in out.parent.iterdir() if q.name.startswith(atomic.TEMP_MARK)]
            return f"{said(result)}; temp left: {left}", lost(before)

    @row("disk full (256 kB tmpfs): predict into a new store")
    def _():
        with tmpfs(WORK / "full2", "size=256k") as ok:
            if not ok:
                return "SKIP: mounting a tmpfs needs root", "no"
            out = WORK / "full2" / "p.zarr"
            result = cli("predict", str(p["mid_nii"]), "--out", str(out), "--model", ckpt,
                         *PREDICT)  # fmt: skip
            return said(result), "no"

    @row("disk full (tmpfs filled): evaluate --overwrite, phantom")
    def _():
        with tmpfs(WORK / "full3", "size=1m") as ok:
            if not ok:
                return "SKIP: mounting a tmpfs needs root", "no"
            folder = WORK / "full3"
            metrics = folder / "metrics.json"
            metrics.write_text('{"dice": 0.8}')
            with open(folder / "filler", "wb", buffering=0) as handle, contextlib.suppress(OSError):
                while True:  # leave no room at all
                    handle.write(b"\0" * 4096)
                    handle.flush()
            before = {metrics: fingerprint(metrics)}
            first = cli("evaluate", str(p["image"]), str(p["image"]), "--out", str(metrics),
                        "--overwrite")  # fmt: skip
            second = cli("phantom", str(folder / "ph.zarr"), "--shape", "24", "24", "24")
            left = [q.name for q in folder.iterdir() if q.name.startswith(atomic.TEMP_MARK)]
            return f"{said(first)} / phantom {said(second)}; temp left: {left}", lost(before)

    @row("read-only folder: convert / evaluate / predict")
    def _():
        with tmpfs(WORK / "ro2", "ro,size=1m") as ok:
            if not ok:
                return "SKIP: mounting a read-only tmpfs needs root", "no"
            ro = WORK / "ro2"
            results = [
                cli("convert", str(p["scan"]), str(ro / "c.zarr")),
                cli("evaluate", str(p["image"]), str(p["image"]), "--out", str(ro / "m.json")),
                cli("predict", str(p["scan"]), "--out", str(ro / "p.zarr"), "--model", ckpt,
                    *PREDICT),
            ]
            codes = [r.returncode for r in results]
            return f"exits {codes}; {said(results[-1])}", "no"


# ------------------------------------------------------------------------------ issue 20

_BASE: dict[str, Path] = {}


def base_project(p: dict[str, Path]) -> Path:
    """A project (tiny model) with volumes 'a' (#1) and 'b' (#2), 6 accepted patches, queues and
    predictions of v0; built once, copied by each case (volume files stay outside)."""
    if "project" in _BASE:
        return _BASE["project"]
    from napari_pvs.project import Project

    shape = (24, 28, 20)
    folder = WORK / "base_project"
    with Project.create(folder, model=p["ckpt"]) as project:
        project.update_settings(predict_mc=2)
        for index, name in enumerate(("a", "b")):
            scan = io.save_nifti(WORK / f"{name}.nii.gz", noisy(shape, 10 + index), np.eye(4))
            record = project.add_volume(scan)
            for k, x in enumerate((0, 8, 12)):
                start, stop = (4 * k, 8, x), (4 * k + 8, 16, x + 8)
                box = pvs(shape)[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]]
                project.accept(record.id, start, stop, box, annotator="bench")
            project.rank(record.id, n=3, patch=8, strategy="random")
    _BASE["project"] = folder
    return folder


def copy_project(p: dict[str, Path], name: str) -> Path:
    target = WORK / name
    shutil.copytree(base_project(p), target)
    return target


def refused(result: subprocess.CompletedProcess, wanted: str = "") -> bool:
    """The command stopped with a sentence (exit 2, no traceback), saying ``wanted``."""
    return (
        result.returncode == 2 and "Traceback" not in result.stderr and wanted in result.stderr
    )


def issue20_cases(p: dict[str, Path]) -> None:
    ckpt = str(p["ckpt"])

    # -------------------------------------------------------------------------- data lost

    for what in ("a folder of other files", "the project's volumes/", "the project's models/"):

        @row(f"i20 project export --out <{what}> --overwrite")
        def _(what=what):
            project = copy_project(p, f"export_{what.split()[-1].strip('/')}")
            if what == "a folder of other files":
                out = WORK / "my_results"
                out.mkdir()
                (out / "thesis.tex").write_text("years of work")
            else:
                out = project / what.split()[-1].strip("/")
            before = {out: fingerprint(out)}
            result = cli("project", "export", str(project), "--out", str(out), "--overwrite")
            verdict = "" if refused(result) else "FAIL: not refused; "
            return verdict + said(result), lost(before)

    @row("i20 volume file changed after add, then export")
    def _():
        project = copy_project(p, "changed")
        scan = WORK / "a.nii.gz"
        original = scan.read_bytes()
        io.save_nifti(scan, noisy((24, 28, 20), 99), np.diag([3, 3, 3, 1.0]), overwrite=True)
        try:
            result = cli("project", "export", str(project), "--out", str(WORK / "changed_out"))
        finally:
            scan.write_bytes(original)
        if result.returncode == 0:
            return "FAIL: exported the old labels with the new file's affine", (
                "YES: stale prediction paired with another scan"
            )
        return said(result), "no"

    @row("i20 predict resumes a store made from another input")
    def _():
        # the same voxels upside down: same shape and intensity range, another scan
        flipped = np.flip(noisy((96, 96, 96), 4), axis=0).copy()
        other = io.save_nifti(WORK / "other_T2w.nii", flipped, np.eye(4))
        out = WORK / "resume_other.zarr"
        first = start_cli("predict", str(p["mid_nii"]), "--out", str(out), "--model", ckpt,
                          *PREDICT)  # fmt: skip
        done = out / "_chunks_done" / "c"
        kill_when(first, lambda: done.exists() and sum(1 for f in done.rglob("*") if f.is_file())
                  >= 3)  # fmt: skip
        result = cli("predict", str(other), "--out", str(out), "--model", ckpt, *PREDICT)
        if result.returncode == 0:
            return "FAIL: resumed and finished a mix of two volumes", "YES: mixed store"
        return said(result), "no"

    # -------------------------------------------------------------------------- wrong scan

    @row("i20 accept P 2 where a volume is named '2'")
    def _():
        from napari_pvs.project import Project

        project = copy_project(p, "digits")
        named = io.save_nifti(WORK / "2.nii.gz", noisy((24, 28, 20), 12), np.eye(4))
        with Project.open(project) as opened:
            third = opened.add_volume(named)  # the volume named '2' is #3
        labels = WORK / "zeros8.npy"
        np.save(labels, np.zeros((8, 8, 8), np.uint8))
        result = cli("project", "accept", str(project), "2", "--box", "16", "16", "10", "24",
                     "24", "18", "--labels", str(labels))  # fmt: skip
        with Project.open(project, readonly=True) as opened:
            latest = max(opened.annotations(), key=lambda a: a.id)
        if result.returncode == 0 and latest.volume_id != third.id:
            return f"FAIL: annotated volume #{latest.volume_id}, not the volume named '2'", "no"
        return said(result) + f"; annotated #{latest.volume_id}", "no"

    @row("i20 round --strategy bogus / --n 0 / --patch 0 / --patch 3")
    def _():
        from napari_pvs.project import Project

        project = copy_project(p, "round_args")
        base = ["round", str(project), "--steps", "1", "--device", "cpu"]
        codes, queued = [], []
        for extra in (["--strategy", "bogus"], ["--n", "0"], ["--patch", "0"], ["--patch", "3"]):
            result = cli(*base, *extra)
            codes.append(result.returncode if refused(result) else f"{result.returncode}!")
            with Project.open(project, readonly=True) as opened:
                queued.append(len(opened.queue(status="new")))
        verdict = "FAIL: accepted; " if any(str(c).endswith("!") for c in codes) else ""
        return f"{verdict}exits {codes} (! = not refused); queued after each: {queued}", "no"

    @row("i20 project queue --n 0 / --patch 0 / --patch 3 / --patch 100000")
    def _():
        project = copy_project(p, "queue_args")
        results = [cli("project", "queue", str(project), *extra) for extra in (
            ["--n", "0"], ["--patch", "0"], ["--patch", "3"], ["--patch", "100000"])]  # fmt: skip
        ok = all(refused(r) for r in results)
        return ("" if ok else "FAIL: not all refused; ") + said(results[-1]), "no"

    # -------------------------------------------------------------------------- memory

    @row("i20 checkpoint declaring 16 GiB of optimizer state")
    def _():
        raw = p["ckpt"].read_bytes()
        length = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + length])
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        header["optimizer/state.0.exp_avg"] = {
            "dtype": "F32", "shape": [2**32], "data_offsets": [end, end + 2**34]}  # fmt: skip
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path = WORK / "optimizer16g.safetensors"
        path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length :])
        result = py(
            """
            import sys
            from napari_pvs.models.checkpoint import load_checkpoint
            try:
                load_checkpoint(sys.argv[1])
                print("LOADED")
            except (ValueError, MemoryError) as exc:
                print("refused:" if isinstance(exc, ValueError) else "MemoryError", exc)
            """,
            str(path),
            timeout=120,
        )
        line = (result.stdout.strip() or result.stderr.strip()[-80:]).replace(str(WORK), "")
        verdict = "" if line.startswith("refused") else "FAIL: "
        return verdict + line[:100], "no"

    for label, shape, chunks in (("declaring 20000^3", (20000,) * 3, (64,) * 3),
                                 ("of 4096^3", (4096,) * 3, (128,) * 3)):  # fmt: skip

        @row(f"i20 open a zarr store {label}")
        def _(label=label, shape=shape, chunks=chunks):
            store = WORK / f"huge_{shape[0]}.zarr"
            if not store.exists():
                array = zarr.open_array(str(store), mode="w", shape=shape, chunks=chunks,
                                        dtype="float32", zarr_format=2)  # fmt: skip
                array[:64, :64, :64] = 7  # a few real chunks
            result = py(
                """
                import sys, time
                from napari_pvs import io
                started = time.monotonic()
                try:
                    volume = io.open_volume(sys.argv[1], modality="T2")
                    print(f"opened {volume.shape} in {time.monotonic() - started:.1f} s")
                except ValueError as exc:
                    print(f"refused in {time.monotonic() - started:.1f} s: {exc}")
                """,
                str(store),
                timeout=120,
            )
            line = result.stdout.strip() or said(result)
            seconds = float(line.split(" in ")[1].split(" s")[0]) if " in " in line else 999
            if result.returncode == -9:
                line = "hung: killed after 120 s"
            verdict = "" if seconds < 2 else "FAIL (over 2 s): "
            return (verdict + line.replace(str(WORK), ""))[:110], "no"

    @row("i20 predict --window 100000 / rank --patch 100000")
    def _():
        out = WORK / "window.zarr"
        first = cli("predict", str(p["scan"]), "--out", str(out), "--model", ckpt, *PREDICT[:2],
                    "--window", "100000")  # fmt: skip
        store = WORK / "clean.zarr"
        if not store.exists():
            cli("predict", str(p["image"]), "--out", str(store), "--model", ckpt, *PREDICT)
        second = cli("rank", str(store), "--patch", "100000", "--strategy", "random")
        ok = refused(first, "--window") and refused(second, "--patch")
        return ("" if ok else "FAIL: ") + f"{said(first)} / {said(second)}", "no"

    # -------------------------------------------------------------------------- one damage

    @row("i20 damaged label chunk + failed accept, then accept elsewhere")
    def _():
        project = copy_project(p, "damaged_labels")
        store = project / "volumes" / "1" / "labels.zarr"
        chunk = next(f for f in sorted(store.rglob("*")) if f.is_file() and f.stat().st_size > 32
                     and not f.name.startswith((".", "zarr")))  # fmt: skip
        chunk.write_bytes(b"garbage" * 8)
        labels = WORK / "zeros8.npy"
        np.save(labels, np.zeros((8, 8, 8), np.uint8))
        box = ["0", "0", "0", "8", "8", "8"]
        first = cli("project", "accept", str(project), "a", "--box", *box, "--labels", str(labels))
        second = cli("project", "accept", str(project), "b", "--box", *box, "--labels",
                     str(labels))  # fmt: skip
        verdict = "" if second.returncode == 0 else "FAIL: the other volume is blocked; "
        return f"{verdict}damaged volume: {said(first)}; other volume: {said(second)}", "no"

    @row("i20 read-only ledger (project folder writable): accept")
    def _():
        folder = copy_project(p, "ro_ledger")
        ledger = folder / "ledger.sqlite"
        bind = ["mount", "--bind", str(ledger), str(ledger)]
        if subprocess.run(bind, capture_output=True).returncode != 0:
            return "SKIP: a read-only bind mount needs root", "no"
        try:
            subprocess.run(["mount", "-o", "remount,ro,bind", str(ledger)], check=True)
            labels = WORK / "zeros8.npy"
            np.save(labels, np.zeros((8, 8, 8), np.uint8))
            result = cli("project", "accept", str(folder), "a", "--box", "0", "0", "0", "8", "8",
                         "8", "--labels", str(labels))  # fmt: skip
        finally:
            subprocess.run(["umount", "-l", str(ledger)], capture_output=True)
        text = result.stderr.lower()
        ok = refused(result) and "read-only" in text and "damaged" not in text
        return ("" if ok else "FAIL: not a read-only sentence; ") + said(result), "no"

    @row("i20 zero-size volume: convert / predict / add / queue / export")
    def _():
        import nibabel as nib

        empty = WORK / "empty_T2w.nii"
        nib.save(nib.Nifti1Image(np.zeros((0, 10, 10), np.float32), np.eye(4)), str(empty))
        project = copy_project(p, "zero_size")
        results = [
            cli("convert", str(empty), str(WORK / "empty.zarr")),
            cli("predict", str(empty), "--out", str(WORK / "empty_p.zarr"), "--model", ckpt,
                *PREDICT),
            cli("project", "add", str(project), str(empty)),
            cli("project", "queue", str(project), "--n", "2", "--patch", "8"),
            cli("project", "export", str(project), "--out", str(WORK / "empty_export")),
        ]
        bad = [i for i, r in enumerate(results[:3]) if not refused(r)]
        bad += [i + 3 for i, r in enumerate(results[3:]) if r.returncode != 0]
        worst = next((r for r in results if "Traceback" in r.stderr), results[0])
        verdict = f"FAIL: steps {bad} not refused or broke; " if bad else ""
        return verdict + f"exits {[r.returncode for r in results]}; {said(worst)}", "no"

    @row("i20 project remove #2 (keeps its labels)")
    def _():
        project = copy_project(p, "remove")
        result = cli("project", "remove", str(project), "#2")
        return ("" if result.returncode == 0 else "FAIL: no way to remove; ") + said(result), "no"

    @row("i20 project queue with one volume it cannot rank")
    def _():
        from napari_pvs.project import Project

        project = copy_project(p, "queue_skip")
        gone = io.save_nifti(WORK / "gone.nii.gz", noisy((24, 28, 20), 13), np.eye(4))
        with Project.open(project) as opened:
            opened.add_volume(gone)
        gone.unlink()  # volume #3's file is gone; #1 and #2 must still be ranked
        result = cli("project", "queue", str(project), "--n", "2", "--patch", "8", "--volume",
                     "gone", "a", "b", "--strategy", "random")  # fmt: skip
        ranked = result.stdout.count("patches to review")
        ok = ranked == 2 and "gone" in result.stderr
        return ("" if ok else "FAIL: ") + f"ranked {ranked} of 2; {said(result)}", "no"

    # -------------------------------------------------------------------------- machine faults

    @row("i20 project init onto a mount point")
    def _():
        with tmpfs(WORK / "mnt_init", "size=32m") as ok:
            if not ok:
                return "SKIP: mounting a tmpfs needs root", "no"
            result = cli("project", "init", str(WORK / "mnt_init"), "--model", ckpt)
            made = (WORK / "mnt_init" / "napari-pvs-project.json").exists()
            return ("" if made else "FAIL: ") + f"{said(result)}; project made: {made}", "no"

    @row("i20 near-full disk: accept, then the ledger later")
    def _():
        from napari_pvs.project import Project

        with tmpfs(WORK / "full_project", "size=4m") as ok:
            if not ok:
                return "SKIP: mounting a tmpfs needs root", "no"
            folder = WORK / "full_project" / "p"
            shutil.copytree(base_project(p), folder, ignore=shutil.ignore_patterns("predictions"))
            with Project.open(folder, readonly=True) as opened:
                count = len(opened.annotations())
            filler = WORK / "full_project" / "filler"
            with open(filler, "wb", buffering=0) as handle, contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * 4096)
            labels = WORK / "ones8.npy"
            np.save(labels, np.ones((8, 8, 8), np.uint8))
            result = cli("project", "accept", str(folder), "b", "--box", "16", "16", "12", "24",
                         "24", "20", "--labels", str(labels))  # fmt: skip
            filler.unlink()
            later = cli("project", "status", str(folder), "--json")
            with Project.open(folder, readonly=True) as opened:
                after = len(opened.annotations())
            acknowledged = result.returncode == 0
            phantom_commit = not acknowledged and after > count
            loss = "YES: an accept reported failed was committed later" if phantom_commit else "no"
            return f"accept {said(result)}; later status {said(later)}; annotations {count}->" \
                   f"{after}", loss  # fmt: skip

    @row("i20 kill -9 during a round, then status")
    def _():
        project = copy_project(p, "killed_round")
        child = start_cli("round", str(project), "--steps", "400", "--device", "cpu")
        kill_when(child, lambda: any((project / "rounds").glob("*/train/*")), limit=300)
        time.sleep(0.5)
        status = cli("project", "status", str(project), "--json")
        rounds = json.loads(status.stdout)["rounds"] if status.returncode == 0 else []
        state = rounds[-1]["status"] if rounds else "?"
        left = [str(q.relative_to(project)) for q in (project / "rounds").glob("*/train")]
        hidden = [q.name for q in project.rglob(f"{atomic.TEMP_MARK}*")]
        ok = state == "interrupted" and not left and not hidden
        return ("" if ok else "FAIL: ") + f"status '{state}'; work left {left}; hidden temp " \
               f"{len(hidden)}", "no"  # fmt: skip


# ------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help=f"keep the work folder ({WORK})")
    parser.add_argument(
        "--only",
        action="append",
        help="run only the cases whose name holds this text (e.g. i20); may repeat",
    )
    args = parser.parse_args()
    started = time.monotonic()
    print(f"work folder {WORK}", flush=True)
    paths = setup()
    cases(paths)
    issue20_cases(paths)
    for name, case in CASES:
        if args.only is None or any(text in name for text in args.only):
            case()
    width = max(len(c) for c, *_ in ROWS)
    print(f"\n| {'case':<{width}} | outcome | lost anything | traceback | peak memory |")
    print(f"|{'-' * (width + 2)}|---------|---------------|-----------|-------------|")
    for case, outcome, loss, traceback, peak in ROWS:
        print(f"| {case:<{width}} | {outcome} | {loss} | {traceback} | {peak} |")
    bad = [
        r for r in ROWS
        if r[2] != "no" or r[3] != "no" or "HARNESS" in r[1] or r[1].startswith("FAIL")
        or "over 1.5 GB" in r[4]
    ]  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    print(f"\n{len(ROWS)} cases in {time.monotonic() - started:.0f} s (largest child {peak} MB); "
          f"{len(bad)} failing (a loss, a traceback, a harness error, a missing refusal or "
          "over 1.5 GB)")  # fmt: skip
    if not args.keep:
        shutil.rmtree(WORK, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Replay every case of issue 11 (and more) against the real CLI and API, and print a table.

Each case runs what a careful user, an unlucky machine or a hostile file would do: commands in
subprocesses (``python -m napari_pvs.cli``), ``kill -9`` in the middle of each kind of write
(NIfTI, OME-Zarr, checkpoint, prediction store, CSV), a full disk (a 2 MB tmpfs, mounted when
running as root; otherwise the row says SKIP), read-only folders, damaged and hostile files.
For each it checks what is left on disk against a fingerprint taken before. The table has one
row per case: what happened, and whether anything the user had was lost. Every row must say
"no" in the last column, and no command may print a traceback.

Usage: nice -n 10 python benchmarks/bench_safety.py [--keep]   (about 3-5 min on 2 busy cores)
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

ROWS: list[tuple[str, str, str]] = []


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


def cli(*args: str, timeout: float = 600, slow_fsync: float = 0.0) -> subprocess.CompletedProcess:
    """Run ``napari-pvs ARGS`` in a fresh interpreter (optionally with a slow disk)."""
    code = "import sys\n"
    if slow_fsync:
        code += (
            "import os, time\n_fsync = os.fsync\n"
            f"os.fsync = lambda fd: (time.sleep({slow_fsync}), _fsync(fd))[1]\n"
        )
    code += "from napari_pvs.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )


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
        if process.poll() is not None:
            return False
        if ready():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.005)
    process.kill()
    process.wait()
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
            try:
                outcome, loss = function()
            except Exception as exc:  # the harness itself failed: say so in the row
                outcome, loss = f"HARNESS ERROR {type(exc).__name__}: {exc}"[:100], "?"
            ROWS.append((case, outcome, loss))
            print(f"  {case}: {outcome} | lost: {loss}", flush=True)

        CASES.append(run)
        return run

    return wrap


CASES: list[Callable[[], None]] = []


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


# ------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help=f"keep the work folder ({WORK})")
    args = parser.parse_args()
    started = time.monotonic()
    print(f"work folder {WORK}", flush=True)
    paths = setup()
    cases(paths)
    for case in CASES:
        case()
    width = max(len(c) for c, _, _ in ROWS)
    print(f"\n| {'case':<{width}} | outcome | lost anything |")
    print(f"|{'-' * (width + 2)}|---------|---------------|")
    for case, outcome, loss in ROWS:
        print(f"| {case:<{width}} | {outcome} | {loss} |")
    bad = [r for r in ROWS if r[2] != "no" or "TRACEBACK" in r[1] or "HARNESS" in r[1]]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    print(f"\n{len(ROWS)} cases in {time.monotonic() - started:.0f} s (largest child {peak} MB); "
          f"{len(bad)} with a loss, a traceback or a harness error")  # fmt: skip
    if not args.keep:
        shutil.rmtree(WORK, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

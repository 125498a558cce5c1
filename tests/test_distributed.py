"""Training on several processes (torchrun, DDP over gloo) equals one process on the same batches.

One torchrun job of two CPU processes (tests/distributed_worker.py) runs everything the
distributed path does: a step's gradient with shares of very unequal labelled voxel counts, a
short fit, the batch-size check, a cancel raised by one process only, and a resumed fit. This
file repeats the same work in one process and compares.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import napari_pvs
from distributed_worker import CONFIG, tiny
from napari_pvs import io
from napari_pvs.models.checkpoint import OPTIMIZER_PREFIX, read_checkpoint
from napari_pvs.training import (
    UNLABELLED,
    TrainConfig,
    TrainingVolume,
    distributed_context,
    fit,
    last_checkpoint_path,
    masked_loss,
)

WORKER = Path(__file__).with_name("distributed_worker.py")


def _data(folder: Path) -> dict[str, np.ndarray]:
    """A 32^3 volume with bright tubes (PVS), its top third unlabelled, and a fixed batch whose
    two halves (the two processes' shares) hold very different numbers of labelled voxels."""
    rng = np.random.default_rng(5)
    image = rng.normal(100, 10, (32, 32, 32)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    for _ in range(12):
        z, y = rng.integers(2, 30, 2)
        image[z, y, :] += 90
        labels[z, y, :] = 1
    labels[:10] = UNLABELLED
    batch_images = rng.normal(0, 1, (4, 1, 16, 16, 16)).astype(np.float32)
    batch_labels = (rng.random((4, 1, 16, 16, 16)) < 0.1).astype(np.uint8)
    batch_labels[:2, :, 2:] = UNLABELLED  # the first share: an eighth labelled
    data = dict(image=image, labels=labels, batch_images=batch_images, batch_labels=batch_labels)
    np.savez(folder / "data.npz", **data)
    io.save_ome_zarr(
        folder / "t2.zarr", image, (1.0, 1.0, 1.0), labels={"pvs": labels}, modality="T2", levels=1
    )
    return data


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two-process job and the same work in this process."""
    folder = tmp_path_factory.mktemp("ddp")
    data = _data(folder)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(napari_pvs.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(WORKER), str(folder)]
    job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny(0).train()
        images = torch.from_numpy(data["batch_images"])
        labels = torch.from_numpy(data["batch_labels"])
        masked_loss(model.training_outputs(images, ["T2"] * 4), labels).backward()
        single_grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
        volume = TrainingVolume(data["image"], data["labels"], "T2")
        single = fit(tiny(1), [volume], TrainConfig(**CONFIG), folder / "one.safetensors")
    finally:
        torch.set_num_threads(threads)
    reports = [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]
    return folder, reports, single_grads, single


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in read_checkpoint(path)[0].items() if not k.startswith(OPTIMIZER_PREFIX)}


def test_one_ddp_step_has_the_gradient_of_the_global_batch(runs):
    folder, reports, single_grads, _ = runs
    assert [r["backend"] for r in reports] == ["gloo", "gloo"]
    assert [r["world_size"] for r in reports] == [2, 2]
    few, many = (r["labelled_in_share"] for r in reports)
    assert many > 5 * few  # the shares are far apart: a plain mean of their losses is wrong
    saved = load_file(str(folder / "gradients.safetensors"))
    for name, expected in single_grads.items():
        torch.testing.assert_close(saved[f"exact.{name}"], expected, atol=1e-6, rtol=1e-4)
    # Averaging the per-process losses (what DDP alone does) gives another gradient.
    difference = max(
        float((saved[f"naive.{name}"] - g).abs().max() / g.abs().max().clamp(min=1e-12))
        for name, g in single_grads.items()
    )
    assert difference > 0.05


def _relevant(weights: dict[str, torch.Tensor]) -> list[str]:
    """Names of the weights that change the model's output.

    A conv bias followed by InstanceNorm is subtracted again by the norm: its gradient is zero
    but for float rounding, which AdamW's normalised step turns into steps of a full learning
    rate in either direction. Such weights differ between any two runs that sum in another
    order (two threads against one, too) and cannot matter; every other weight must agree.
    """
    model = tiny(0).eval()
    model.load_state_dict(weights)
    probe = torch.from_numpy(np.random.default_rng(0).normal(0, 1, (1, 1, 16, 16, 16)))
    probe = probe.float()
    with torch.no_grad():
        reference = model(probe, "T2")
        names = []
        for name, parameter in model.named_parameters():
            parameter += 1.0
            if float((model(probe, "T2") - reference).abs().max()) > 1e-4:
                names.append(name)
            parameter -= 1.0
    return names


def test_two_processes_train_the_weights_one_process_trains(runs):
    folder, reports, _, single = runs
    ddp, one = _weights(folder / "ddp.last.safetensors"), _weights(folder / "one.last.safetensors")
    assert ddp.keys() == one.keys()
    relevant = _relevant(one)
    assert len(relevant) >= len(one) - 3  # only the biases in front of the three norms
    for name in relevant:
        torch.testing.assert_close(ddp[name], one[name], atol=1e-5, rtol=1e-4)
    # And the two models compute the same function.
    probe = torch.from_numpy(np.random.default_rng(1).normal(0, 1, (1, 1, 16, 16, 16))).float()
    outputs = []
    for weights in (ddp, one):
        model = tiny(0).eval()
        model.load_state_dict(weights)
        with torch.no_grad():
            outputs.append(model(probe, "T2"))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)
    for history in (reports[0]["history"], reports[1]["history"]):
        assert [h["val_dice"] for h in history] == pytest.approx(
            [h["val_dice"] for h in single.history], abs=1e-3
        )
        assert [h["train_loss"] for h in history] == pytest.approx(
            [h["train_loss"] for h in single.history], rel=1e-4
        )
    assert read_checkpoint(folder / "ddp.last.safetensors")[1]["training"]["processes"] == 2


def test_only_rank_0_writes_checkpoints(runs):
    _, reports, _, _ = runs
    assert reports[1]["writes"] == []
    assert {"ddp.safetensors", "ddp.last.safetensors"} <= set(reports[0]["writes"])


def test_a_global_batch_that_does_not_split_is_refused(runs):
    _, reports, _, _ = runs
    for report in reports:
        assert "batch_size 3 does not split evenly over 2 processes" in report["batch_error"]


def test_a_cancel_on_one_process_stops_all_and_the_rerun_resumes_exactly(runs):
    folder, reports, _, _ = runs
    assert [r.get("cancelled") for r in reports] == [True, True]
    resumed = _weights(last_checkpoint_path(folder / "resumed.safetensors"))
    straight = _weights(folder / "ddp.last.safetensors")
    for name in _relevant(straight):
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-6, rtol=1e-5)
    for key in ("train_loss", "val_dice"):  # the same decisions on both processes
        assert [h[key] for h in reports[0]["resumed_history"]] == [
            h[key] for h in reports[1]["resumed_history"]
        ]
    held = [load_file(str(folder / f"held-rank{r}.safetensors")) for r in (0, 1)]
    for name in held[0]:  # every process ends holding the same (best) weights
        assert torch.equal(held[0][name], held[1][name])


def test_napari_pvs_train_prints_and_reports_on_rank_0_only(runs):
    folder, reports, _, _ = runs
    assert [r["cli_code"] for r in reports] == [0, 0]
    assert json.loads(reports[0]["cli_stdout"])["processes"] == 2
    assert "epoch 1/1" in reports[0]["cli_stderr"]
    assert reports[1]["cli_stdout"] == "" and "epoch" not in reports[1]["cli_stderr"]
    assert read_checkpoint(folder / "cli.safetensors")[1]["training"]["processes"] == 2


def test_the_cli_runs_as_a_module_as_torchrun_starts_it():
    job = subprocess.run(
        [sys.executable, "-m", "napari_pvs.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(napari_pvs.__file__).parents[1])},
    )
    assert job.returncode == 0 and job.stdout.startswith("napari-pvs ")


def test_without_torchrun_the_context_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed_context("cpu") as context:
        assert (context.rank, context.world_size, context.distributed) == (0, 1, False)
        assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with (
        pytest.raises(ValueError, match="start the command with torchrun"),
        distributed_context("cpu"),
    ):
        pass
    volume = TrainingVolume(np.zeros((8, 8, 8)), np.zeros((8, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="no process group is initialised"):
        fit(tiny(0), [volume], distributed=True)

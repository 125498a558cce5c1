"""One process of the two-process gloo job that tests/test_distributed.py starts with torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py DIR

DIR holds ``data.npz`` (volume, labels, a fixed batch) and ``t2.zarr``, written by the test.
Every process writes ``rank<R>.json`` (what it saw); rank 0 also the tensors the test compares
with one process.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import io
import json
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import napari_pvs.training as training
import napari_pvs.training.checkpointing as checkpointing
from napari_pvs.cli import main as main_cli
from napari_pvs.progress import Cancelled
from napari_pvs.training import (
    TrainConfig,
    TrainingVolume,
    distributed_context,
    distributed_masked_loss,
    fit,
    masked_loss,
)
from napari_pvs.training.distributed import TrainingOutputs
from tiny_models import tiny_unet

#: The run the test repeats in one process (global batch 4: 2 patches per process).
CONFIG = dict(
    epochs=2,
    steps_per_epoch=2,
    batch_size=4,
    patch=(16, 16, 16),
    validation_patches=4,
    augment=True,
    device="cpu",
    learning_rate=1e-2,
)


class CancelOnCall:
    """Set on its ``n``-th check: lets one process alone ask to stop mid-run."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def is_set(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


#: tiny_unet's architecture without dropout, for `napari-pvs train --config`.
TINY_CONFIG = {"channels": [4, 8], "num_res_units": 1, "feature_channels": 4, "dropout": 0.0}


def tiny(seed: int):
    """The tiny UNet without dropout: its training is deterministic, comparable bit for bit."""
    return tiny_unet(seed=seed, dropout=0.0)


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def main(folder: Path) -> None:
    torch.set_num_threads(1)
    data = np.load(folder / "data.npz")
    volume = TrainingVolume(data["image"], data["labels"], "T2")
    report: dict = {"writes": []}

    save = checkpointing.save_checkpoint

    def recording_save(model, path, **options):  # which process writes what
        report["writes"].append(Path(path).name)
        return save(model, path, **options)

    checkpointing.save_checkpoint = recording_save

    with distributed_context("cpu") as context:
        rank, world = context.rank, context.world_size
        report.update(rank=rank, world_size=world, backend=context.backend)
        share = slice(rank * 2, rank * 2 + 2)
        images = torch.from_numpy(data["batch_images"][share])
        labels = torch.from_numpy(data["batch_labels"][share])
        report["labelled_in_share"] = int((labels != training.UNLABELLED).sum())

        # One step's gradient: the global-batch loss, and the naive mean of per-process losses.
        model = tiny(0).train()
        ddp = torch.nn.parallel.DistributedDataParallel(TrainingOutputs(model))
        to_backward, value = distributed_masked_loss(ddp(images, ["T2"] * 2), labels)
        to_backward.backward()
        exact = gradients(model)
        report["loss"] = float(value)
        model.zero_grad(set_to_none=True)
        masked_loss(ddp(images, ["T2"] * 2), labels).backward()
        naive = gradients(model)

        config = TrainConfig(**CONFIG)
        straight = fit(tiny(1), [volume], config, folder / "ddp.safetensors")
        report["history"] = straight.history

        try:
            fit(tiny(1), [volume], TrainConfig(**{**CONFIG, "batch_size": 3}))
        except ValueError as exc:
            report["batch_error"] = str(exc)

        # Rank 1 alone cancels in the second epoch; both stop; the rerun resumes from epoch 0.
        token = CancelOnCall(3 if rank == 1 else 10**9)
        try:
            fit(tiny(1), [volume], config, folder / "resumed.safetensors", cancel=token)
        except Cancelled:
            report["cancelled"] = True
        held = tiny(2 + rank)  # different starts: DDP begins from rank 0's weights
        resumed = fit(held, [volume], config, folder / "resumed.safetensors")
        report["resumed_history"] = resumed.history

        # The CLI adapter in the same job: `napari-pvs train` prints and reports on rank 0 only.
        printed, reported = io.StringIO(), io.StringIO()
        with redirect_stdout(printed), redirect_stderr(reported):
            report["cli_code"] = main_cli(
                ["train", "--images", str(folder / "t2.zarr"), "--model", "unet",
                 "--config", json.dumps(TINY_CONFIG), "--out", str(folder / "cli.safetensors"),
                 "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2",
                 "--patch", "16", "--device", "cpu"]
            )  # fmt: skip
        report["cli_stdout"], report["cli_stderr"] = printed.getvalue(), reported.getvalue()

    # What fit left in each process's model (its best weights): the same everywhere.
    save_file(
        {k: v.contiguous() for k, v in held.state_dict().items()},
        str(folder / f"held-rank{rank}.safetensors"),
    )
    if rank == 0:
        save_file(
            {**{f"exact.{k}": v for k, v in exact.items()},
             **{f"naive.{k}": v for k, v in naive.items()}},
            str(folder / "gradients.safetensors"),
        )
    (folder / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

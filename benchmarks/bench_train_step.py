"""Time one training step (forward, masked loss, backward, AdamW) on a 64^3 batch of 2.

    python benchmarks/bench_train_step.py [--repeats 5] [--device cpu|cuda] [--ddp N]

Prints the median step time of the compact default cross-modal model, and, measured in the
same run as references, the compact UNet and MedNeXt-S (ratio = model / UNet). On a GPU it
also uses AMP and channels-last, as training does. ``--ddp N`` adds a row: the default model's
step on the same global batch split over N DistributedDataParallel processes (gloo on the CPU,
the machine's threads shared among them; on CUDA one GPU each), as ``torchrun`` training runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_default.py

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_pvs.models import build_model, resolve_device
from napari_pvs.models.checkpoint import default_checkpoint_path, load_checkpoint
from napari_pvs.training import distributed_context, distributed_masked_loss, masked_loss
from napari_pvs.training.distributed import TrainingOutputs


def step_seconds(
    model, device: torch.device, repeats: int, batch: int, size: int, distributed: bool = False
) -> float:
    """Median seconds of a step on a global batch of ``batch`` (this process's share of it
    inside DDP when ``distributed``)."""
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.normal(0.5, 0.2, (batch, 1, size, size, size)).astype("f4"))
    labels = torch.from_numpy((rng.random((batch, 1, size, size, size)) > 0.99).astype("u1"))
    forward, loss_of = model.training_outputs, masked_loss
    if distributed:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        share = slice(rank * batch // world, (rank + 1) * batch // world)
        image, labels = image[share], labels[share]
    image, labels = image.to(device), labels.to(device)
    model.to(device).train()
    use_cuda = device.type == "cuda"
    if use_cuda:
        model.to(memory_format=torch.channels_last_3d)
        image = image.to(memory_format=torch.channels_last_3d)
    if distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(
            TrainingOutputs(model), device_ids=[device.index] if use_cuda else None
        )
        forward = ddp

        def loss_of(outputs, labels):
            return distributed_masked_loss(outputs, labels)[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for i in range(repeats + 1):  # the first step warms up allocators and kernels
        if use_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda):
            outputs = forward(image, ["T2"] * len(image))
        loss = loss_of(outputs, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if use_cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def default_model():
    if default_checkpoint_path().is_file():
        return load_checkpoint(default_checkpoint_path())[0], "cross_modal (default)"
    return build_model("cross_modal"), "cross_modal (compact)"


def _ddp_process(rank: int, world: int, port: int, options: dict, result: str) -> None:
    """One DDP process (started by torch.multiprocessing.spawn, as torchrun would start it)."""
    import os

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(options["threads"])
    with distributed_context(options["device"]) as context:
        torch.manual_seed(0)
        model = default_model()[0]
        seconds = step_seconds(
            model, torch.device(context.device), options["repeats"], options["batch"],
            options["size"], distributed=True,
        )  # fmt: skip
    if rank == 0:
        Path(result).write_text(json.dumps(seconds))


def ddp_step_seconds(processes: int, device: str, repeats: int, batch: int, size: int) -> float:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    threads = max(1, torch.get_num_threads() // processes)
    options = dict(device=device, repeats=repeats, batch=batch, size=size, threads=threads)
    with tempfile.TemporaryDirectory() as folder:
        result = str(Path(folder) / "seconds.json")
        torch.multiprocessing.spawn(
            _ddp_process, args=(processes, port, options, result), nprocs=processes
        )
        return json.loads(Path(result).read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument(
        "--ddp", type=int, default=0, help="also time the default model in N DDP processes"
    )
    parser.add_argument(
        "--only-default", action="store_true", help="skip the UNet and MedNeXt references"
    )
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    default, default_label = default_model()
    models = {
        default_label: default,
        "unet (reference)": build_model("unet"),
        "mednext_s": build_model("mednext_s"),
    }
    if args.only_default:
        models = {default_label: default}
    results = {}
    for label, model in models.items():
        torch.manual_seed(0)
        results[label] = (
            model.num_parameters(),
            step_seconds(model, device, args.repeats, args.batch, args.size),
        )
    ddp = None
    if args.ddp:
        ddp = ddp_step_seconds(args.ddp, args.device, args.repeats, args.batch, args.size)
    reference = results.get("unet (reference)", results[default_label])[1]
    print(
        f"\nTraining step, global batch {args.batch} x {args.size}^3, device {device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"{'model':24} {'params':>10} {'s/step':>8} {'vs UNet':>8}")
    for label, (params, seconds) in results.items():
        print(f"{label:24} {params:10,d} {seconds:8.2f} {seconds / reference:8.2f}")
    if ddp is not None:
        one = results[default_label][1]
        threads = max(1, torch.get_num_threads() // args.ddp)
        sharing = f", {threads} thread{'s' * (threads > 1)} each" * (
            device.type == "cpu"
        )
        print(
            f"{default_label} in {args.ddp} DDP processes{sharing}: {ddp:.2f} s/step, "
            f"{ddp / one:.2f} x the one-process step on the same global batch"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

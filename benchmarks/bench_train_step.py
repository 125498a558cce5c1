"""Time one training step (forward, masked loss, backward, AdamW) on a 64^3 batch of 2.

    python benchmarks/bench_train_step.py [--repeats 5] [--device cpu|cuda]

Prints the median step time of the compact default cross-modal model, and, measured in the
same run as references, the compact UNet and MedNeXt-S (ratio = model / UNet). On a GPU it
also uses AMP and channels-last, as training does.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_default.py

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from napari_pvs.models import build_model, resolve_device
from napari_pvs.models.checkpoint import default_checkpoint_path, load_checkpoint
from napari_pvs.training import masked_loss


def step_seconds(model, device: torch.device, repeats: int, batch: int, size: int) -> float:
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.normal(0.5, 0.2, (batch, 1, size, size, size)).astype("f4"))
    labels = torch.from_numpy((rng.random((batch, 1, size, size, size)) > 0.99).astype("u1"))
    image, labels = image.to(device), labels.to(device)
    model.to(device).train()
    use_cuda = device.type == "cuda"
    if use_cuda:
        model.to(memory_format=torch.channels_last_3d)
        image = image.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for i in range(repeats + 1):  # the first step warms up allocators and kernels
        if use_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda):
            outputs = model.training_outputs(image, "T2")
        loss = masked_loss(outputs, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if use_cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if default_checkpoint_path().is_file():
        default = load_checkpoint(default_checkpoint_path())[0]
        default_label = "cross_modal (default)"
    else:
        default = build_model("cross_modal")
        default_label = "cross_modal (compact)"
    models = {
        default_label: default,
        "unet (reference)": build_model("unet"),
        "mednext_s": build_model("mednext_s"),
    }
    results = {}
    for label, model in models.items():
        torch.manual_seed(0)
        results[label] = (
            model.num_parameters(),
            step_seconds(model, device, args.repeats, args.batch, args.size),
        )
    reference = results["unet (reference)"][1]
    print(
        f"\nTraining step, batch {args.batch} x {args.size}^3, device {device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"{'model':24} {'params':>10} {'s/step':>8} {'vs UNet':>8}")
    for label, (params, seconds) in results.items():
        print(f"{label:24} {params:10,d} {seconds:8.2f} {seconds / reference:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Several processes (torchrun): one per GPU, or CPU processes with gloo.

:func:`distributed_context` joins the job; the rest are the collective decisions and the DDP
wrapping :func:`~napari_pvs.training.loop.fit` uses so that every process takes the same steps
and the same stop decisions.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from napari_pvs.models import resolve_device


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a ``torchrun`` job (world size 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "auto"  # what to pass as TrainConfig.device: cuda:LOCAL_RANK under torchrun
    backend: str | None = None  # "nccl" (CUDA) or "gloo" (CPU); None when not distributed

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that reports progress, prints and writes checkpoints."""
        return self.rank == 0


#: The variables torchrun sets for every process it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def distributed_context(device: str = "auto") -> Iterator[DistributedContext]:
    """Join the ``torchrun`` job this process belongs to, and leave it on exit.

    Reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
    picks the device (``cuda:LOCAL_RANK`` with NCCL when ``device`` is 'auto' or 'cuda' and
    CUDA is present, else the CPU with gloo) and initialises the default process group, which
    :func:`fit` then uses. Without torchrun (no WORLD_SIZE, or 1) it yields a single-process
    context and touches nothing; if a process group already exists it is used and left open.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        backend = str(dist.get_backend())
        chosen = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else device
        yield DistributedContext(rank, world, local, chosen, backend)
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield DistributedContext(device=device)
        return
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE is {world} but {', '.join(missing)} are not set; start the command "
            "with torchrun (e.g. torchrun --nproc_per_node 2 -m napari_pvs.rounds PROJECT)"
        )
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed; run without torchrun")
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        if ":" in str(device):
            raise ValueError(
                f"device {device!r} names one GPU, but under torchrun each process uses the GPU "
                "of its LOCAL_RANK; pass 'cuda' or 'auto'"
            )
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} CUDA "
                "device(s); start at most that many processes per machine (--nproc_per_node)"
            )
        torch.cuda.set_device(local)
        backend, chosen = "nccl", f"cuda:{local}"
    elif resolved.type == "cpu":
        backend, chosen = "gloo", "cpu"
    else:
        raise ValueError(f"training on several processes needs CUDA or the CPU, not {resolved}")
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
    try:
        yield DistributedContext(rank, world, local, chosen, backend)
    finally:
        dist.destroy_process_group()


def rank_and_world(distributed: bool | None) -> tuple[int, int]:
    """``(rank, world size)`` of the process group ``fit`` trains in; ``(0, 1)`` alone."""
    ready = dist.is_available() and dist.is_initialized()
    if distributed and not ready:
        raise ValueError(
            "distributed=True but no process group is initialised; run under torchrun inside "
            "napari_pvs.training.distributed_context()"
        )
    if distributed is False or not ready:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process if ``flag`` is true on any (cancel reaches all of them)."""
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def from_main(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every process (wall-clock decisions must not differ by process)."""
    value = torch.tensor([float(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def broadcast_weights(model: nn.Module) -> None:
    """Copy rank 0's weights and buffers into every process's model."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)


def no_buffer_sync() -> dict[str, bool]:
    """DDP option: buffers are not re-broadcast every step (they are constants or SyncBatchNorm
    statistics, equal everywhere); the name changed in torch 2.13 (still synced at start)."""
    parameters = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    name = "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"
    return {name: False}


class TrainingOutputs(nn.Module):
    """``model.training_outputs`` as ``forward``: DDP synchronises gradients of forward only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, modalities: list[str]) -> list[torch.Tensor]:
        return self.model.training_outputs(image, modalities)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm statistics over the global batch (none of the bundled models has any)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if device.type != "cuda":
        raise ValueError(
            f"{getattr(model, 'name', 'the model')!r} has BatchNorm layers, whose statistics "
            "can be synchronised across processes only on CUDA; train it on GPUs or in one "
            "process"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)

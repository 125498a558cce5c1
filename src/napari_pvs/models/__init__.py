"""Segmentation models: a registry that builds every architecture from a JSON-able config.

Every model takes ``image`` ``(B, 1, D, H, W)`` float32 (normalised with
:mod:`napari_pvs.intensity`) and ``modality`` (a string or one string per batch item) and
returns one logit channel ``(B, 1, D, H, W)``. Models split into ``features`` (deterministic,
expensive) and ``head`` (cheap, holds the Monte Carlo dropout) so uncertainty sampling reruns
only the head. See ``docs/architecture.md``.

Torch is imported only when a model is built, so ``import napari_pvs.models.frangi`` stays cheap.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

#: name -> (module, factory function, one-line description)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "cross_modal": (
        "napari_pvs.models.cross_modal",
        "build_cross_modal",
        "cross-modal graph model: text-guided 3D encoder-decoder + graph + attention fusion",
    ),
    "unet": ("napari_pvs.models.baselines", "build_unet", "compact residual 3D UNet (MONAI)"),
    "mednext_l_k5": (
        "napari_pvs.models.baselines",
        "build_mednext_l_k5",
        "MedNeXt-L, kernel 5 (MONAI), about 63 M parameters; for GPUs",
    ),
    "mednext_s": ("napari_pvs.models.baselines", "build_mednext_s", "MedNeXt-S (MONAI), for CPU"),
    "mednext_b": ("napari_pvs.models.baselines", "build_mednext_b", "MedNeXt-B (MONAI)"),
    "mednext_m": ("napari_pvs.models.baselines", "build_mednext_m", "MedNeXt-M (MONAI)"),
}

#: Edge (voxels) of the sliding window every model predicts with unless told otherwise (here,
#: torch-free, so the GUI can show it without importing torch).
DEFAULT_WINDOW = 64

#: Modalities every model understands; anything else is treated as "unknown".
MODALITIES = ("T1", "T2", "unknown")


#: Test-time mirroring sets by size: none, the identity plus one mirror per axis, all 8.
FLIP_COUNTS = (1, 4, 8)

#: How a volume becomes a segmentation, unless a checkpoint calibrated its own: the probability
#: averaged over ``tta`` test-time mirrorings (1: none, 4 or 8), voxels at or above
#: ``threshold``, then clusters smaller than ``min_cluster_mm3`` removed (0: keep all).
DEFAULT_SEGMENTATION_RULE: dict[str, float] = {"threshold": 0.5, "min_cluster_mm3": 0.0, "tta": 1}
#: What every prediction does unless an option says otherwise, in ``napari-pvs predict``, the
#: Segment step and a project alike: no MC dropout, and ``None`` = the model's calibrated rule
#: (its test-time mirrorings and smallest cluster), so both give the same segmentation.
PREDICTION_DEFAULTS: dict[str, Any] = {
    "mc_samples": 0,
    "tta": None,
    "window": DEFAULT_WINDOW,
    "overlap": 0.25,
    "batch": None,
    "min_cluster_mm3": None,
}


def prediction_options(**given: Any) -> dict[str, Any]:
    """:data:`PREDICTION_DEFAULTS` with every option given (and not None) in its place: the one
    rule the CLI, the GUI and the project build their Predictor options by."""
    return {**PREDICTION_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}


#: Largest ``min_cluster_mm3`` a rule may hold: 10 cm^3, far above any PVS (a larger cut-off
#: would silently remove every cluster).
MAX_MIN_CLUSTER_MM3 = 1e4


#: The bundled default checkpoint's file name, in the package's ``weights`` folder.
DEFAULT_CHECKPOINT = "default.safetensors"


def default_checkpoint_path() -> Path:
    """Where the bundled default checkpoint lives inside the installed package."""
    return Path(str(resources.files("napari_pvs") / "weights" / DEFAULT_CHECKPOINT))


#: The edge a MedNeXt input is padded to a multiple of (its four 2x downsamplings).
MEDNEXT_SIZE_DIVISOR = 16


def size_divisor(name: str, config: dict[str, Any]) -> int:
    """The edge every input of model ``name`` with ``config`` is padded to a multiple of: one
    halving per level below the first for the encoder-decoders with ``channels``, 16 for
    MedNeXt. Torch-free, so that ranking and argument checks read it from a checkpoint's
    header without importing torch; the models themselves take it from here."""
    if name.startswith("mednext_"):
        return MEDNEXT_SIZE_DIVISOR
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(_REGISTRY)}")
    channels = config.get("channels")
    if not isinstance(channels, list | tuple) or len(channels) < 2:
        raise ValueError(f"{name} needs at least two levels in 'channels', got {channels!r}")
    return 2 ** (len(channels) - 1)


def list_models() -> dict[str, str]:
    """Registered model names with a one-line description each."""
    return {name: entry[2] for name, entry in _REGISTRY.items()}


def build_model(name: str, **config: Any):
    """Build the model registered as ``name`` from keyword ``config`` (untrained weights).

    ``model.config`` holds the full JSON-able config, so ``build_model(model.name,
    **model.config)`` rebuilds the same architecture.
    """
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(
            f"unknown model {name!r}; choose one of: {known} "
            "(or load a trained checkpoint with napari_pvs.models.checkpoint.load_model)"
        )
    module_name, factory_name, _ = _REGISTRY[name]
    factory = getattr(importlib.import_module(module_name), factory_name)
    try:
        return factory(**config)
    except TypeError as exc:
        raise ValueError(f"invalid config for model {name!r}: {exc}") from exc


def canonical_modality(modality: str | None) -> str:
    """Map user spellings ('t2', 'T2w', 'T2-weighted', None) to 'T1', 'T2' or 'unknown'."""
    if modality is None:
        return "unknown"
    text = str(modality).strip().upper()
    if text.startswith("T1"):
        return "T1"
    if text.startswith("T2"):
        return "T2"
    return "unknown"


def modality_list(modality: str | list[str] | tuple[str, ...] | None, batch: int) -> list[str]:
    """One canonical modality per batch item; a single string applies to the whole batch."""
    if modality is None or isinstance(modality, str):
        return [canonical_modality(modality)] * batch
    items = [canonical_modality(m) for m in modality]
    if len(items) != batch:
        raise ValueError(
            f"got {len(items)} modalities for a batch of {batch}; pass one string for the "
            "whole batch or one per batch item"
        )
    return items


def _print_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def resolve_device(device: str | None = "auto", notify: Callable[[str], None] | None = None):
    """Turn 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' into a usable ``torch.device``.

    'auto' picks CUDA when available, else CPU. Asking for an absent accelerator falls back to
    CPU with a one-line message instead of failing deep inside torch; ``notify`` receives it
    (default: printed on stderr), so a widget can show it where the user looks.
    """
    import torch

    requested = "auto" if device is None else str(device).strip().lower()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            (notify or _print_stderr)(
                f"napari-pvs: device {device!r} requested but no CUDA GPU is available "
                "(or this torch build has no CUDA); falling back to CPU"
            )
            return torch.device("cpu")
        index = int(requested.split(":", 1)[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s); use 'cuda:0' or 'auto'"
            )
        return torch.device(f"cuda:{index}")
    if requested == "mps":
        backend = getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            (notify or _print_stderr)(
                "napari-pvs: MPS requested but not available; falling back to CPU"
            )
            return torch.device("cpu")
        return torch.device("mps")
    raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")


def _cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX) and oneDNN uses it.

    Elsewhere bfloat16 is emulated and slower than float32, so it must not be the default.
    """
    import torch

    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except (AttributeError, OSError, RuntimeError):
        return False
    return False


def autocast_dtype(device) -> Any:
    """The reduced precision inference runs in on ``device``, or None for float32.

    CUDA: float16. CPU: bfloat16 where the CPU has native bfloat16 arithmetic (measured on 2
    cores with AVX512-BF16: conv3d UNet windows 2.8x faster, half the activation memory,
    probabilities within 0.01 of float32); float32 on other CPUs, where it would be emulated.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return None

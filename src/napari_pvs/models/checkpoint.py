"""Safe checkpoints: safetensors weights + JSON metadata, never a pickle.

A checkpoint is one ``.safetensors`` file. Its tensors are the model's state dict (the
cross-modal model's prompt embeddings included, as the ``prompt_embeddings`` buffer) and, in
resumable training checkpoints, the optimizer state under ``optimizer/``. Its header metadata
holds one JSON document (key ``napari_pvs``): format version, model name and config, prompt
texts, the intensity normalisation scheme, the training-data manifest hash, round, metrics,
package version and a SHA-256 digest of every tensor, so a tampered file is refused.

Loading treats the file as hostile until proven otherwise: the metadata must be a bounded
JSON object with sane types and values, the model is first built on
PyTorch's ``meta`` device (no memory) and every tensor shape in the file's header compared with
it before anything real is allocated, the prompt embeddings must be stored (a text encoder is
never loaded, whatever path the config names), and only then are the weights read and verified
(those checks live in :mod:`napari_pvs.models.checkpoint_checks`).

Importing a user's ``.pt``/``.pth`` state dict goes only through
``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from napari_pvs import __version__, atomic
from napari_pvs.intensity import DEFAULT_PERCENTILES
from napari_pvs.models import (
    build_model,
    default_checkpoint_path,
    list_models,
    resolve_device,
)
from napari_pvs.models.checkpoint_checks import (
    FORMAT_VERSION,
    METADATA_KEY,
    OPTIMIZER_PREFIX,
    checked_segmentation_rule,
    compare_state,
    model_skeleton,
    read_header,
)

#: How intensities were normalised for training; inference must do the same.
INTENSITY_SCHEME = {
    "method": "napari_pvs.intensity.robust_range+normalize",
    "percentiles": list(DEFAULT_PERCENTILES),
    "nonzero_only": True,
}


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(
    model,
    path: str | os.PathLike,
    *,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    optimizer_state: dict[str, torch.Tensor] | None = None,
    segmentation: dict[str, float] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``model`` (+ optional flattened optimizer state) and its metadata to ``path``.

    ``training`` may hold the manifest hash, round, epochs, seed...; ``metrics`` validation
    numbers; ``segmentation`` the calibrated rule that turns a volume into a mask (``tta``
    mirrorings, ``threshold``, ``min_cluster_mm3``; default: the model's ``segmentation_rule``,
    so a fine-tuned model keeps its calibration). The file is written through
    :mod:`napari_pvs.atomic` (temporary sibling, fsync, rename), so a crash never leaves a
    half-written checkpoint under the real name. ``overwrite`` is True because training re-saves
    its own checkpoints every epoch; commands refuse an existing ``--out`` before they start.
    """
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if optimizer_state:
        for key, value in optimizer_state.items():
            tensors[OPTIMIZER_PREFIX + key] = value.detach().to("cpu").contiguous()
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": {"name": model.name, "config": model.config},
        "intensity": INTENSITY_SCHEME,
        "training": training or {},
        "metrics": metrics or {},
        "segmentation": checked_segmentation_rule(
            segmentation if segmentation is not None else getattr(model, "segmentation_rule", None)
        ),
        "package_version": __version__,
        "tensor_digest": tensor_digest(tensors),
    }
    if getattr(model, "use_text", False):
        from napari_pvs.models.text import all_prompts

        meta["prompts"] = all_prompts()
    header = {METADATA_KEY: json.dumps(meta, default=_json_default)}
    with atomic.atomic_output(path, overwrite=overwrite, kind="file") as tmp:
        save_file(tensors, str(tmp), metadata=header)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # readable like any file the user writes (installed)
    return path


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in checkpoint metadata")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All tensors and the metadata of a checkpoint, verified; clear errors for bad files.

    Order matters: the header is read and checked (metadata, and the model it declares built
    on the ``meta`` device and compared with every declared tensor shape, optimizer state
    included) before the file is mapped or any tensor read; then the tensors are read and
    their digest verified.
    """
    path = Path(path)
    source = repr(str(path))
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist; pass the path of a .safetensors file "
            "written by napari-pvs (or 'default' for the bundled model)"
        )
    meta, shapes = read_header(path, source)
    model_skeleton(meta, shapes, source)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            if sorted(handle.keys()) != sorted(shapes):
                raise ValueError(f"{source}: its header changed while it was read; try again")
            tensors = {name: handle.get_tensor(name) for name in shapes}
    except (SafetensorError, OSError, RuntimeError, MemoryError) as exc:
        raise ValueError(
            f"{source} is not a readable safetensors checkpoint (truncated or corrupt: "
            f"{exc}); re-copy or re-train it"
        ) from exc
    if tensor_digest(tensors) != meta.get("tensor_digest"):
        raise ValueError(
            f"{source} failed its integrity check: the weights do not match the digest "
            "recorded when it was saved (tampered or corrupted); do not use it"
        )
    return tensors, meta


def _model_from(tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: str):
    """Build the (already checked) model of ``meta`` for real and load ``tensors`` into it.

    The stored prompt embeddings are always passed in, so the config's ``text_model`` path is
    never followed (no text encoder is loaded).
    """
    info = meta["model"]
    name, config = info["name"], dict(info.get("config") or {})
    if name == "cross_modal" and "prompt_embeddings" in tensors:
        config["prompt_embeddings"] = tensors["prompt_embeddings"]
    model = build_model(name, **config)
    _load_state(model, tensors, source)
    model.segmentation_rule = checked_segmentation_rule(meta.get("segmentation"), source)
    return model


def _load_state(model, tensors: dict[str, torch.Tensor], source: str) -> None:
    compare_state(model, {k: tuple(v.shape) for k, v in tensors.items()}, source)
    state = {k: v for k, v in tensors.items() if not k.startswith(OPTIMIZER_PREFIX)}
    model.load_state_dict(state, strict=True)


def load_checkpoint(
    path: str | os.PathLike, device: str = "cpu", expected_model: str | None = None
):
    """Rebuild the model stored in ``path`` -> ``(model in eval mode, metadata)``.

    ``expected_model`` (a registry name) refuses a checkpoint of another architecture.
    """
    tensors, meta = read_checkpoint(path)
    name = (meta.get("model") or {}).get("name")
    if expected_model is not None and name != expected_model:
        raise ValueError(
            f"{str(path)!r} holds a {name!r} model, not {expected_model!r}; pick the matching "
            f"--model or another checkpoint"
        )
    model = _model_from(tensors, meta, repr(str(path)))
    model.to(resolve_device(device)).eval()
    return model, meta


def load_weights_into(model, path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint's weights into an existing ``model`` of the same architecture."""
    tensors, meta = read_checkpoint(path)
    name = (meta.get("model") or {}).get("name")
    if name != model.name:
        raise ValueError(
            f"{str(path)!r} holds a {name!r} model and cannot be loaded into a {model.name!r} "
            "model; use a checkpoint of the same architecture"
        )
    device = next(model.parameters()).device
    _load_state(model, {k: v.to(device) for k, v in tensors.items()}, repr(str(path)))
    return meta


def optimizer_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The flattened optimizer state stored in a resumable training checkpoint."""
    tensors, _ = read_checkpoint(path)
    n = len(OPTIMIZER_PREFIX)
    return {k[n:]: v for k, v in tensors.items() if k.startswith(OPTIMIZER_PREFIX)}


def load_default_model(device: str = "cpu"):
    """The bundled default model (compact cross-modal, trained on phantoms) + its metadata."""
    path = default_checkpoint_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"the bundled default checkpoint {str(path)!r} is missing; reinstall napari-pvs or "
            "rebuild it with: python benchmarks/train_default.py"
        )
    return load_checkpoint(path, device=device)


def load_model(spec: str | os.PathLike = "default", device: str = "cpu"):
    """What ``--model`` means everywhere: 'default' or a checkpoint path -> (model, metadata)."""
    text = str(spec)
    if text == "default":
        return load_default_model(device)
    if text in list_models() and not Path(text).exists():
        raise ValueError(
            f"{text!r} names an architecture, not trained weights; pass 'default', a "
            "checkpoint path, or train one with: napari-pvs train --model " + text
        )
    return load_checkpoint(text, device=device)


def import_state_dict(pt_path: str | os.PathLike, name: str, device: str = "cpu", **config):
    """Build model ``name`` and load a user's ``.pt``/``.pth`` state dict into it.

    Reads the file only through ``torch.load(weights_only=True)``: plain tensors and
    containers, never arbitrary pickled code. Accepts a bare state dict or one nested under
    'state_dict' / 'model', with an optional 'module.' prefix (DataParallel).
    """
    pt_path = Path(pt_path)
    if not pt_path.is_file():
        raise FileNotFoundError(f"state dict {str(pt_path)!r} does not exist")
    try:
        loaded = torch.load(str(pt_path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{str(pt_path)!r} could not be read as a plain tensor state dict with "
            f"torch.load(weights_only=True) ({type(exc).__name__}: {exc}); napari-pvs never "
            "unpickles arbitrary objects: re-save it with torch.save(model.state_dict(), path)"
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    tensors_only = isinstance(loaded, dict) and all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    )
    if not tensors_only:
        raise ValueError(f"{str(pt_path)!r} does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in loaded.items()}
    model = build_model(name, **config)
    _load_state(model, state, repr(str(pt_path)))
    model.to(resolve_device(device)).eval()
    return model


#: Training settings a resumed run may change: how long it runs and where.
RESUMABLE_CHANGES = ("epochs", "max_minutes", "patience", "device")


def resume_differences(
    last: str | os.PathLike, model, config: dict[str, Any], info: dict[str, Any]
) -> list[str]:
    """What differs between the run that saved the resumable checkpoint ``last`` and this one.

    ``model`` is the model about to be trained, ``config`` the run's ``TrainConfig`` as a dict
    and ``info`` its ``training_info`` (manifest hash, init). Only :data:`RESUMABLE_CHANGES`
    may differ, so resuming never mixes two runs' data or settings. Empty: resume is safe.
    """
    _, meta = read_checkpoint(last)
    saved = meta.get("training") or {}
    now = json.loads(json.dumps({"model": model.name, "config": model.config}, default=str))
    found = {"model": meta["model"]["name"], "config": meta["model"].get("config") or {}}
    differences = [f"model {k}" for k in ("model", "config") if now[k] != found[k]]
    wanted = json.loads(json.dumps(config, default=str))
    stored = saved.get("config") or {}
    differences += [
        f"{k}: {stored.get(k)!r} -> {wanted.get(k)!r}"
        for k in sorted(set(wanted) | set(stored))
        if k not in RESUMABLE_CHANGES and stored.get(k) != wanted.get(k)
    ]
    for key, value in json.loads(json.dumps(info, default=str)).items():
        if saved.get(key) != value:
            differences.append(f"{key}: {saved.get(key)!r} -> {value!r}")
    if "resume" not in saved:
        differences.append("it holds no resume state")
    return differences

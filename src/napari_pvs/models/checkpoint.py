"""Safe checkpoints: safetensors weights + JSON metadata, never a pickle.

A checkpoint is one ``.safetensors`` file. Its tensors are the model's state dict (the
cross-modal model's prompt embeddings included, as the ``prompt_embeddings`` buffer) and, in
resumable training checkpoints, the optimizer state under ``optimizer/``. Its header metadata
holds one JSON document (key ``napari_pvs``): format version, model name and config, prompt
texts, the intensity normalisation scheme, the training-data manifest hash, round, metrics,
package version and a SHA-256 digest of every tensor, so a tampered file is refused.

Importing a user's ``.pt``/``.pth`` state dict goes only through
``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from napari_pvs import __version__
from napari_pvs.intensity import DEFAULT_PERCENTILES
from napari_pvs.models import (
    DEFAULT_SEGMENTATION_RULE,
    FLIP_COUNTS,
    build_model,
    list_models,
    resolve_device,
)

#: Bump when the layout changes; readers refuse files from a newer format.
FORMAT_VERSION = 1
METADATA_KEY = "napari_pvs"
OPTIMIZER_PREFIX = "optimizer/"
DEFAULT_CHECKPOINT = "default.safetensors"

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


def manifest_hash(items: list[dict[str, Any]] | list[str]) -> str:
    """A stable hash of the training data's description (paths, seeds, patch boxes)."""
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()


def save_checkpoint(
    model,
    path: str | os.PathLike,
    *,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    optimizer_state: dict[str, torch.Tensor] | None = None,
    segmentation: dict[str, float] | None = None,
) -> Path:
    """Write ``model`` (+ optional flattened optimizer state) and its metadata to ``path``.

    ``training`` may hold the manifest hash, round, epochs, seed...; ``metrics`` validation
    numbers; ``segmentation`` the calibrated rule that turns a volume into a mask (``tta``
    mirrorings, ``threshold``, ``min_cluster_mm3``; default: the model's ``segmentation_rule``,
    so a fine-tuned model keeps its calibration). The file is written to a temporary name and
    renamed, so a crash never leaves a half-written checkpoint under the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
        "segmentation": _segmentation_rule(
            segmentation if segmentation is not None else getattr(model, "segmentation_rule", None)
        ),
        "package_version": __version__,
        "tensor_digest": tensor_digest(tensors),
    }
    if getattr(model, "use_text", False):
        from napari_pvs.models.text import all_prompts

        meta["prompts"] = all_prompts()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta, default=_json_default)})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # readable like any file the user writes (e.g. when installed)
    os.replace(tmp, path)
    return path


def _segmentation_rule(rule: dict[str, Any] | None) -> dict[str, float]:
    """A complete, checked segmentation rule (defaults filled in)."""
    unknown = set(rule or {}) - set(DEFAULT_SEGMENTATION_RULE)
    if unknown:
        raise ValueError(
            f"unknown segmentation rule keys {sorted(unknown)}; "
            f"use {sorted(DEFAULT_SEGMENTATION_RULE)}"
        )
    out = {k: float(v) for k, v in {**DEFAULT_SEGMENTATION_RULE, **(rule or {})}.items()}
    if not 0 < out["threshold"] < 1 or out["min_cluster_mm3"] < 0 or out["tta"] not in FLIP_COUNTS:
        raise ValueError(
            f"invalid segmentation rule {out}: need 0 < threshold < 1, min_cluster_mm3 >= 0 and "
            f"tta one of {FLIP_COUNTS}"
        )
    out["tta"] = int(out["tta"])
    return out


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in checkpoint metadata")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All tensors and the metadata of a checkpoint, verified; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist; pass the path of a .safetensors file "
            "written by napari-pvs (or 'default' for the bundled model)"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"{str(path)!r} is not a readable safetensors checkpoint (truncated or corrupt: "
            f"{exc}); re-copy or re-train it"
        ) from exc
    if METADATA_KEY not in header:
        raise ValueError(
            f"{str(path)!r} is a safetensors file but not a napari-pvs checkpoint (no "
            f"'{METADATA_KEY}' metadata); import plain state dicts with import_state_dict()"
        )
    try:
        meta = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} has corrupt checkpoint metadata: {exc}") from exc
    version = int(meta.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} uses checkpoint format {version}, newer than this napari-pvs "
            f"({__version__}) reads (format {FORMAT_VERSION}); upgrade napari-pvs"
        )
    if tensor_digest(tensors) != meta.get("tensor_digest"):
        raise ValueError(
            f"{str(path)!r} failed its integrity check: the weights do not match the digest "
            "recorded when it was saved (tampered or corrupted); do not use it"
        )
    return tensors, meta


def _model_from(tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: str):
    info = meta.get("model") or {}
    name, config = info.get("name"), dict(info.get("config") or {})
    if name not in list_models():
        raise ValueError(
            f"{source} holds a model {name!r} that this napari-pvs does not know "
            f"(known: {', '.join(list_models())}); upgrade napari-pvs"
        )
    if name == "cross_modal" and "prompt_embeddings" in tensors:
        config["prompt_embeddings"] = tensors["prompt_embeddings"]
    model = build_model(name, **config)
    _load_state(model, tensors, source)
    model.segmentation_rule = _segmentation_rule(meta.get("segmentation"))
    return model


def _load_state(model, tensors: dict[str, torch.Tensor], source: str) -> None:
    state = {k: v for k, v in tensors.items() if not k.startswith(OPTIMIZER_PREFIX)}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            details.append(
                f"{len(wrong)} with other shapes (e.g. {k}: {tuple(state[k].shape)} in the file, "
                f"{tuple(expected[k].shape)} in the model)"
            )
        raise ValueError(
            f"{source} does not fit the {model.name!r} model with config {model.config}: "
            f"{'; '.join(details)}. It was saved from a different architecture or configuration"
        )
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


def default_checkpoint_path() -> Path:
    """Where the bundled default checkpoint lives inside the installed package."""
    return Path(str(resources.files("napari_pvs") / "weights" / DEFAULT_CHECKPOINT))


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

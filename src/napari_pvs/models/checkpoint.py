"""Safe checkpoints: safetensors weights + JSON metadata, never a pickle.

A checkpoint is one ``.safetensors`` file. Its tensors are the model's state dict (the
cross-modal model's prompt embeddings included, as the ``prompt_embeddings`` buffer) and, in
resumable training checkpoints, the optimizer state under ``optimizer/``. Its header metadata
holds one JSON document (key ``napari_pvs``): format version, model name and config, prompt
texts, the intensity normalisation scheme, the training-data manifest hash, round, metrics,
package version and a SHA-256 digest of every tensor, so a tampered file is refused.

Loading treats the file as hostile until proven otherwise: the metadata must be a bounded
JSON object with sane types and values (:func:`check_metadata`), the model is first built on
PyTorch's ``meta`` device (no memory) and every tensor shape in the file's header compared with
it before anything real is allocated, the prompt embeddings must be stored (a text encoder is
never loaded, whatever path the config names), and only then are the weights read and verified.

Importing a user's ``.pt``/``.pth`` state dict goes only through
``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from napari_pvs import __version__, atomic
from napari_pvs.intensity import DEFAULT_PERCENTILES
from napari_pvs.models import (
    DEFAULT_SEGMENTATION_RULE,
    FLIP_COUNTS,
    MAX_MIN_CLUSTER_MM3,
    build_model,
    list_models,
    resolve_device,
)

#: Bump when the layout changes; readers refuse files from a newer format.
FORMAT_VERSION = 1
METADATA_KEY = "napari_pvs"
OPTIMIZER_PREFIX = "optimizer/"
DEFAULT_CHECKPOINT = "default.safetensors"

#: Bounds a checkpoint must respect before anything is built from it.
MAX_METADATA_BYTES = 8 << 20
MAX_METADATA_DEPTH = 32
#: Largest integer any model config value may hold (channel widths, filters, text dim...).
MAX_CONFIG_INT = 4096
MAX_CONFIG_LIST = 16
#: Largest model, in parameters (MedNeXt-L-k5 has about 63 M).
MAX_PARAMETERS = 500_000_000

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
        "segmentation": _segmentation_rule(
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


def _segmentation_rule(rule: Any, source: str | None = None) -> dict[str, float]:
    """A complete, checked segmentation rule (defaults filled in).

    ``source`` names the checkpoint in messages when the rule comes from a file.
    """
    where = f"{source}: " if source else ""
    if rule is not None and not isinstance(rule, dict):
        raise ValueError(f"{where}the segmentation rule must be a JSON object, got {rule!r}")
    unknown = set(rule or {}) - set(DEFAULT_SEGMENTATION_RULE)
    if unknown:
        raise ValueError(
            f"{where}unknown segmentation rule keys {sorted(unknown)}; "
            f"use {sorted(DEFAULT_SEGMENTATION_RULE)}"
        )
    merged = {**DEFAULT_SEGMENTATION_RULE, **(rule or {})}
    bad = [
        k
        for k, v in merged.items()
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(float(v))
    ]
    if bad:
        raise ValueError(
            f"{where}segmentation rule values must be finite numbers; got "
            + ", ".join(f"{k}={merged[k]!r}" for k in bad)
        )
    out = {k: float(v) for k, v in merged.items()}
    if (
        not 0 < out["threshold"] < 1
        or not 0 <= out["min_cluster_mm3"] <= MAX_MIN_CLUSTER_MM3
        or out["tta"] not in FLIP_COUNTS
    ):
        raise ValueError(
            f"{where}invalid segmentation rule {out}: need 0 < threshold < 1, "
            f"0 <= min_cluster_mm3 <= {MAX_MIN_CLUSTER_MM3:g} and tta one of {FLIP_COUNTS}"
        )
    out["tta"] = int(out["tta"])
    return out


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in checkpoint metadata")


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, iteratively (a hostile file cannot recurse us to death)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_METADATA_DEPTH:
            return level
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def _check_config(name: str, config: Any, source: str) -> dict[str, Any]:
    """A model config made of plain, bounded values (the model is built from it)."""
    if not isinstance(config, dict):
        raise ValueError(f"{source}: the model config must be a JSON object, got {config!r}")

    def bad(key: str, value: Any) -> ValueError:
        return ValueError(
            f"{source}: model config {key}={value!r} is out of bounds for a {name!r} model "
            f"(numbers must be finite, integers at most {MAX_CONFIG_INT}, lists at most "
            f"{MAX_CONFIG_LIST} long); the file is damaged or was not written by napari-pvs"
        )

    def check_scalar(key: str, value: Any) -> None:
        if value is None or isinstance(value, bool):
            return
        if isinstance(value, int):
            if abs(value) > MAX_CONFIG_INT:
                raise bad(key, value)
        elif isinstance(value, float):
            if not math.isfinite(value) or abs(value) > MAX_CONFIG_INT:
                raise bad(key, value)
        elif isinstance(value, str):
            if len(value) > 4096:
                raise bad(key, value[:40] + "...")
        else:
            raise bad(key, value)

    for key, value in config.items():
        if not isinstance(key, str) or key == "prompt_embeddings":
            raise bad(str(key), "...")
        if isinstance(value, list):
            if len(value) > MAX_CONFIG_LIST:
                raise bad(key, f"a list of {len(value)}")
            for item in value:
                check_scalar(key, item)
        else:
            check_scalar(key, value)
    return dict(config)


def check_metadata(meta: Any, source: str) -> dict[str, Any]:
    """Types and bounds of checkpoint metadata, before anything is built from it.

    It must be a JSON object of bounded depth with an integer ``format_version`` this version
    reads, a known model name with a plain bounded config (:func:`_check_config`), objects where
    objects are expected, and a sane segmentation rule. Raises ``ValueError`` naming the file.
    """
    if not isinstance(meta, dict):
        raise ValueError(
            f"{source} has checkpoint metadata that is a JSON {type(meta).__name__}, not an "
            "object; the file is damaged or was not written by napari-pvs"
        )
    if _depth(meta) > MAX_METADATA_DEPTH:
        raise ValueError(
            f"{source} has checkpoint metadata nested deeper than {MAX_METADATA_DEPTH} levels; "
            "the file is damaged or was not written by napari-pvs"
        )
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(
            f"{source} has an invalid checkpoint format_version {version!r} (expected an "
            f"integer such as {FORMAT_VERSION}); the file is damaged or was not written by "
            "napari-pvs"
        )
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{source} uses checkpoint format {version}, newer than this napari-pvs "
            f"({__version__}) reads (format {FORMAT_VERSION}); upgrade napari-pvs"
        )
    for key in ("training", "metrics", "prompts", "intensity"):
        if key in meta and meta[key] is not None and not isinstance(meta[key], dict):
            raise ValueError(f"{source}: checkpoint metadata {key!r} must be a JSON object")
    info = meta.get("model")
    if not isinstance(info, dict) or not isinstance(info.get("name"), str):
        raise ValueError(f"{source}: checkpoint metadata has no model name and config")
    if info["name"] not in list_models():
        raise ValueError(
            f"{source} holds a model {info['name']!r} that this napari-pvs does not know "
            f"(known: {', '.join(list_models())}); upgrade napari-pvs"
        )
    _check_config(info["name"], info.get("config") or {}, source)
    if not isinstance(meta.get("tensor_digest"), str):
        raise ValueError(f"{source}: checkpoint metadata has no tensor digest")
    _segmentation_rule(meta.get("segmentation"), source)
    return meta


def _parse_metadata(text: Any, source: str) -> dict[str, Any]:
    if not isinstance(text, str) or len(text) > MAX_METADATA_BYTES:
        raise ValueError(
            f"{source} has checkpoint metadata larger than {MAX_METADATA_BYTES >> 20} MB; the "
            "file is damaged or was not written by napari-pvs"
        )
    try:
        meta = json.loads(text)
    except RecursionError:
        raise ValueError(
            f"{source} has checkpoint metadata nested too deeply to read; the file is damaged "
            "or was not written by napari-pvs"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} has corrupt checkpoint metadata: {exc}") from exc
    return check_metadata(meta, source)


def _skeleton(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], source: str):
    """The model of ``meta`` built on the ``meta`` device (no memory), checked against the
    tensor shapes in the file's header: names, shapes and total size."""
    info = meta["model"]
    name, config = info["name"], dict(info.get("config") or {})
    if name == "cross_modal" and config.get("use_text", True):
        shape = shapes.get("prompt_embeddings")
        if shape is None:
            raise ValueError(
                f"{source} holds no prompt embeddings, which a text-guided cross_modal model "
                "needs; napari-pvs never loads a text encoder while loading a checkpoint. "
                "Re-save it with napari-pvs (the embeddings are stored in every checkpoint)"
            )
        if len(shape) != 3 or math.prod(shape) > 64 * MAX_CONFIG_INT * 4:
            raise ValueError(f"{source}: stored prompt embeddings have a bad shape {shape}")
        # the real values are not needed for shapes: a small zero tensor of the stored shape
        config["prompt_embeddings"] = np.zeros(shape, dtype=np.float32)
    try:
        with torch.device("meta"):
            skeleton = build_model(name, **config)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{source}: its model config cannot be built ({exc})") from exc
    parameters = sum(t.numel() for t in skeleton.state_dict().values())
    if parameters > MAX_PARAMETERS:
        raise ValueError(
            f"{source} declares a model of {parameters:,} parameters, more than the "
            f"{MAX_PARAMETERS:,} napari-pvs loads; the file is damaged or not a napari-pvs model"
        )
    _compare_state(skeleton, shapes, source)
    _check_optimizer_shapes(skeleton, shapes, source)
    return skeleton


#: Tensors the optimizer may keep per parameter (AdamW: step, exp_avg, exp_avg_sq).
MAX_OPTIMIZER_TENSORS_PER_PARAMETER = 4


def _check_optimizer_shapes(model, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Every ``optimizer/INDEX.KEY`` tensor is a scalar or has the shape of parameter INDEX.

    The optimizer state is read from the file like the weights, so its declared sizes are
    bounded by the model's before anything is allocated (a file declaring gigabytes of
    "optimizer state" is refused, not read).
    """
    parameters = [tuple(p.shape) for p in model.parameters()]
    per_index: dict[int, int] = {}
    for name, shape in shapes.items():
        if not name.startswith(OPTIMIZER_PREFIX):
            continue
        index_text, _, key = name[len(OPTIMIZER_PREFIX):].partition(".")
        if not index_text.isdigit() or not key or int(index_text) >= len(parameters):
            raise ValueError(
                f"{source} holds an optimizer tensor {name!r} that belongs to no parameter of "
                f"the {model.name!r} model ({len(parameters)} parameters); the file is damaged "
                "or was not written by napari-pvs"
            )
        index = int(index_text)
        per_index[index] = per_index.get(index, 0) + 1
        if math.prod(shape) > 1 and tuple(shape) != parameters[index]:
            raise ValueError(
                f"{source} holds an optimizer tensor {name!r} of shape {tuple(shape)}, but "
                f"parameter {index} has shape {parameters[index]}; the file is damaged or was "
                "not written by napari-pvs"
            )
        if per_index[index] > MAX_OPTIMIZER_TENSORS_PER_PARAMETER:
            raise ValueError(
                f"{source} holds more than {MAX_OPTIMIZER_TENSORS_PER_PARAMETER} optimizer "
                f"tensors for parameter {index}; the file is damaged or was not written by "
                "napari-pvs"
            )


def _compare_state(model, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Names and shapes of ``shapes`` (file) against ``model``'s state dict; clear error."""
    state = {k: v for k, v in shapes.items() if not k.startswith(OPTIMIZER_PREFIX)}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k] != tuple(state[k]))
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            details.append(
                f"{len(wrong)} with other shapes (e.g. {k}: {tuple(state[k])} in the file, "
                f"{expected[k]} in the model)"
            )
        raise ValueError(
            f"{source} does not fit the {model.name!r} model with config {model.config}: "
            f"{'; '.join(details)}. It was saved from a different architecture or configuration"
        )


def _read_header(path: Path, source: str) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """The checkpoint metadata and the declared tensor shapes, read from the file's header alone.

    A safetensors file starts with an 8-byte header length and a JSON header; reading it
    ourselves (bounded by :data:`MAX_METADATA_BYTES`) lets every declared size be checked
    before the file is mapped, so a header declaring terabytes is refused, not mapped.
    """
    not_safetensors = (
        f"{source} is not a readable safetensors checkpoint (truncated or corrupt header); "
        "re-copy or re-train it"
    )
    with open(path, "rb") as handle:
        length_bytes = handle.read(8)
        if len(length_bytes) != 8:
            raise ValueError(not_safetensors)
        length = int.from_bytes(length_bytes, "little")
        if length > 2 * MAX_METADATA_BYTES:
            raise ValueError(
                f"{source} is not a readable safetensors checkpoint: its header declares "
                f"{length:,} bytes, more than napari-pvs reads (damaged, or not written by "
                "napari-pvs); re-copy or re-train it"
            )
        text = handle.read(length)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError(not_safetensors) from None
    if not isinstance(header, dict):
        raise ValueError(not_safetensors)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or METADATA_KEY not in metadata:
        raise ValueError(
            f"{source} is a safetensors file but not a napari-pvs checkpoint (no "
            f"'{METADATA_KEY}' metadata); import plain state dicts with import_state_dict()"
        )
    shapes = {}
    for name, info in header.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise ValueError(not_safetensors)
        shapes[name] = tuple(shape)
    return _parse_metadata(metadata[METADATA_KEY], source), shapes


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
    meta, shapes = _read_header(path, source)
    _skeleton(meta, shapes, source)
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
    model.segmentation_rule = _segmentation_rule(meta.get("segmentation"), source)
    return model


def _load_state(model, tensors: dict[str, torch.Tensor], source: str) -> None:
    _compare_state(model, {k: tuple(v.shape) for k, v in tensors.items()}, source)
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

"""What a checkpoint must satisfy before anything is built from it.

A checkpoint is treated as hostile until proven otherwise: its safetensors header is read by
hand (bounded), its metadata must be a bounded JSON object with sane types and values, and the
model it declares is built on PyTorch's ``meta`` device (no memory) and every declared tensor
shape, optimizer state included, compared with it, all before the file is mapped or a tensor
read. :mod:`napari_pvs.models.checkpoint` reads and writes checkpoints through these checks.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from napari_pvs import __version__, atomic
from napari_pvs.models import (
    DEFAULT_SEGMENTATION_RULE,
    FLIP_COUNTS,
    MAX_MIN_CLUSTER_MM3,
    build_model,
    list_models,
)

#: Bump when the layout changes; readers refuse files from a newer format.
FORMAT_VERSION = 1
METADATA_KEY = "napari_pvs"
OPTIMIZER_PREFIX = "optimizer/"

#: Bounds a checkpoint must respect before anything is built from it.
MAX_METADATA_BYTES = 8 << 20
MAX_METADATA_DEPTH = 32
#: Largest integer any model config value may hold (channel widths, filters, text dim...).
MAX_CONFIG_INT = 4096
MAX_CONFIG_LIST = 16
#: Largest model, in parameters (MedNeXt-L-k5 has about 63 M).
MAX_PARAMETERS = 500_000_000


def checked_segmentation_rule(rule: Any, source: str | None = None) -> dict[str, float]:
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


def check_config(name: str, config: Any, source: str) -> dict[str, Any]:
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
    check_config(info["name"], info.get("config") or {}, source)
    if not isinstance(meta.get("tensor_digest"), str):
        raise ValueError(f"{source}: checkpoint metadata has no tensor digest")
    checked_segmentation_rule(meta.get("segmentation"), source)
    return meta


def parse_metadata(text: Any, source: str) -> dict[str, Any]:
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


def model_skeleton(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], source: str):
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
    import torch  # here: reading a header stays torch-free (ranking, argument checks)

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
    compare_state(skeleton, shapes, source)
    check_optimizer_shapes(skeleton, shapes, source)
    return skeleton


#: Tensors the optimizer may keep per parameter (AdamW: step, exp_avg, exp_avg_sq).
MAX_OPTIMIZER_TENSORS_PER_PARAMETER = 4


def check_optimizer_shapes(model, shapes: dict[str, tuple[int, ...]], source: str) -> None:
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


def compare_state(model, shapes: dict[str, tuple[int, ...]], source: str) -> None:
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


def read_header(path: Path, source: str) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
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
    return parse_metadata(metadata[METADATA_KEY], source), shapes


def manifest_hash(items: list[dict[str, Any]] | list[str]) -> str:
    """A stable hash of the training data's description (paths, seeds, patch boxes)."""
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()


#: What the bundled checkpoint's SHA-256 is kept in, beside it (``default.safetensors.sha256``).
BUNDLED_DIGEST_SUFFIX = ".sha256"


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_bundled_digest(path: Path) -> Path:
    """Record ``path``'s SHA-256 beside it: the bundled checkpoint's, when it is (re)made."""
    target = path.with_name(path.name + BUNDLED_DIGEST_SUFFIX)
    atomic.write_text(target, file_sha256(path) + "\n", overwrite=True)  # follows the file
    return target


def bundled_metadata(path: Path) -> dict[str, Any] | None:
    """The metadata of a bundled checkpoint whose bytes are exactly those shipped (its SHA-256
    equals the one recorded beside it), read from its header alone; None when there is no
    record or the bytes differ (the caller then verifies it in full).

    Full verification (:func:`napari_pvs.models.checkpoint.read_checkpoint`) builds the model
    and reads every tensor: it imports torch and torch-geometric, whose imports held the GIL,
    and so napari's GUI thread, for 0.1-0.2 s at a time while a new project was created. The
    bundled file is the one napari-pvs ships and its tests load in full; the digest proves it
    is still that file.
    """
    record = path.with_name(path.name + BUNDLED_DIGEST_SUFFIX)
    try:
        expected = record.read_text().strip()
    except OSError:
        return None
    return _header_if_digest(path, expected) if expected else None


def _header_if_digest(path: Path, sha256: str) -> dict[str, Any] | None:
    """The metadata from ``path``'s header when its bytes have SHA-256 ``sha256`` (the file a
    full verification read), else None."""
    if file_sha256(path) != sha256:
        return None
    return read_header(path, repr(str(path)))[0]


def metadata_if_unchanged(path: Path, sha256: str) -> dict[str, Any]:
    """The metadata of a checkpoint that another process verified in full and digested
    (``sha256``), read from its header alone once its bytes are shown to be those same bytes.

    A round's worker writes the new version, reads it back through
    :func:`napari_pvs.models.checkpoint.read_checkpoint` and reports its SHA-256; the project's
    process (napari's, for a round started there) commits it after this check instead of a
    second full read, which would import torch and torch-geometric there only for that.
    Raises ``ValueError`` when the file changed since.
    """
    metadata = _header_if_digest(path, sha256)
    if metadata is None:
        raise ValueError(
            f"checkpoint {str(path)!r} changed after the round's worker verified it (its "
            "SHA-256 differs); it is not made a version. Run the round again"
        )
    return metadata

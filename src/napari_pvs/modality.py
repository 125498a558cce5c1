"""Which MRI contrast a volume is (T1 or T2), from the image itself, then from its name.

The model segments PVS by a rule that depends on the contrast (dark tubes on T1, bright on T2),
and a wrong or missing modality fails quietly (a held-out T1 ``case_1.nii.gz`` scored Dice 0.03
as "unknown" and 0.74 as T1). So a volume's modality is never left "unknown" in silence: this
module guesses it, with a confidence, and callers ask (GUI) or stop with a sentence (CLI) when
no guess is confident.

The image test is the anatomy's: white matter lies deep in the brain and is the brightest
tissue on T1 and the darkest on T2, while the brain's outer layer (grey matter and sulcal CSF)
is darker than white matter on T1 and brighter on T2. On a bounded strided sample, smoothed by
2x2x2 block means so noise does not decide, the head is separated from the background (a cut
halfway between the noise floor and the typical tissue), and the median intensity of its
outer third (by depth in mm from the head's surface) is compared with that of its deepest
third: ``log(outer / deep)`` is negative on T1 and positive on T2. Medians keep the ventricles
(CSF deep inside) and bright lesions from deciding. On phantoms of both contrasts with low SNR,
bias fields, thick slices, MNI anatomy and weak CSF contrast the score stays beyond +-0.04,
and beyond +-0.2 on most (``tests/test_modality.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_pvs.intensity import strided_sample

#: Voxels read at most (strided), whatever the volume's size: ~0.05 s at 256^3.
MAX_SAMPLE_VOXELS = 1_200_000
#: |log(outer / deep)| that gives confidence 1 - 1/e; 0.1 is about a 10% intensity difference.
SCORE_SCALE = 0.1
#: A guess at or above this confidence is used without asking.
CONFIDENT = 0.5
#: Confidence given to a BIDS-like hint in the file name ("_T1w", "_T2w") on its own.
NAME_CONFIDENCE = 0.6

_MODALITY_WORDS = ("T1", "T2")


@dataclass(frozen=True)
class ModalityGuess:
    """A volume's contrast: ``modality`` ("T1", "T2" or "unknown"), 0..1 ``confidence``, why."""

    modality: str
    confidence: float
    reason: str

    @property
    def confident(self) -> bool:
        """Whether the guess may be used without asking the user."""
        return self.modality in _MODALITY_WORDS and self.confidence >= CONFIDENT


def contrast_score(
    data, spacing: Sequence[float] = (1.0, 1.0, 1.0), max_voxels: int = MAX_SAMPLE_VOXELS
) -> float:
    """``log(median outer / median deep)`` of the head: < 0 on T1, > 0 on T2 (see the module).

    ``data`` is any 3D numpy, dask or zarr array; at most about ``max_voxels`` are read.
    Raises ``ValueError`` when the volume has no head to measure (constant, too small, NaN).
    """
    from scipy import ndimage

    if len(data.shape) != 3:
        raise ValueError(f"the modality test needs a 3D volume, got shape {tuple(data.shape)}")
    full = tuple(int(s) for s in data.shape)
    sample = strided_sample(data, max_voxels).astype(np.float64, copy=False)
    step = [max(1, math.ceil(f / s)) for f, s in zip(full, sample.shape, strict=True)]
    blocks = _block_means(sample, edge=2)
    if min(blocks.shape) < 4:
        raise ValueError(f"the volume {full} is too small to tell its contrast")
    if not np.all(np.isfinite(blocks)):
        raise ValueError("the volume contains NaN or infinite voxels")
    floor, top = np.percentile(blocks, [2.0, 99.5])
    if not top > floor:
        raise ValueError("the volume is constant")
    tissue = float(np.median(blocks[blocks > floor + 0.2 * (top - floor)]))
    head = _largest_component(blocks > floor + 0.5 * (tissue - floor), ndimage)
    head = ndimage.binary_fill_holes(head)
    grid_mm = [float(s) * st * 2 for s, st in zip(spacing, step, strict=True)]
    depth = ndimage.distance_transform_edt(head, sampling=grid_mm)
    inside = depth[head]
    outer_cut, deep_cut = np.percentile(inside, [100 / 3, 200 / 3])
    outer = blocks[head & (depth <= outer_cut)]
    deep = blocks[head & (depth >= deep_cut)]
    if outer.size < 8 or deep.size < 8 or not deep_cut > outer_cut:
        raise ValueError("the head in this volume is too small to tell its contrast")
    outer_level, deep_level = float(np.median(outer)), float(np.median(deep))
    if not (outer_level > 0 and deep_level > 0):
        raise ValueError("the volume's head has no positive intensities")
    return math.log(outer_level / deep_level)


def _block_means(sample: np.ndarray, edge: int) -> np.ndarray:
    """Means of ``edge``^3 blocks (the trailing partial blocks dropped): noise shrinks ~edge^1.5."""
    shape = [s // edge for s in sample.shape]
    trimmed = sample[tuple(slice(0, s * edge) for s in shape)]
    return trimmed.reshape(shape[0], edge, shape[1], edge, shape[2], edge).mean(axis=(1, 3, 5))


def _largest_component(mask: np.ndarray, ndimage) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))


def modality_hint(name: str | Path | None = None, header: str | None = None) -> str:
    """"T1"/"T2" from a BIDS-like file name ("sub-01_T2w.nii.gz") or a header text, else ""."""
    from napari_pvs.io import modality_from_name

    if header and str(header).strip().upper().rstrip("W") in _MODALITY_WORDS:
        return str(header).strip().upper().rstrip("W")
    for text in (name, header):
        if text:
            hint = modality_from_name(Path(str(text)).name)
            if hint in _MODALITY_WORDS:
                return hint
    return ""


def guess_modality(
    data,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    name: str | Path | None = None,
    header: str | None = None,
) -> ModalityGuess:
    """The contrast of ``data``: from the image first, then the file ``name`` or ``header``.

    A confident image test wins (a name that disagrees halves its confidence and is named in
    the reason); an unsure one defers to a name hint; without either the image's weak guess
    comes back with its low confidence, so callers can ask.
    """
    hint = modality_hint(name, header)
    try:
        score = contrast_score(data, spacing)
    except ValueError as error:
        if hint:
            return ModalityGuess(hint, NAME_CONFIDENCE, f"from the name (image: {error})")
        return ModalityGuess("unknown", 0.0, f"the image could not tell: {error}")
    image = "T2" if score > 0 else "T1"
    confidence = 1.0 - math.exp(-abs(score) / SCORE_SCALE)
    tissue = "brighter" if score > 0 else "darker"
    reason = (
        f"the brain's outer layer is {tissue} than deep white matter "
        f"(log ratio {score:+.2f}), as on {image}"
    )
    if confidence >= CONFIDENT:
        if hint and hint != image:
            return ModalityGuess(image, confidence / 2, f"{reason}; the name says {hint}")
        return ModalityGuess(image, confidence, reason + ("; the name agrees" if hint else ""))
    if hint:
        return ModalityGuess(hint, NAME_CONFIDENCE, f"from the name; the image is unsure: {reason}")
    return ModalityGuess(image, confidence, f"unsure: {reason}")


def guess_volume_modality(path: str | Path) -> ModalityGuess:
    """:func:`guess_modality` of a volume file (NIfTI, zarr, OME-Zarr), from a bounded sample.

    What the file itself says (our zarr attributes, else its name) is the hint.
    """
    from napari_pvs import io

    volume = io.open_volume(path)
    return guess_modality(volume.data, volume.spacing, name=path, header=volume.modality)

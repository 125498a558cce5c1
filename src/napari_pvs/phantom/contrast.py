"""MR-like intensities: tissue contrast, texture, partial volume, bias field, Rician noise."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from napari_pvs.phantom.anatomy import axis_coords
from napari_pvs.phantom.confounders import Confounders
from napari_pvs.phantom.maps import (
    BASAL_GANGLIA,
    CONFOUNDER_NAMES,
    CSF,
    GREY_MATTER,
    LACUNE,
    VESSEL,
    WHITE_MATTER,
    WMH,
)

#: Tissue intensity relative to white matter, per modality (CSF range is drawn per phantom).
TISSUE_CONTRAST = {
    "T2": {WHITE_MATTER: 1.0, BASAL_GANGLIA: 1.2, GREY_MATTER: 1.4},
    "T1": {WHITE_MATTER: 1.0, BASAL_GANGLIA: 0.82, GREY_MATTER: 0.68},
}

#: CSF-like (PVS, lacune, ventricle) contrast range relative to white matter.
_CSF_RATIO_RANGE = {"T2": (2.4, 3.6), "T1": (0.35, 0.5)}

#: White-matter hyperintensity and vessel (flow void) contrast relative to white matter.
_WMH_RATIO = {"T2": 1.9, "T1": 0.8}

_VESSEL_RATIO = {"T2": 0.25, "T1": 0.2}

#: Tissue texture: correlation length (mm) and relative amplitude (standard deviation).
_TEXTURE_MM, _TEXTURE_AMPLITUDE = 1.5, 0.04


def compose_image(
    regions: np.ndarray,
    modality: str,
    conf: Confounders,
    pvs_fraction: np.ndarray,
    spacing,
    rng,
    bias_field: bool,
    snr: float,
    csf_ratio: float | None = None,
    bias_strength: float = 1.0,
) -> tuple[np.ndarray, float]:
    """MR-like intensities: tissue contrast with partial volume and texture, confounders and PVS
    mixed in by their partial volume, then bias field and Rician noise. Returns (image, CSF/WM).

    ``csf_ratio`` replaces the drawn CSF/PVS contrast (the draw is still made, so everything
    else about the phantom stays the same); ``bias_strength`` scales the bias field's
    amplitude (1: the usual +-8-18%)."""
    shape = regions.shape
    drawn = float(rng.uniform(*_CSF_RATIO_RANGE[modality]))
    csf_ratio = drawn if csf_ratio is None else float(csf_ratio)
    lut = np.zeros(5, dtype=np.float32)
    for label, value in TISSUE_CONTRAST[modality].items():
        lut[label] = value
    lut[CSF] = csf_ratio
    # Blurring the tissue map gives partial volume at tissue borders.
    image = ndimage.gaussian_filter(lut[regions], sigma=[0.5 / max(sp, 0.5) for sp in spacing])
    # Tissue texture: smooth +-few-percent fluctuations, so that tissue is not perfectly flat
    # and noise-sized specks compete with small PVS as in real scans.
    texture = ndimage.gaussian_filter(
        rng.standard_normal(shape, dtype=np.float32), sigma=[_TEXTURE_MM / sp for sp in spacing]
    )
    texture *= np.float32(_TEXTURE_AMPLITUDE / max(float(texture.std()), 1e-6))
    image *= 1.0 + texture * (regions != CSF)
    del texture
    conf_value = np.zeros(len(CONFOUNDER_NAMES) + 1, dtype=np.float32)
    conf_value[LACUNE] = csf_ratio
    conf_value[WMH] = _WMH_RATIO[modality]
    conf_value[VESSEL] = _VESSEL_RATIO[modality]
    image += conf.fraction * (conf_value[conf.owner] - image)
    image += pvs_fraction * (np.float32(csf_ratio) - image)
    image *= (regions > 0) | (image > 0.05)
    if bias_field:
        image *= _bias_field(shape, spacing, rng, bias_strength)
    if math.isfinite(snr):
        sigma = np.float32(1.0 / snr)
        noise_re = rng.standard_normal(shape, dtype=np.float32) * sigma
        noise_im = rng.standard_normal(shape, dtype=np.float32) * sigma
        image = np.sqrt((image + noise_re) ** 2 + noise_im**2)
    return image.astype(np.float32, copy=False), csf_ratio


def _bias_field(shape, spacing, rng, strength: float = 1.0) -> np.ndarray:
    """Smooth multiplicative field (about +-8-18% times ``strength`` in log intensity) from a
    few long-wavelength cosines; the draws do not depend on ``strength``."""
    z, y, x = axis_coords(shape, spacing)
    extent = float(np.max(np.array(shape) * np.array(spacing)))
    log_field = np.zeros(shape, dtype=np.float32)
    amplitude = rng.uniform(0.08, 0.18) * float(strength)
    for _ in range(3):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        k = (2 * np.pi / (extent * rng.uniform(1.2, 2.5))) * d.astype(np.float32)
        log_field += np.float32(amplitude / 3 * 2) * np.cos(
            k[0] * z + k[1] * y + k[2] * x + np.float32(rng.uniform(0, 2 * np.pi))
        )
    return np.exp(log_field)

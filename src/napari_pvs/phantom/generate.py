"""The phantom generator: :func:`make_phantom` and the :class:`Phantom` it returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from napari_pvs.io import check_spacing, normalize_modality
from napari_pvs.phantom.anatomy import REFERENCE_BRAIN_MM3, mni_anatomy, procedural_anatomy
from napari_pvs.phantom.confounders import Confounders, place_confounders
from napari_pvs.phantom.contrast import TISSUE_CONTRAST, compose_image
from napari_pvs.phantom.maps import BASAL_GANGLIA, GREY_MATTER, REGION_NAMES, WHITE_MATTER
from napari_pvs.phantom.placement import Placer
from napari_pvs.phantom.pvs import PlacedPVS, place_pvs, pvs_count


@dataclass
class Phantom:
    """A synthetic volume and its ground truth, all arrays ``(z, y, x)`` of the same shape."""

    image: np.ndarray  #: float32 MR-like intensities (white matter about 1 before bias/noise)
    pvs: np.ndarray  #: uint8 0/1 ground truth (PVS fraction >= 0.5 plus every centreline voxel)
    pvs_instances: np.ndarray  #: uint16, one label per PVS (0 = background)
    pvs_fraction: np.ndarray  #: float32 partial-volume fraction of PVS in each voxel
    regions: np.ndarray  #: uint8, see :data:`REGION_NAMES` (0 = outside the brain)
    confounders: np.ndarray  #: uint8, see :data:`CONFOUNDER_NAMES`
    spacing: tuple[float, float, float]  #: voxel size in mm, (z, y, x)
    modality: str  #: "T1" or "T2"
    meta: dict = field(
        default_factory=dict
    )  #: JSON-able: seed, severity, snr, counts, per-PVS table


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        dims = tuple(int(s) for s in shape)
    except TypeError as exc:
        raise ValueError(f"shape must be three integers (z, y, x), got {shape!r}") from exc
    if len(dims) != 3 or min(dims) < 8:
        raise ValueError(
            f"shape must be three integers (z, y, x), each at least 8, got {shape!r}; "
            "a phantom is a 3D volume, e.g. shape=(64, 80, 64)"
        )
    return dims  # type: ignore[return-value]


def _phantom_modality(modality: str) -> str:
    """``"T1"`` or ``"T2"`` (any spelling :func:`napari_pvs.io.normalize_modality` accepts)."""
    key = normalize_modality(modality)
    if key not in ("T1", "T2"):
        raise ValueError(f"a phantom needs modality 'T1' or 'T2', got {modality!r}")
    return key


def make_phantom(
    shape: tuple[int, int, int] = (64, 80, 64),
    spacing: float | tuple[float, float, float] = 2.0,
    modality: str = "T2",
    seed: int = 0,
    severity: float = 0.5,
    anatomy: str = "procedural",
    snr: float | None = None,
    bias_field: bool = True,
    bias_strength: float = 1.0,
    n_pvs: int | None = None,
    confounders: bool = True,
    csf_ratio: float | None = None,
    pvs_diameter_mm: float | None = None,
    pvs_per_brain: float | None = None,
) -> Phantom:
    """Make a synthetic brain volume with PVS and their exact ground truth.

    ``severity`` (0..1) sets the PVS burden: 20 to 300 PVS per adult-size brain, scaled by the
    brain volume in the field of view (``n_pvs`` overrides it). ``snr`` is the white-matter
    signal over the Rician noise sigma (default drawn from 15..60; ``math.inf`` disables noise).
    ``csf_ratio`` fixes the CSF-like (PVS, lacune, ventricle) intensity relative to white matter
    (default drawn from 2.4..3.6 on T2w, 0.35..0.5 on T1w); ``pvs_diameter_mm`` moves the median
    PVS diameter (default 1.4 mm); ``pvs_per_brain`` replaces severity's 20..300 PVS per
    adult-size brain (still scaled by the brain volume; ``n_pvs`` overrides it), so PVS can be
    denser than any severity gives; ``bias_strength`` scales the bias field's amplitude (1: the
    usual +-8-18%; another scanner's coil might give 2-3x). These exist to make data unlike the
    default model's training data. The same arguments and ``seed`` always give the same phantom.
    """
    shape = _check_shape(shape)
    spacing = check_spacing(spacing)
    modality = _phantom_modality(modality)
    _check_options(severity, anatomy, snr, n_pvs, pvs_per_brain, csf_ratio, pvs_diameter_mm)
    if not float(bias_strength) >= 0:
        raise ValueError(f"bias_strength must be >= 0 (1: the usual field), got {bias_strength!r}")

    rng = np.random.default_rng(seed)
    snr_value = float(rng.uniform(15, 60)) if snr is None else float(snr)
    anat = (
        procedural_anatomy(shape, spacing, rng)
        if anatomy == "procedural"
        else mni_anatomy(shape, spacing)
    )
    regions = anat.regions
    brain_mm3 = _brain_volume_mm3(regions, spacing)
    brain_scale = (brain_mm3 / REFERENCE_BRAIN_MM3) ** (1 / 3)

    placer = Placer(shape, spacing)
    conf = place_confounders(placer, anat, float(severity), brain_scale, rng, confounders)
    target = pvs_count(float(severity), brain_mm3, pvs_per_brain) if n_pvs is None else int(n_pvs)
    pvs = place_pvs(placer, anat, target if brain_mm3 > 0 else 0, rng, pvs_diameter_mm)
    del placer
    image, csf_ratio = compose_image(
        regions, modality, conf, pvs.fraction, spacing, rng, bias_field, snr_value, csf_ratio,
        bias_strength,
    )  # fmt: skip
    settings = {
        "seed": int(seed),
        "severity": float(severity),
        "snr": snr_value,
        "anatomy": anatomy,
        "bias_field": bool(bias_field),
        "bias_strength": float(bias_strength),
    }
    return Phantom(
        image=image,
        pvs=pvs.mask,
        pvs_instances=pvs.instances,
        pvs_fraction=pvs.fraction,
        regions=regions,
        confounders=conf.labels,
        spacing=spacing,
        modality=modality,
        meta=_phantom_meta(settings, modality, csf_ratio, target, pvs, conf, brain_mm3),
    )


def _check_options(
    severity: float,
    anatomy: str,
    snr: float | None,
    n_pvs: int | None,
    pvs_per_brain: float | None,
    csf_ratio: float | None,
    pvs_diameter_mm: float | None,
) -> None:
    """Refuse :func:`make_phantom` options out of range, naming the option."""
    if not 0.0 <= float(severity) <= 1.0:
        raise ValueError(f"severity must be between 0 and 1, got {severity!r}")
    if anatomy not in ("procedural", "mni"):
        raise ValueError(f"anatomy must be 'procedural' or 'mni', got {anatomy!r}")
    if snr is not None and not float(snr) > 0:
        raise ValueError(f"snr must be positive (or None for a random 15..60), got {snr!r}")
    if n_pvs is not None and int(n_pvs) < 0:
        raise ValueError(f"n_pvs must be >= 0, got {n_pvs!r}")
    if pvs_per_brain is not None and not float(pvs_per_brain) >= 0:
        raise ValueError(f"pvs_per_brain must be >= 0 (or None), got {pvs_per_brain!r}")
    if csf_ratio is not None and not float(csf_ratio) > 0:
        raise ValueError(f"csf_ratio must be positive (or None to draw it), got {csf_ratio!r}")
    if pvs_diameter_mm is not None and not float(pvs_diameter_mm) > 0:
        raise ValueError(
            f"pvs_diameter_mm must be positive (or None for 1.4 mm), got {pvs_diameter_mm!r}"
        )


def _brain_volume_mm3(regions: np.ndarray, spacing) -> float:
    """Parenchyma (white matter, basal ganglia, grey matter) volume: what PVS counts scale with."""
    parenchyma = np.isin(regions, (WHITE_MATTER, BASAL_GANGLIA, GREY_MATTER))
    return float(parenchyma.sum()) * float(np.prod(spacing))


def _phantom_meta(
    settings: dict,
    modality: str,
    csf_ratio: float,
    target: int,
    pvs: PlacedPVS,
    conf: Confounders,
    brain_mm3: float,
) -> dict:
    """The JSON-able record of a phantom: ``settings`` (seed, severity, the SNR used, anatomy,
    bias field), contrast, counts and the per-PVS table."""
    n_bg = sum(1 for row in pvs.table if row["region"] == "basal_ganglia")
    return {
        **settings,
        "contrast": {
            "csf_pvs_over_wm": csf_ratio,
            **{REGION_NAMES[k]: v for k, v in TISSUE_CONTRAST[modality].items()},
        },
        "counts": {
            "pvs": len(pvs.table),
            "pvs_requested": target,
            "pvs_white_matter": len(pvs.table) - n_bg,
            "pvs_basal_ganglia": n_bg,
            **conf.counts,
        },
        "brain_volume_mm3": brain_mm3,
        "pvs_table": pvs.table,
    }

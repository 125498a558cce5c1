"""Phantoms set outside the bundled default model's training distribution, for benchmarks.

Users fine-tune the bundled model on their own scans, which never look like its training
phantoms. To measure that realistically, :func:`make_benchmark_data` writes pool and test
volumes (OME-Zarr with ``labels/pvs`` and ``labels/regions``) from a preset that moves every
axis the default model was trained on: contrast, noise, voxel size and anisotropy, PVS
diameter and density. :func:`describe_shift` says how far outside, axis by axis.

The training distribution (``benchmarks/train_default.py``, README "Bundled default model"):
T1w and T2w phantoms, procedural and MNI152 anatomy, severities 0.2-0.9 (76-272 PVS per
adult-size brain), SNR 15-60, voxel edges 0.9-1.6 mm with at most 1.6:1 anisotropy, median PVS
diameter 1.4 mm, CSF/PVS contrast 2.4-3.6 x white matter (T2w) or 0.35-0.5 (T1w). Seeds used
here (60 000 and up) are used by no other benchmark or training run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from napari_pvs.progress import CancelToken, ProgressCallback, check_cancelled, no_progress

#: What the bundled default model was trained on (see the module notes).
TRAINING_DISTRIBUTION: dict[str, Any] = {
    "modalities": ["T1", "T2"],
    "csf_ratio": {"T2": (2.4, 3.6), "T1": (0.35, 0.5)},
    "snr": (15.0, 60.0),
    "voxel_edge_mm": (0.9, 1.6),
    "anisotropy": 1.6,
    "pvs_diameter_median_mm": 1.4,
    "pvs_per_brain": (76.0, 272.0),
    "bias_strength": 1.0,
}

#: Data presets: keyword arguments of :func:`napari_pvs.phantom.make_phantom`, and the shape in
#: voxels where it is not :data:`DEFAULT_SHAPE` (a head's field of view at the preset's voxels).
PRESETS: dict[str, dict[str, Any]] = {
    # Thick-slice, low-contrast, noisy T2w with many thin PVS: outside on every axis.
    "shifted": {
        "modality": "T2",
        "spacing": (2.0, 0.8, 0.8),
        "snr": 10.0,
        "csf_ratio": 1.8,
        "pvs_diameter_mm": 0.9,
        "pvs_per_brain": 600.0,
        "severity": 1.0,
        "anatomy": "procedural",
    },
    # T1w from another site: thick slices, low SNR, a strong bias field; the PVS themselves and
    # their contrast as trained. The bundled model's errors here are false clusters more than
    # missed ones (test-1, one pass: cluster precision 0.48, recall 0.57, Dice 0.44).
    "site-t1": {
        "shape": (68, 192, 160),
        "modality": "T1",
        "spacing": (2.5, 0.9, 0.9),
        "snr": 14.0,
        "bias_strength": 2.5,
        "severity": 0.6,
        "anatomy": "procedural",
    },
    # The same anatomy and PVS, imaged like the training data: a reference point.
    "in-distribution": {
        "modality": "T2",
        "spacing": (1.0, 1.0, 1.0),
        "snr": 30.0,
        "severity": 0.6,
        "anatomy": "procedural",
    },
}
DEFAULT_SHAPE = (160, 192, 160)
POOL_SEED_BASE = 60_000
TEST_SEED_BASE = 61_000


def describe_shift(preset: str | dict[str, Any]) -> list[str]:
    """One line per axis: the preset's value against the training range, and how far off."""
    params = PRESETS[preset] if isinstance(preset, str) else dict(preset)
    train = TRAINING_DISTRIBUTION
    modality = params.get("modality", "T2")
    lines = []

    def outside(value: float, low: float, high: float) -> str:
        if value < low:
            return f"{(low - value) / low:.0%} below the lowest"
        if value > high:
            return f"{(value - high) / high:.0%} above the highest"
        return "inside"

    if params.get("csf_ratio") is not None:
        low, high = train["csf_ratio"][modality]
        lines.append(
            f"contrast: PVS/CSF {params['csf_ratio']:g} x white matter on {modality}w "
            f"(trained {low:g}-{high:g}): {outside(params['csf_ratio'], low, high)}"
        )
    if params.get("snr") is not None:
        low, high = train["snr"]
        lines.append(
            f"noise: SNR {params['snr']:g} (trained {low:g}-{high:g}): "
            f"{outside(params['snr'], low, high)}"
        )
    spacing = params.get("spacing", 2.0)
    edges = (float(spacing),) * 3 if not isinstance(spacing, Sequence) else tuple(spacing)
    low, high = train["voxel_edge_mm"]
    anisotropy = max(edges) / min(edges)
    lines.append(
        f"resolution: voxels {' x '.join(f'{e:g}' for e in edges)} mm (trained edges "
        f"{low:g}-{high:g} mm): thickest {outside(max(edges), low, high)}, finest "
        f"{outside(min(edges), low, high)}; anisotropy {anisotropy:.2g}:1 (trained at most "
        f"{train['anisotropy']:g}:1)"
    )
    if params.get("pvs_diameter_mm") is not None:
        median = train["pvs_diameter_median_mm"]
        lines.append(
            f"PVS diameter: median {params['pvs_diameter_mm']:g} mm (trained {median:g} mm): "
            f"{(median - params['pvs_diameter_mm']) / median:.0%} thinner"
        )
    if params.get("pvs_per_brain") is not None:
        low, high = train["pvs_per_brain"]
        lines.append(
            f"PVS density: {params['pvs_per_brain']:g} per adult-size brain (trained "
            f"{low:g}-{high:g}): {outside(params['pvs_per_brain'], low, high)}"
        )
    if params.get("bias_strength") is not None:
        times = params["bias_strength"] / train["bias_strength"]
        lines.append(
            f"bias field: {times:g}x the trained amplitude (trained +-8-18%, here "
            f"+-{8 * times:.0f}-{18 * times:.0f}%)"
        )
    return lines


def make_benchmark_data(
    out: str | Path,
    *,
    preset: str = "shifted",
    shape: Sequence[int] | None = None,
    pool: int = 2,
    test: int = 1,
    overwrite: bool = False,
    progress: ProgressCallback = no_progress,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Write ``pool`` + ``test`` phantoms of ``preset`` under ``out`` and a ``data.json``.

    ``shape`` (voxels) defaults to the preset's, else :data:`DEFAULT_SHAPE`.
    Files: ``pool-<i>.zarr`` and ``test-<i>.zarr`` (OME-Zarr: image, ``labels/pvs``,
    ``labels/regions``). Returns the description also written to ``data.json``: paths,
    parameters, the shift lines and each phantom's counts.
    """
    from napari_pvs import atomic, io
    from napari_pvs.phantom import make_phantom

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if pool < 1 or test < 1:
        raise ValueError(f"need at least one pool and one test volume, got {pool} and {test}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose a new folder or pass overwrite")
    out.mkdir(parents=True, exist_ok=True)
    params = dict(PRESETS[preset])
    preset_shape = params.pop("shape", DEFAULT_SHAPE)
    shape = tuple(int(s) for s in (shape or preset_shape))
    cases = [("pool", i, POOL_SEED_BASE + i) for i in range(1, pool + 1)]
    cases += [("test", i, TEST_SEED_BASE + i) for i in range(1, test + 1)]
    written: dict[str, list] = {"pool": [], "test": []}
    phantoms = []
    for done, (kind, index, seed) in enumerate(cases):
        check_cancelled(cancel)
        progress(done, len(cases), f"phantom {kind}-{index}")
        phantom = make_phantom(shape, seed=seed, **params)
        path = out / f"{kind}-{index}.zarr"
        io.save_ome_zarr(
            path,
            phantom.image,
            phantom.spacing,
            labels={"pvs": phantom.pvs, "regions": phantom.regions},
            modality=phantom.modality,
            overwrite=overwrite,
        )
        written[kind].append(str(path))
        summary = {k: v for k, v in phantom.meta.items() if k != "pvs_table"}
        phantoms.append({"path": str(path), "pvs_voxels": int(phantom.pvs.sum()), **summary})
    progress(len(cases), len(cases), "phantoms written")
    description = {
        "preset": preset,
        "parameters": {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()},
        "shape": [int(s) for s in shape],
        "shift": describe_shift(preset),
        "training_distribution": TRAINING_DISTRIBUTION,
        "pool": written["pool"],
        "test": written["test"],
        "phantoms": phantoms,
    }
    atomic.write_text(out / "data.json", json.dumps(description, indent=1))
    return description

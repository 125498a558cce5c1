"""Zarr attributes: OME-NGFF multiscales/labels metadata and our own key, read and written."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import zarr

#: Key of our own metadata in zarr attributes (modality, full affine).
ATTRS_KEY = "napari_pvs"

#: mm per OME-NGFF axis unit (no unit: mm).
UNIT_TO_MM = {
    "millimeter": 1.0,
    "micrometer": 1e-3,
    "nanometer": 1e-6,
    "centimeter": 10.0,
    "meter": 1e3,
    None: 1.0,
}


def ome_attrs(attrs: Mapping) -> Mapping:
    """The OME-NGFF attribute dict for v0.5 (under "ome") or v0.4 (top level)."""
    return attrs["ome"] if isinstance(attrs.get("ome"), Mapping) else attrs


def our_attrs(attrs: Mapping) -> Mapping:
    """Our own attributes (:data:`ATTRS_KEY`), or an empty dict when absent or not a dict."""
    return attrs.get(ATTRS_KEY, {}) if isinstance(attrs.get(ATTRS_KEY, {}), Mapping) else {}


def scale_and_translation(
    transforms: Sequence[Mapping], ndim: int
) -> tuple[np.ndarray, np.ndarray]:
    """The scale and translation that OME ``coordinateTransformations`` compose to."""
    scale, translation = np.ones(ndim), np.zeros(ndim)
    for t in transforms or ():
        if t.get("type") == "scale" and "scale" in t:
            scale = scale * np.asarray(t["scale"], dtype=np.float64)
        elif t.get("type") == "translation" and "translation" in t:
            translation = translation + np.asarray(t["translation"], dtype=np.float64)
    return scale, translation


def _axes_meta(axes: Sequence[str]) -> list[dict]:
    return [{"name": str(a), "type": "space", "unit": "millimeter"} for a in axes]


def multiscales_meta(
    name: str,
    shapes: list[tuple[int, ...]],
    spacing: Sequence[float],
    origin: Sequence[float],
    axes: Sequence[str],
    version: str,
) -> dict:
    """One OME-NGFF ``multiscales`` entry for a pyramid of ``shapes`` (finest first)."""
    datasets = []
    for i, shape in enumerate(shapes):
        ratio = [s0 / s for s0, s in zip(shapes[0], shape, strict=True)]
        datasets.append(
            {
                "path": str(i),
                "coordinateTransformations": [
                    {
                        "type": "scale",
                        "scale": [float(sp * r) for sp, r in zip(spacing, ratio, strict=True)],
                    },
                    {
                        "type": "translation",
                        # level voxel centres sit at the centre of the voxels they average
                        "translation": [
                            float(o + sp * (r - 1) / 2)
                            for o, sp, r in zip(origin, spacing, ratio, strict=True)
                        ],
                    },
                ],
            }
        )
    meta = {"name": name, "axes": _axes_meta(axes), "datasets": datasets}
    if version == "0.4":
        meta["version"] = "0.4"
    return meta


def set_ome_attrs(group: zarr.Group, ome: dict, version: str, extra: dict | None = None) -> None:
    """Store OME metadata where ``version`` puts it (0.4: top level, 0.5: under "ome")."""
    attrs = dict(ome) if version == "0.4" else {"ome": {"version": version, **ome}}
    if extra:
        attrs.update(extra)
    group.attrs.update(attrs)

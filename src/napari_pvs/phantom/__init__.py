"""Synthetic perivascular-space (PVS) volumes with exact ground truth.

No PVS data set can be downloaded here, so phantoms carry the tests, the benchmarks and the
default model's training data. :func:`make_phantom` draws a brain (procedural, or the MNI152
anatomy that nilearn ships), places PVS as thin tubes with the sizes, orientations and contrast
reported in the PVS simulation literature, adds confounders that must *not* be labelled PVS
(lacunes, white-matter hyperintensities, vessels; the ventricles and sulci are CSF), and applies
partial volume, a smooth bias field and Rician noise. Everything is placed in physical
millimetres, so any shape and (anisotropic) spacing works, and a seed makes it reproducible.

Arrays are ``(z, y, x)`` with ``z`` pointing superior; voxel ``i`` along an axis has its centre at
``i * spacing`` mm.

One stage per module: :mod:`~napari_pvs.phantom.anatomy` (the brain),
:mod:`~napari_pvs.phantom.shapes` (partial-volume tubes and spheres),
:mod:`~napari_pvs.phantom.placement` (keeping objects apart), :mod:`~napari_pvs.phantom.pvs`,
:mod:`~napari_pvs.phantom.confounders`, :mod:`~napari_pvs.phantom.contrast` (intensities, bias,
noise), :mod:`~napari_pvs.phantom.generate` (:func:`make_phantom`) and
:mod:`~napari_pvs.phantom.maps` (what the label maps hold). This package exports the public API.
"""

from napari_pvs.phantom.generate import Phantom, make_phantom
from napari_pvs.phantom.maps import (
    BASAL_GANGLIA,
    CONFOUNDER_NAMES,
    CSF,
    GREY_MATTER,
    LACUNE,
    REGION_NAMES,
    VESSEL,
    WHITE_MATTER,
    WMH,
)

__all__ = [
    "BASAL_GANGLIA",
    "CONFOUNDER_NAMES",
    "CSF",
    "GREY_MATTER",
    "LACUNE",
    "REGION_NAMES",
    "VESSEL",
    "WHITE_MATTER",
    "WMH",
    "Phantom",
    "make_phantom",
]

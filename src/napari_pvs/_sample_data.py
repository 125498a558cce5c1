"""npe2 sample data: small PVS phantoms (image + ground truth) that appear in about a second."""

from __future__ import annotations

import numpy as np

from napari_pvs.intensity import robust_range
from napari_pvs.phantom import make_phantom

#: Small enough to generate in well under 2 s on one core; 1.5 mm voxels over a 144 x 168 mm
#: field of view.
SAMPLE_SHAPE = (96, 112, 96)
SAMPLE_SPACING = 1.5


def phantom_layers(modality: str, seed: int = 0) -> list[tuple]:
    """Layer data for a phantom: the image, PVS ground truth, regions and confounders."""
    phantom = make_phantom(SAMPLE_SHAPE, SAMPLE_SPACING, modality, seed=seed)
    spacing = tuple(float(s) for s in phantom.spacing)
    affine = np.diag([*spacing, 1.0])
    meta = {
        "napari_pvs": True,
        "source": None,
        "affine": affine,
        "spacing": spacing,
        "axes": ("z", "y", "x"),
        "modality": phantom.modality,
        "levels": [tuple(phantom.image.shape)],
    }
    common = {"scale": spacing, "axis_labels": ("z", "y", "x"), "units": ("mm",) * 3}
    name = f"PVS phantom {phantom.modality}w"
    return [
        (
            phantom.image,
            {
                "name": name,
                "contrast_limits": robust_range(phantom.image),
                "colormap": "gray",
                "metadata": meta,
                **common,
            },
            "image",
        ),
        (phantom.pvs, {"name": f"{name} PVS ground truth", "metadata": meta, **common}, "labels"),
        (
            phantom.regions,
            {"name": f"{name} regions", "metadata": meta, "visible": False, **common},
            "labels",
        ),
        (
            phantom.confounders,
            {"name": f"{name} confounders", "metadata": meta, "visible": False, **common},
            "labels",
        ),
    ]


def phantom_t2w() -> list[tuple]:
    """Sample data "PVS phantom T2w"."""
    return phantom_layers("T2")


def phantom_t1w() -> list[tuple]:
    """Sample data "PVS phantom T1w"."""
    return phantom_layers("T1")

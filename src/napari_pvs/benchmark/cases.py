"""The benchmark's volumes: an image with its complete ground truth, cropped to the tissue."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Voxels of context kept around the tissue bounding box when cropping.
CROP_MARGIN = 6


@dataclass
class Case:
    """One image with its complete ground truth, as the benchmark uses it (maybe cropped)."""

    name: str
    path: Path  # what a project adds (the cropped copy, or the original)
    image: np.ndarray
    truth: np.ndarray  # bool
    regions: np.ndarray | None
    spacing: tuple[float, float, float]
    affine: np.ndarray
    modality: str
    crop: list[list[int]]  # [start, stop] in the original volume


def tissue_box(image: np.ndarray, truth: np.ndarray, margin: int = CROP_MARGIN):
    """Bounding box (start, stop) of the head and every true PVS, grown by ``margin``.

    Air in magnitude images carries Rician noise, so the image is smoothed (on a 2x coarser
    grid) before :func:`napari_pvs.intensity.tissue_mask` separates tissue from air, and only
    the largest connected piece (the head) counts.
    """
    from scipy import ndimage

    from napari_pvs.intensity import robust_range, tissue_mask

    low, high = robust_range(image)
    coarse = ndimage.uniform_filter(np.asarray(image[::2, ::2, ::2], np.float32), 3)
    mask = tissue_mask(coarse, low, high)
    labels, count = ndimage.label(mask)
    if count > 1:  # noise specks in the air survive smoothing at low SNR: keep the head
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    start = np.array(image.shape)
    stop = np.zeros(3, int)
    for points, scale in ((np.argwhere(mask), 2), (np.argwhere(truth), 1)):
        if len(points):
            start = np.minimum(start, points.min(axis=0) * scale)
            stop = np.maximum(stop, points.max(axis=0) * scale + scale)
    if np.any(stop <= start):  # nothing found: keep everything
        return [0, 0, 0], [int(s) for s in image.shape]
    start = np.maximum(start - margin, 0)
    stop = np.minimum(stop + margin, image.shape)
    return [int(v) for v in start], [int(v) for v in stop]


def load_case(
    image_path: str | Path,
    labels_path: str | Path,
    *,
    name: str,
    regions_path: str | Path | None = None,
    modality: str | None = None,
    crop: bool = True,
    write_to: Path | None = None,
) -> Case:
    """Open an image and its ground truth (NIfTI, zarr, OME-Zarr ``labels/pvs``), check them,
    crop them to the tissue box and (for pool volumes, ``write_to``) write the crop."""
    from napari_pvs import io

    volume = io.open_volume(image_path, modality=modality)
    labels = io.open_labels(labels_path, "pvs" if _has_label(labels_path, "pvs") else None)
    if labels.shape != volume.shape:
        raise ValueError(
            f"{labels_path} has shape {labels.shape} but {image_path} has {volume.shape}; "
            "give the ground truth of that image, voxel for voxel"
        )
    truth = np.asarray(labels.data)
    values = np.unique(truth)
    if not set(values.tolist()) <= {0, 1}:
        raise ValueError(
            f"{labels_path} holds values {values.tolist()[:8]}; the ground truth must be "
            "complete 0/1 PVS labels (255 = unlabelled is not allowed here)"
        )
    image = np.asarray(volume.data, dtype=np.float32)
    regions = None
    if regions_path is not None:
        regions_volume = io.open_labels(
            regions_path, "regions" if _has_label(regions_path, "regions") else None
        )
        if regions_volume.shape != volume.shape:
            raise ValueError(
                f"{regions_path} has shape {regions_volume.shape} but {image_path} has "
                f"{volume.shape}; give the region map of that image"
            )
        regions = np.asarray(regions_volume.data).astype(np.int64)
    truth = truth.astype(bool)
    start, stop = (
        tissue_box(image, truth) if crop else ([0, 0, 0], [int(s) for s in volume.shape])
    )
    box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    affine = np.asarray(volume.affine, np.float64).copy()
    affine[:3, 3] = affine[:3, :3] @ np.asarray(start, np.float64) + affine[:3, 3]
    path = Path(image_path)
    cropped = [list(start), list(stop)] != [[0, 0, 0], list(volume.shape)]
    image, truth = image[box], truth[box]
    if write_to is not None and cropped:
        path = io.save_ome_zarr(
            write_to,
            image,
            volume.spacing,
            labels={"pvs": truth.astype(np.uint8)},
            modality=volume.modality,
            levels=1,
            affine=affine,
        )
    return Case(
        name=name,
        path=path,
        image=np.ascontiguousarray(image),
        truth=np.ascontiguousarray(truth),
        regions=None if regions is None else np.ascontiguousarray(regions[box]),
        spacing=tuple(float(s) for s in volume.spacing),  # type: ignore[arg-type]
        affine=affine,
        modality=volume.modality,
        crop=[list(start), list(stop)],
    )


def _has_label(path: str | Path, name: str) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "labels" / name).is_dir()

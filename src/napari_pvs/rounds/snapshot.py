"""A round's snapshot: the accepted annotations frozen into ``rounds/r<N>/snapshot.zarr``, and
reading it back as training and validation crops.

One group ``a<id>`` per annotation: ``image`` (the box with :data:`SNAPSHOT_CONTEXT` voxels of
image context, clipped to the volume), ``labels`` (the label store inside the box, 255 outside
it, and in a training crop also 255 on every voxel of a validation box) and attrs (volume,
split, modality, crop and box, the whole volume's intensity range, so training normalises
exactly as inference). The worker reads only this snapshot.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from napari_pvs import atomic

#: Image context (voxels) copied around each annotated box into the snapshot.
SNAPSHOT_CONTEXT = 16


def _crop_box(start, stop, shape, context: int) -> tuple[list[int], list[int]]:
    lo = [max(0, int(a) - context) for a in start]
    hi = [min(int(s), int(b) + context) for b, s in zip(stop, shape, strict=True)]
    return lo, hi


def _local(box_start, box_stop, crop_start) -> tuple[slice, ...]:
    return tuple(
        slice(int(a) - c, int(b) - c)
        for a, b, c in zip(box_start, box_stop, crop_start, strict=True)
    )


def _clip_local(box_start, box_stop, crop_start, crop_stop) -> tuple[slice, ...] | None:
    """The part of a box inside a crop, in crop coordinates (None if they do not meet)."""
    lo = [max(int(a), c) for a, c in zip(box_start, crop_start, strict=True)]
    hi = [min(int(b), c) for b, c in zip(box_stop, crop_stop, strict=True)]
    if any(a >= b for a, b in zip(lo, hi, strict=True)):
        return None
    return _local(lo, hi, crop_start)


def write_snapshot(project, record, folder: Path) -> tuple[Path, list[dict[str, Any]]]:
    """Copy the round's frozen annotations (``record.snapshot_annotation_ids``) into
    ``folder/snapshot.zarr`` (atomic); return its path and the manifest rows the new
    checkpoint's hash covers. Annotations of removed volumes do not train."""
    import zarr

    from napari_pvs.intensity import robust_range

    ids = set(record.snapshot_annotation_ids)
    annotations = [a for a in project.annotations() if a.id in ids]
    volumes: dict[int, Any] = {}
    ranges: dict[int, tuple[float, float]] = {}
    manifest = []
    snapshot = folder / "snapshot.zarr"
    with atomic.atomic_output(snapshot, overwrite=True) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        for annotation in annotations:
            vid = annotation.volume_id
            if vid not in volumes:
                with contextlib.suppress(ValueError):
                    volumes[vid] = project.open_volume(vid)  # removed volumes do not train
                if vid in volumes:
                    ranges[vid] = tuple(float(v) for v in robust_range(volumes[vid].data))
            if vid not in volumes:
                continue
            manifest.append(
                _write_crop(root, project, annotation, annotations, volumes[vid], ranges[vid])
            )
        root.attrs["napari_pvs"] = {"round": record.id, "annotations": sorted(ids)}
    return snapshot, manifest


def _write_crop(
    root, project, annotation, annotations, volume, intensity_range: tuple[float, float]
) -> dict[str, Any]:
    """One annotation's group ``a<id>`` (image crop, labels, attrs); its manifest row."""
    vid = annotation.volume_id
    lo, hi = _crop_box(annotation.start, annotation.stop, volume.shape, SNAPSHOT_CONTEXT)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    image = np.asarray(volume.data[crop], np.float32)
    labels = _crop_labels(project, annotation, annotations, image.shape, lo, hi)
    group = root.create_group(f"a{annotation.id}")
    group.create_array("image", data=image, chunks=image.shape)
    group.create_array("labels", data=labels, chunks=labels.shape)
    group.attrs["napari_pvs"] = {
        "annotation": annotation.id,
        "volume_id": vid,
        "split": annotation.split,
        "modality": volume.modality,
        "crop_start": lo,
        "box_start": list(annotation.start),
        "box_stop": list(annotation.stop),
        "intensity_range": list(intensity_range),
    }
    return {
        "annotation": annotation.id,
        "volume": project.volume(vid).fingerprint,
        "box": [*annotation.start, *annotation.stop],
        "split": annotation.split,
        "labelled": int((labels != 255).sum()),
    }


def _crop_labels(project, annotation, annotations, shape, lo, hi) -> np.ndarray:
    """The label store inside the box, 255 outside it; in a training crop also 255 on every
    voxel of a validation box of the same volume."""
    vid = annotation.volume_id
    store = project.labels(vid)
    labels = np.full(shape, 255, np.uint8)
    inside = _local(annotation.start, annotation.stop, lo)
    labels[inside] = store["labels"][
        tuple(slice(a, b) for a, b in zip(annotation.start, annotation.stop, strict=True))
    ]
    if annotation.split == "train":  # no validation voxel is ever trained on
        for other in annotations:
            if other.split == "validation" and other.volume_id == vid:
                part = _clip_local(other.start, other.stop, lo, hi)
                if part is not None:
                    labels[part] = 255
    return labels


def load_snapshot(path: str | Path) -> tuple[list, list]:
    """``(training, validation)`` :class:`~napari_pvs.training.TrainingVolume` lists."""
    import zarr

    from napari_pvs.io import LabelWarning
    from napari_pvs.training import TrainingVolume

    root = zarr.open_group(str(path), mode="r")
    train, validation = [], []
    for name in sorted(root.group_keys(), key=lambda k: int(k[1:])):
        group = root[name]
        info = dict(group.attrs)["napari_pvs"]
        labels = np.asarray(group["labels"][:])
        if not (labels != 255).any():
            continue  # a training box lying wholly inside validation boxes
        with warnings.catch_warnings():
            # A reviewed patch without PVS is real background, not a coding mistake.
            warnings.simplefilter("ignore", LabelWarning)
            item = TrainingVolume(
                image=np.asarray(group["image"][:]),
                labels=labels,
                modality=info["modality"],
                name=name,
                intensity_range=tuple(info["intensity_range"]),
            )
        (validation if info["split"] == "validation" else train).append(item)
    return train, validation

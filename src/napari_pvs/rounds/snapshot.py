"""A round's snapshot: the accepted annotations frozen into ``rounds/r<N>/snapshot.zarr``, and
reading it back as training and validation crops.

One group ``a<id>`` per annotation: ``image`` (the box with :data:`SNAPSHOT_CONTEXT` voxels of
image context, clipped to the volume), ``labels`` (the label store inside the box, 255 outside
it, and in a training crop also 255 on every voxel of a validation box and of a held-out
answer's box) and attrs (volume, split, modality, crop and box, the whole volume's intensity
range, so training normalises exactly as inference). Yes/no answers on candidates
(:meth:`Project.answers`) are partial labels: one group ``q<id>`` per training answer, the same
crop around the cluster's box (its labels 1 or 0 on the cluster, 255 elsewhere; training
patches drawn from it hold the cluster: its ``focus``), and one group ``h<id>`` per held-out
answer, never trained on: the cluster as ``labels`` (the answer on its voxels, 255 elsewhere),
which the new version's precision on answered candidates is measured against. The worker reads
only this snapshot.
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
#: Group name prefixes: accepted patches, training answers, held-out answers.
PATCH, TRAIN_ANSWER, HELD_OUT_ANSWER = "a", "q", "h"
#: The answer split never trained on (see :class:`napari_pvs.project.AnswerRecord`).
HELD_OUT = "held-out"
#: The label an answer gives its cluster's voxels.
ANSWER_LABELS = {"yes": 1, "no": 0}


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
    """Copy the round's frozen annotations (``record.snapshot_annotation_ids``) and the yes/no
    answers given so far into ``folder/snapshot.zarr`` (atomic); return its path and the
    manifest rows the new checkpoint's hash covers. Annotations and answers of removed
    volumes do not train."""
    import zarr

    ids = set(record.snapshot_annotation_ids)
    annotations = [a for a in project.annotations() if a.id in ids]
    answers = [a for a in project.answers() if a.answer in ANSWER_LABELS]
    held_out = [a for a in answers if a.split == HELD_OUT]
    volumes = _OpenVolumes(project)
    manifest = []
    snapshot = folder / "snapshot.zarr"
    with atomic.atomic_output(snapshot, overwrite=True) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        for annotation in annotations:
            opened = volumes.get(annotation.volume_id)
            if opened is not None:
                exclude = _excluded_boxes(annotation, annotations, held_out)
                manifest.append(_write_crop(root, project, annotation, exclude, *opened))
        written = []
        for answer in answers:
            opened = volumes.get(answer.volume_id)
            if opened is not None:
                exclude = _excluded_boxes(answer, annotations, held_out)
                manifest.append(_write_answer(root, project, answer, exclude, *opened))
                written.append(answer)
        root.attrs["napari_pvs"] = {
            "round": record.id,
            "annotations": sorted(ids),
            "answers": sorted(a.id for a in written if a.split != HELD_OUT),
            "held_out_answers": sorted(a.id for a in written if a.split == HELD_OUT),
        }
    return snapshot, manifest


class _OpenVolumes:
    """The project's volumes opened once each, with their whole intensity range; None for a
    removed volume (its annotations and answers do not train)."""

    def __init__(self, project) -> None:
        self.project = project
        self.opened: dict[int, tuple[Any, tuple[float, float]] | None] = {}

    def get(self, vid: int) -> tuple[Any, tuple[float, float]] | None:
        from napari_pvs.intensity import robust_range

        if vid not in self.opened:
            self.opened[vid] = None
            with contextlib.suppress(ValueError):
                volume = self.project.open_volume(vid)
                self.opened[vid] = (volume, tuple(float(v) for v in robust_range(volume.data)))
        return self.opened[vid]


def _excluded_boxes(item, annotations, held_out) -> list[tuple[Any, Any]]:
    """The boxes whose voxels a training crop of ``item`` (an annotation or an answer) must
    not train on: the validation boxes and the held-out answers' boxes of its volume (none
    for a validation or held-out item itself, which trains on nothing)."""
    if item.split != "train":
        return []
    vid = item.volume_id
    boxes = [(a.start, a.stop) for a in annotations
             if a.split == "validation" and a.volume_id == vid]  # fmt: skip
    boxes += [(a.bbox_start, a.bbox_stop) for a in held_out if a.volume_id == vid]
    return boxes


def _write_crop(
    root, project, annotation, exclude, volume, intensity_range: tuple[float, float]
) -> dict[str, Any]:
    """One annotation's group ``a<id>`` (image crop, labels, attrs); its manifest row."""
    vid = annotation.volume_id
    lo, hi = _crop_box(annotation.start, annotation.stop, volume.shape, SNAPSHOT_CONTEXT)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    image = np.asarray(volume.data[crop], np.float32)
    labels = _crop_labels(project, vid, annotation.start, annotation.stop, exclude,
                          image.shape, lo, hi)  # fmt: skip
    group = root.create_group(f"{PATCH}{annotation.id}")
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


def _write_answer(
    root, project, answer, exclude, volume, intensity_range: tuple[float, float]
) -> dict[str, Any]:
    """One answer's group: ``q<id>`` (training: the label store in the cluster's box, 255
    elsewhere and on ``exclude`` boxes) or ``h<id>`` (held out: the answer on the voxels it
    wrote, 255 elsewhere); its manifest row."""
    vid = answer.volume_id
    start, stop = list(answer.bbox_start), list(answer.bbox_stop)
    lo, hi = _crop_box(start, stop, volume.shape, SNAPSHOT_CONTEXT)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    image = np.asarray(volume.data[crop], np.float32)
    held_out = answer.split == HELD_OUT
    if held_out:
        labels = np.full(image.shape, 255, np.uint8)
        cluster = np.asarray(project.answer_mask(answer.id), dtype=bool)
        labels[_local(start, stop, lo)][cluster] = ANSWER_LABELS[answer.answer]
    else:
        labels = _crop_labels(project, vid, start, stop, exclude, image.shape, lo, hi)
    group = root.create_group(f"{HELD_OUT_ANSWER if held_out else TRAIN_ANSWER}{answer.id}")
    group.create_array("image", data=image, chunks=image.shape)
    group.create_array("labels", data=labels, chunks=labels.shape)
    group.attrs["napari_pvs"] = {
        "answer": answer.id,
        "candidate": answer.candidate_id,
        "value": answer.answer,
        "volume_id": vid,
        "split": answer.split,
        "modality": volume.modality,
        "crop_start": lo,
        "box_start": start,
        "box_stop": stop,
        "intensity_range": list(intensity_range),
    }
    return {
        "answer": answer.id,
        "volume": project.volume(vid).fingerprint,
        "box": [*start, *stop],
        "split": answer.split,
        "value": answer.answer,
        "labelled": int((labels != 255).sum()),
    }


def _crop_labels(project, vid, box_start, box_stop, exclude, shape, lo, hi) -> np.ndarray:
    """The label store inside the box, 255 outside it and on every ``exclude`` box (a
    training crop: the validation boxes and held-out answers of the same volume)."""
    store = project.labels(vid)
    labels = np.full(shape, 255, np.uint8)
    inside = _local(box_start, box_stop, lo)
    labels[inside] = store["labels"][
        tuple(slice(a, b) for a, b in zip(box_start, box_stop, strict=True))
    ]
    for start, stop in exclude:  # no validation or held-out voxel is ever trained on
        part = _clip_local(start, stop, lo, hi)
        if part is not None:
            labels[part] = 255
    return labels


def load_snapshot(path: str | Path) -> tuple[list, list]:
    """``(training, validation)`` :class:`~napari_pvs.training.TrainingVolume` lists: the
    training ones are the accepted training patches (named ``a<id>``) and the training answers
    (``q<id>``, each with its cluster's box as ``focus``); held-out answers are not among them
    (:func:`load_held_out`)."""
    train, validation = [], []
    for name, group, info in _groups(path, (PATCH, TRAIN_ANSWER)):
        labels = np.asarray(group["labels"][:])
        if not (labels != 255).any():
            continue  # a training box lying wholly inside validation boxes
        focus = None
        if name.startswith(TRAIN_ANSWER):
            focus = tuple(
                tuple(int(v) - c for v, c in zip(info[key], info["crop_start"], strict=True))
                for key in ("box_start", "box_stop")
            )
        item = _training_volume(group, labels, info, name, focus)
        (validation if info["split"] == "validation" else train).append(item)
    return train, validation


def load_held_out(path: str | Path) -> list:
    """The held-out answers (``h<id>``) as :class:`~napari_pvs.training.TrainingVolume` crops
    whose labels are the answer on the cluster's voxels (1 yes, 0 no) and 255 elsewhere."""
    return [
        _training_volume(group, np.asarray(group["labels"][:]), info, name, None)
        for name, group, info in _groups(path, (HELD_OUT_ANSWER,))
    ]


def _groups(path: str | Path, prefixes: tuple[str, ...]):
    """``(name, group, attrs)`` of the snapshot's groups with these prefixes, in id order."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    names = [k for k in root.group_keys() if k[:1] in prefixes]
    for name in sorted(names, key=lambda k: (prefixes.index(k[:1]), int(k[1:]))):
        group = root[name]
        yield name, group, dict(group.attrs)["napari_pvs"]


def _training_volume(group, labels: np.ndarray, info: dict[str, Any], name: str, focus):
    from napari_pvs.io import LabelWarning
    from napari_pvs.training import TrainingVolume

    with warnings.catch_warnings():
        # A reviewed patch without PVS (or a "no") is real background, not a coding mistake.
        warnings.simplefilter("ignore", LabelWarning)
        return TrainingVolume(
            image=np.asarray(group["image"][:]),
            labels=labels,
            modality=info["modality"],
            name=name,
            intensity_range=tuple(info["intensity_range"]),
            focus=focus,
        )

"""What a project gives back: the PVS burden per region and the export of labels,
segmentations, the burden table and the annotation provenance."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from napari_pvs import atomic
from napari_pvs.progress import CancelToken, ProgressCallback
from napari_pvs.project.annotations import Annotations
from napari_pvs.project.layout import LEDGER
from napari_pvs.project.ledger import Ledger
from napari_pvs.project.versions import Versions
from napari_pvs.project.volumes import UNREVIEWED, Volumes

#: The label images an export writes per volume: accepted labels, model, both merged.
EXPORT_KINDS = ("labels", "pvs", "corrected")
#: The file that marks a folder as an export's own: only such a folder is ever replaced.
EXPORT_MARKER = ".napari-pvs-export.json"
_EXPORT_TABLES = ("burden.csv", "annotations.csv", EXPORT_MARKER)
_EXPORT_SUFFIXES = (*(f"_{kind}.nii.gz" for kind in EXPORT_KINDS), ".ome.zarr")


def check_export_folder(out: Path, project_folder: Path, overwrite: bool) -> None:
    """Refuse, with a sentence, an export folder that is not the export's to write.

    An export writes only into a folder of its own making: a new one, or (with ``overwrite``)
    one holding its marker and nothing but what an export writes. Anything inside the project
    (its volumes, models, ledger) is refused, except the project's own ``exports/`` area.
    """
    exports = project_folder / "exports"
    inside_exports = exports.resolve() in out.resolve().parents
    if atomic.overlaps(out, project_folder) and not inside_exports:
        raise ValueError(
            f"refusing to export into {out}: it is the project folder {project_folder}, lies "
            "inside it or holds it; choose a folder outside the project (or leave --out out "
            "to write under its exports/)"
        )
    if not (out.exists() or out.is_symlink()) or not overwrite:
        return
    if out.is_symlink() or not out.is_dir() or not (out / EXPORT_MARKER).is_file():
        raise ValueError(
            f"refusing to replace {out}: it is not a folder napari-pvs exported (no "
            f"{EXPORT_MARKER} inside); choose a new folder for --out"
        )
    foreign = sorted(
        entry.name
        for entry in out.iterdir()
        if entry.name not in _EXPORT_TABLES and not entry.name.endswith(_EXPORT_SUFFIXES)
    )
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        shown = ", ".join(foreign[:3]) + more
        raise ValueError(
            f"refusing to replace {out}: besides an earlier export it holds other files "
            f"({shown}); move them away or choose a new folder for --out"
        )


def corrected_segmentation(labels: np.ndarray, segmentation: np.ndarray) -> np.ndarray:
    """The model's segmentation where nothing was reviewed, the accepted labels where it was
    (0/1 everywhere: a reviewed voxel the annotator cleared is background, not the model's)."""
    reviewed = labels != UNREVIEWED
    return np.where(reviewed, labels, segmentation > 0).astype(np.uint8)


class Exports:
    """Reads every other part; writes only the event of an export (and the files it makes)."""

    def __init__(
        self, ledger: Ledger, volumes: Volumes, annotations: Annotations, versions: Versions
    ) -> None:
        self._ledger = ledger
        self._volumes = volumes
        self._annotations = annotations
        self._versions = versions

    def region_map(self, ref: int | str):
        """The volume's region map (OME-Zarr ``labels/regions``, e.g. a phantom's), or None."""
        from napari_pvs.io import open_labels

        volume = self._volumes.open_volume(ref)
        if "regions" in getattr(volume, "label_names", ()):
            return open_labels(self._volumes.volume(ref).path, "regions").data
        return None

    def burden(
        self,
        ref: int | str | None = None,
        version: int | str | None = None,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> list[dict[str, Any]]:
        """PVS count and volume (mm³) per region per volume, from a version's segmentation.

        Clusters are 26-connected; a cluster counts in the region holding most of its voxels.
        Regions come from the volume's region map when it has one (names from
        ``phantom.REGION_NAMES``), and a ``whole`` row always sums the volume. Predicts first
        where the version has no prediction yet.
        """
        import zarr

        from napari_pvs.metrics import label_clusters
        from napari_pvs.phantom import REGION_NAMES

        records = [self._volumes.volume(ref)] if ref is not None else self._volumes.volumes()
        number = self._versions.number(version)
        rows = []
        for record in records:
            path = (
                self._versions.prediction_path(record.id, number)
                if self._ledger.readonly
                else self._versions.predict(
                    record.id, version=number, progress=progress, cancel=cancel
                )
            )
            if not self._versions.has_prediction(record.id, number):
                raise ValueError(
                    f"volume {record.name!r} has no prediction of v{number}; open the project "
                    "for writing to predict it"
                )
            mask = np.asarray(zarr.open_group(str(path), mode="r")["segmentation"][:]) > 0
            clusters, n = label_clusters(mask)
            voxel_mm3 = float(np.prod(record.spacing))
            sizes = np.bincount(clusters.ravel(), minlength=n + 1)
            base = {"volume": record.name, "volume_id": record.id, "model_version": number}
            rows.append(
                {**base, "region": "whole", "region_id": 0, "count": int(n),
                 "volume_mm3": round(float(sizes[1:].sum()) * voxel_mm3, 3)}
            )  # fmt: skip
            regions = self.region_map(record.id)
            if regions is not None and n:
                regions = np.asarray(regions).astype(np.int64)
                table = np.bincount(
                    clusters[mask].astype(np.int64) * (int(regions.max()) + 1) + regions[mask],
                    minlength=(n + 1) * (int(regions.max()) + 1),
                ).reshape(n + 1, -1)
                home = table.argmax(axis=1)[1:]
                for region_id in sorted(set(int(r) for r in np.unique(regions)) - {0}):
                    inside = home == region_id
                    rows.append(
                        {**base, "region": REGION_NAMES.get(region_id, f"region {region_id}"),
                         "region_id": region_id, "count": int(inside.sum()),
                         "volume_mm3": round(float(sizes[1:][inside].sum()) * voxel_mm3, 3)}
                    )  # fmt: skip
        return rows

    # -- export -------------------------------------------------------------------------------
    def export(
        self,
        out: str | os.PathLike | None = None,
        *,
        format: str = "nifti",
        overwrite: bool = False,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> dict[str, Any]:
        """Write every volume's labels and current segmentation, a PVS burden table and the
        annotation provenance into ``out`` (default ``exports/v<N>``), built under a temporary
        name and renamed.

        ``format`` ``nifti``: ``<name>_labels.nii.gz`` (0/1, 255 = not reviewed),
        ``<name>_pvs.nii.gz`` (the current model's segmentation) and ``<name>_corrected.nii.gz``
        (that segmentation with every reviewed patch replaced by its accepted labels: the
        researcher's best PVS map) with the volume's affine; ``ome-zarr``: ``<name>.ome.zarr``,
        the image with ``labels/annotations``, ``labels/pvs`` and ``labels/corrected``. Always
        ``burden.csv`` and ``annotations.csv``, and the marker :data:`EXPORT_MARKER`: only a
        folder holding it (and nothing else but export files) is replaced with ``overwrite``;
        a folder inside the project (but its ``exports/``) is refused. Returns
        ``{"folder", "files", "burden"}``.
        """
        import csv

        import zarr

        from napari_pvs.io import save_nifti, save_ome_zarr

        if format not in ("nifti", "ome-zarr"):
            raise ValueError(f"format must be 'nifti' or 'ome-zarr', got {format!r}")
        number = self._versions.current_version().version
        out = Path(out) if out is not None else self._ledger.folder / "exports" / f"v{number}"
        if out.parent == self._ledger.folder / "exports":
            out.parent.mkdir(exist_ok=True)
        inputs = [v.path for v in self._volumes.volumes()] + [self._ledger.folder / LEDGER]
        check_export_folder(out, self._ledger.folder, overwrite)
        for record in self._volumes.volumes():  # a changed scan must not get stale labels
            self._volumes.require_unchanged(record)
        atomic.check_output(out, inputs=inputs, overwrite=overwrite)
        rows = self.burden(version=number, progress=progress, cancel=cancel)
        files = []
        with atomic.atomic_output(out, inputs=inputs, overwrite=overwrite) as tmp:
            tmp.mkdir()
            marker = {"napari_pvs_export": 1, "project": str(self._ledger.folder),
                      "version": number, "format": format}  # fmt: skip
            (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2))
            for record in self._volumes.volumes():
                volume = self._volumes.open_volume(record.id)
                labels = self._volumes.labels(record.id)["labels"][:]
                segmentation = zarr.open_group(
                    str(self._versions.prediction_path(record.id, number)), mode="r"
                )["segmentation"][:]
                corrected = corrected_segmentation(labels, segmentation)
                if format == "nifti":
                    names = [f"{record.name}_{kind}.nii.gz" for kind in EXPORT_KINDS]
                    for name, data in zip(names, (labels, segmentation, corrected), strict=True):
                        save_nifti(tmp / name, data, volume.affine)
                else:
                    names = [f"{record.name}.ome.zarr"]
                    save_ome_zarr(
                        tmp / names[0],
                        volume.data,
                        volume.spacing,
                        labels={
                            "annotations": labels,
                            "pvs": segmentation,
                            "corrected": corrected,
                        },
                        modality=volume.modality,
                        axes=volume.axes,
                        affine=volume.affine,
                        cancel=cancel,
                    )
                files += names
            columns = ["volume", "volume_id", "model_version", "region", "region_id", "count",
                       "volume_mm3"]  # fmt: skip
            with open(tmp / "burden.csv", "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
            names = {v.id: v.name for v in self._volumes.rows(include_removed=True)}
            with open(tmp / "annotations.csv", "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(
                    ["id", "volume", "z0", "y0", "x0", "z1", "y1", "x1", "annotator", "created",
                     "model_version", "seconds", "empty", "split", "pvs_voxels"]
                )  # fmt: skip
                for a in self._annotations.annotations():
                    writer.writerow(
                        [a.id, names.get(a.volume_id), *a.start, *a.stop, a.annotator, a.created,
                         a.model_version, a.seconds, int(a.empty), a.split, a.pvs_voxels]
                    )  # fmt: skip
            files += ["burden.csv", "annotations.csv"]
        self._ledger.event("export", {"folder": str(out), "format": format, "version": number})
        return {"folder": out, "files": [out / f for f in files], "burden": rows}

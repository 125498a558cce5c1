"""Convert a volume (a NIfTI, typically) to a chunked OME-Zarr, streaming."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from napari_pvs import atomic
from napari_pvs.io.readers import open_volume
from napari_pvs.io.writers import DEFAULT_CHUNK, save_ome_zarr
from napari_pvs.progress import CancelToken, ProgressCallback


def convert_to_ome_zarr(
    src: str | Path,
    dst: str | Path,
    *,
    levels: int = 3,
    chunks: int | Sequence[int] = DEFAULT_CHUNK,
    modality: str | None = None,
    ome_version: str = "0.4",
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> Path:
    """Convert a NIfTI (or any volume :func:`open_volume` reads) to a chunked OME-Zarr.

    Streams chunk by chunk, so memory stays bounded by a few chunks (plus, for ``.nii.gz``, one
    decompressed ``k`` slab). The voxel order stays the NIfTI's ``(i, j, k)`` and the full
    affine is kept, so labels predicted on the OME-Zarr map back onto the NIfTI exactly.
    Raises :class:`napari_pvs.progress.Cancelled` if cancelled. The output is built under a
    temporary name: a failed or cancelled conversion leaves nothing new, and an existing
    ``dst`` (replaced only with ``overwrite``) exactly as it was.
    """
    dst = Path(dst)
    atomic.check_output(dst, inputs=[src], overwrite=overwrite, flag="overwrite=True")
    volume = open_volume(src, modality=modality)
    return save_ome_zarr(
        dst,
        volume.data,
        volume.spacing,
        modality=volume.modality,
        levels=levels,
        chunks=chunks,
        axes=volume.axes,
        affine=volume.affine,
        name=Path(src).name,
        ome_version=ome_version,
        overwrite=overwrite,
        inputs=[src],
        progress=progress,
        cancel=cancel,
    )

"""NIfTI in and out: a memory-mapped ``.nii``, a slab-chunked ``.nii.gz``, atomic writes.

Arrays keep the file's voxel order ``(i, j, k)``; the header affine maps it to scanner mm.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import dask.array as da
import numpy as np

from napari_pvs import atomic
from napari_pvs.display import DisplayLevel
from napari_pvs.io.damage import DamagedFileError, GuardedReads, damaged_file_error
from napari_pvs.io.geometry import check_affine, check_write_input, index_3d
from napari_pvs.io.modality import modality_from_name
from napari_pvs.io.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    """Whether the file name ends in ``.nii`` or ``.nii.gz`` (any case)."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _open_nifti_array(path: Path):
    """Return ``(nibabel image, lazy dask array, direct reader or None)`` for a NIfTI file.

    Uncompressed ``.nii`` is wrapped as a true ``numpy.memmap`` (zero-copy random access).
    ``.nii.gz`` cannot be random-accessed: reading a chunk decompresses the file from its start
    up to that chunk, so chunks are whole ``k`` slabs (contiguous in the file) and large volumes
    should be converted once with ``napari-pvs convert`` (:func:`convert_to_ome_zarr`).
    """
    import nibabel as nib

    try:
        image = nib.load(str(path), mmap=True)
    except Exception as exc:  # nibabel raises many types for corrupt headers
        raise damaged_file_error(path, exc) or DamagedFileError(
            f"{path} is not a readable NIfTI file ({exc}); re-export the image"
        ) from exc
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise ValueError(f"{path.name}: not a NIfTI-1/2 image")
    header = image.header
    shape = tuple(int(s) for s in image.shape)
    on_disk = header.get_data_dtype()
    # nibabel moves scl_slope/scl_inter from the header to the proxy when loading
    slope = float(getattr(image.dataobj, "slope", 1.0))
    inter = float(getattr(image.dataobj, "inter", 0.0))
    scaled = (slope, inter) != (1.0, 0.0)
    compressed = path.name.lower().endswith(".gz")
    reader = None  # a .nii.gz decompresses from its start for every read: dask slabs suit it
    if compressed:
        proxy = GuardedReads(image.dataobj, str(path))
        out_dtype = proxy[(slice(0, 1),) * len(shape)].dtype
        chunks = list(shape)
        if len(shape) >= 3:
            plane = max(1, shape[0] * shape[1] * on_disk.itemsize)
            chunks[2] = max(1, min(shape[2], (64 << 20) // plane))
        array = da.from_array(
            proxy, chunks=tuple(chunks), asarray=True, meta=np.empty((0,) * len(shape), out_dtype)
        )
        if scaled:
            array = array.astype(np.float32)
    else:
        offset = int(image.dataobj.offset)
        expected = offset + int(np.prod(shape)) * on_disk.itemsize
        if path.stat().st_size < expected:
            raise DamagedFileError(
                f"{path} is damaged and cannot be read (it is truncated: "
                f"{path.stat().st_size} bytes, its header promises {expected}); restore it "
                "from a backup or re-export the image"
            )
        memmap = np.memmap(path, dtype=on_disk, mode="r", offset=offset, shape=shape, order="F")
        array = da.from_array(memmap, chunks=_default_chunks(shape, on_disk.itemsize))
        if scaled:  # apply the header's intensity scaling lazily, per chunk, in float32
            array = (array * np.float32(slope) + np.float32(inter)).astype(np.float32)
        else:
            reader = memmap  # napari reads the plane it draws straight from the mapping
    return image, array, reader


def _default_chunks(shape: Sequence[int], itemsize: int) -> tuple[int, ...]:
    side = 128 if itemsize <= 2 else 96
    return tuple(min(int(s), side) for s in shape)


def open_nifti(path: Path) -> Volume:
    """A NIfTI file as a lazy Volume in its ``(i, j, k)`` order, with the header affine."""
    import nibabel as nib

    image, array, reader = _open_nifti_array(path)
    index, _ = index_3d(array.shape, array.dtype, f"NIfTI {path.name}")
    if index is not None:
        array = array[index]
    display = [] if reader is None else [DisplayLevel(reader, lazy=array, index=index)]
    affine = np.asarray(image.affine, dtype=np.float64)
    spacing = tuple(float(v) for v in nib.affines.voxel_sizes(affine)[:3])
    return Volume(
        data=array,
        spacing=spacing,
        affine=affine,
        modality=modality_from_name(path),
        source=str(path),
        axes=("i", "j", "k"),
        display=display,
    )


def save_nifti(
    path: str | Path,
    array,
    affine: np.ndarray,
    *,
    dtype=None,
    overwrite: bool = False,
    inputs: Sequence[str | Path | None] = (),
) -> Path:
    """Write a 3D array as NIfTI-1 with the given affine (orientation and spacing kept).

    The array is written in its own voxel order, which must be the order the affine describes
    (NIfTI ``i, j, k``). Dask arrays are computed here: NIfTI is for moderate sizes; use
    OME-Zarr for volumes that do not fit in memory. Written to a temporary sibling, fsynced and
    renamed: a killed write never leaves a truncated file under ``path``; an existing ``path``
    is replaced only with ``overwrite``, never when it is one of ``inputs``.
    """
    import nibabel as nib

    path = Path(path)
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise ValueError(f"{path.name}: a NIfTI file name must end in .nii or .nii.gz")
    check_write_input(array, "array")
    affine = check_affine(affine)
    atomic.check_output(path, inputs=inputs, overwrite=overwrite, flag="overwrite=True")
    data = np.asarray(array.compute() if hasattr(array, "compute") else array)
    if dtype is not None:
        data = data.astype(dtype)
    elif data.dtype == np.bool_:
        data = data.astype(np.uint8)
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic.atomic_output(path, inputs=inputs, overwrite=overwrite, kind="file") as temp:
        nib.save(image, str(temp))  # the temporary name keeps the suffix: same format
    return path

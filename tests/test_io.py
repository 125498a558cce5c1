"""Round trips and bad-input handling of the lazy volume I/O (napari_pvs.io)."""

from __future__ import annotations

import threading

import dask.array as da
import nibabel as nib
import numpy as np
import pytest
import zarr

from napari_pvs import io
from napari_pvs.display import as_dask
from napari_pvs.progress import Cancelled

OBLIQUE_AFFINE = np.array(
    [
        [0.0, -0.8, 0.0, 10.0],
        [0.0, 0.0, 2.5, -4.0],
        [-1.2, 0.0, 0.0, 7.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


@pytest.fixture
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 4000, size=(21, 34, 17), dtype=np.uint16)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_round_trip_values_spacing_pyramid_labels(tmp_path, image, version):
    pvs = (image > 3000).astype(np.uint8)
    regions = (image % 3).astype(np.uint8)
    path = io.save_ome_zarr(
        tmp_path / "img.zarr",
        da.from_array(image, chunks=7),
        (1.5, 0.5, 0.75),
        labels={"pvs": pvs, "regions": regions},
        modality="T2w",
        levels=3,
        chunks=8,
        ome_version=version,
    )
    volume = io.open_volume(path)
    assert isinstance(volume.data, da.Array)
    np.testing.assert_array_equal(volume.data.compute(), image)
    assert volume.spacing == (1.5, 0.5, 0.75)
    np.testing.assert_allclose(volume.affine, np.diag([1.5, 0.5, 0.75, 1.0]))
    assert volume.modality == "T2"
    assert volume.axes == ("z", "y", "x")
    assert volume.label_names == ("pvs", "regions")
    assert [lv.shape for lv in volume.levels] == [(21, 34, 17), (10, 17, 8), (5, 8, 4)]
    assert volume.level_spacings[1] == pytest.approx((1.5 * 2.1, 0.5 * 2, 0.75 * 17 / 8))
    # level 1 is the 2x2x2 block mean of level 0 (trimmed to even size), rounded
    trimmed = image[:20, :34, :16].astype(np.float64)
    expected = trimmed.reshape(10, 2, 17, 2, 8, 2).mean(axis=(1, 3, 5))
    np.testing.assert_array_equal(volume.levels[1].compute(), np.round(expected).astype(np.uint16))
    assert zarr.open_array(str(path / "0"), mode="r").chunks == (8, 8, 8)
    labels = io.open_labels(path, "regions")
    np.testing.assert_array_equal(labels.data.compute(), regions)
    np.testing.assert_array_equal(labels.levels[1].compute(), regions[:20:2, ::2, :16:2])
    assert labels.spacing == (1.5, 0.5, 0.75)
    # with several labels and one of them "pvs", "pvs" is the default; a direct path works too
    np.testing.assert_array_equal(io.open_labels(path).data.compute(), pvs)
    np.testing.assert_array_equal(io.open_labels(path / "labels" / "pvs").data.compute(), pvs)


def test_ome_zarr_metadata_follows_spec(tmp_path, image):
    io.save_ome_zarr(tmp_path / "a.zarr", image, (2.0, 1.0, 1.0), labels={"pvs": image > 9})
    root = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")
    ms = root.attrs["multiscales"][0]
    assert ms["version"] == "0.4"
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert all(a["unit"] == "millimeter" for a in ms["axes"])
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales[0] == [2.0, 1.0, 1.0] and scales[1][1] == 2.0
    assert root["labels"].attrs["labels"] == ["pvs"]
    assert root["labels/pvs"].attrs["image-label"]["source"] == {"image": "../../"}
    assert root["labels/pvs/0"].dtype == np.uint8  # bool labels are stored as uint8

    root5 = zarr.open_group(
        str(io.save_ome_zarr(tmp_path / "b.zarr", image, ome_version="0.5")), mode="r"
    )
    assert root5.metadata.zarr_format == 3
    assert root5.attrs["ome"]["version"] == "0.5"
    assert "multiscales" in root5.attrs["ome"]


def test_ome_zarr_written_by_other_tools_units_and_singleton_axes(tmp_path):
    """An OME-Zarr 0.4 with t,c axes of length 1, micrometre units and a translation."""
    data = np.arange(2 * 3 * 4, dtype=np.float32).reshape(1, 1, 2, 3, 4)
    root = zarr.open_group(str(tmp_path / "ext.zarr"), mode="w", zarr_format=2)
    root.create_array("s0", data=data, chunks=(1, 1, 2, 3, 4))
    root.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [
                {"name": "t", "type": "time"},
                {"name": "c", "type": "channel"},
                {"name": "z", "type": "space", "unit": "micrometer"},
                {"name": "y", "type": "space", "unit": "micrometer"},
                {"name": "x", "type": "space", "unit": "micrometer"},
            ],
            "datasets": [
                {
                    "path": "s0",
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [1, 1, 2000, 500, 500]},
                        {"type": "translation", "translation": [0, 0, 1000, 0, -500]},
                    ],
                }
            ],
        }
    ]
    volume = io.open_volume(tmp_path / "ext.zarr")
    assert volume.shape == (2, 3, 4)
    assert volume.axes == ("z", "y", "x")
    assert volume.spacing == pytest.approx((2.0, 0.5, 0.5))
    np.testing.assert_allclose(volume.affine[:3, 3], [1.0, 0.0, -0.5])
    np.testing.assert_array_equal(volume.data.compute(), data[0, 0])


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_plain_zarr_array_and_group_with_one_array(tmp_path, image, zarr_format):
    zarr.save_array(str(tmp_path / "sub-1_T1w.zarr"), image, zarr_format=zarr_format)
    volume = io.open_volume(tmp_path / "sub-1_T1w.zarr")
    np.testing.assert_array_equal(volume.data.compute(), image)
    assert volume.spacing == (1.0, 1.0, 1.0)
    assert volume.modality == "T1"  # from the file name hint
    assert io.open_volume(tmp_path / "sub-1_T1w.zarr", modality="T2").modality == "T2"

    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=zarr_format)
    group.create_array("vol", data=image, chunks=(8, 8, 8))
    np.testing.assert_array_equal(io.open_volume(tmp_path / "g.zarr").data.compute(), image)
    group.create_array("other", data=image, chunks=(8, 8, 8))
    with pytest.raises(ValueError, match=r"holds 2 arrays \(other, vol\)"):
        io.open_volume(tmp_path / "g.zarr")


def _nifti(path, data, affine, slope_inter=None):
    img = nib.Nifti1Image(data, affine)
    if slope_inter is not None:
        img.header.set_slope_inter(*slope_inter)
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_keeps_voxel_order_oblique_affine_anisotropic_spacing(tmp_path, suffix):
    data = np.random.default_rng(1).random((20, 30, 10)).astype(np.float32)
    path = _nifti(tmp_path / f"sub-01_T2w{suffix}", data, OBLIQUE_AFFINE)
    volume = io.open_volume(path)
    assert volume.axes == ("i", "j", "k")
    assert volume.shape == (20, 30, 10)
    np.testing.assert_allclose(volume.affine, OBLIQUE_AFFINE)
    assert volume.spacing == pytest.approx((1.2, 0.8, 2.5))
    assert volume.modality == "T2"
    np.testing.assert_array_equal(volume.data.compute(), data)
    # NIfTI -> OME-Zarr -> NIfTI keeps order, values and the full (oblique) affine
    zpath = io.convert_to_ome_zarr(path, tmp_path / "c.zarr", chunks=8)
    converted = io.open_volume(zpath)
    assert converted.axes == ("i", "j", "k") and converted.modality == "T2"
    np.testing.assert_allclose(converted.affine, OBLIQUE_AFFINE)
    np.testing.assert_array_equal(converted.data.compute(), data)
    back = io.save_nifti(tmp_path / "back.nii.gz", converted.data > 0.5, converted.affine)
    reread = nib.load(str(back))
    np.testing.assert_allclose(reread.affine, OBLIQUE_AFFINE, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(reread.dataobj), (data > 0.5).astype(np.uint8))


def test_uncompressed_nifti_is_memory_mapped_and_scaling_applied(tmp_path):
    raw = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    path = _nifti(tmp_path / "s.nii", raw, np.eye(4), slope_inter=(0.5, 3.0))
    volume = io.open_volume(path)
    assert volume.data.dtype == np.float32
    np.testing.assert_allclose(volume.data.compute(), raw * 0.5 + 3.0)
    plain = io.open_volume(_nifti(tmp_path / "p.nii", raw, np.eye(4)))
    leaves = [v for v in plain.data.dask.values() if isinstance(v, np.memmap)]
    leaves += [
        getattr(v, "value", None)
        for v in plain.data.dask.values()
        if isinstance(getattr(v, "value", None), np.memmap)
    ]
    assert leaves, "uncompressed NIfTI should be backed by a numpy.memmap"


def test_nifti_4d_singleton_is_squeezed_and_real_4d_rejected(tmp_path):
    data = np.ones((4, 5, 6, 1), np.float32)
    assert io.open_volume(_nifti(tmp_path / "a.nii", data, np.eye(4))).shape == (4, 5, 6)
    with pytest.raises(ValueError, match=r"4D with shape \(4, 5, 6, 3\).*length 1"):
        io.open_volume(_nifti(tmp_path / "b.nii", np.ones((4, 5, 6, 3), np.float32), np.eye(4)))


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        io.open_volume(tmp_path / "missing.zarr")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(ValueError, match="empty directory"):
        io.open_volume(tmp_path / "empty.zarr")
    (tmp_path / "notzarr").mkdir()
    (tmp_path / "notzarr" / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a zarr store"):
        io.open_volume(tmp_path / "notzarr")
    (tmp_path / "corrupt.zarr").mkdir()
    (tmp_path / "corrupt.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(ValueError, match="is damaged"):
        io.open_volume(tmp_path / "corrupt.zarr")
    zarr.open_group(str(tmp_path / "nothing.zarr"), mode="w")
    with pytest.raises(ValueError, match="holds no array"):
        io.open_volume(tmp_path / "nothing.zarr")
    (tmp_path / "bad.nii").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="not a readable NIfTI"):
        io.open_volume(tmp_path / "bad.nii")
    (tmp_path / "x.png").write_bytes(b"png")
    with pytest.raises(ValueError, match="unsupported file type"):
        io.open_volume(tmp_path / "x.png")
    zarr.save_array(str(tmp_path / "2d.zarr"), np.zeros((5, 5)))
    with pytest.raises(ValueError, match=r"2D with shape \(5, 5\); a 3D volume is expected"):
        io.open_volume(tmp_path / "2d.zarr")
    zarr.save_array(str(tmp_path / "c.zarr"), np.zeros((3, 3, 3), np.complex64))
    with pytest.raises(ValueError, match="not a real numeric type"):
        io.open_volume(tmp_path / "c.zarr")
    with pytest.raises(ValueError, match="must be a 3D array"):
        io.save_ome_zarr(tmp_path / "o.zarr", np.zeros((4, 4)))
    with pytest.raises(ValueError, match="labels must match the image"):
        io.save_ome_zarr(
            tmp_path / "o.zarr", np.zeros((4, 4, 4)), labels={"pvs": np.zeros((4, 4, 3))}
        )
    with pytest.raises(ValueError, match="float dtype"):
        io.save_ome_zarr(
            tmp_path / "o2.zarr", np.zeros((4, 4, 4)), labels={"p": np.zeros((4, 4, 4))}
        )
    with pytest.raises(ValueError, match="unknown modality"):
        io.save_ome_zarr(tmp_path / "o3.zarr", np.zeros((4, 4, 4)), modality="FLAIR")
    io.save_ome_zarr(tmp_path / "exists.zarr", np.zeros((4, 4, 4)))
    with pytest.raises(FileExistsError, match="already exists"):
        io.save_ome_zarr(tmp_path / "exists.zarr", np.zeros((4, 4, 4)))


def test_nan_found_on_sample_at_open_and_lazily_per_chunk(tmp_path):
    data = np.zeros((32, 32, 32), np.float32)
    data[5, 5, 5] = np.nan  # level 2 of the pyramid (stride-free mean) carries it
    io.save_ome_zarr(tmp_path / "nan.zarr", data, levels=3, chunks=16)
    with pytest.raises(ValueError, match="NaN or infinite"):
        io.open_volume(tmp_path / "nan.zarr")
    # a NaN the coarse sample cannot see (single level, odd position) is caught when read
    big = np.zeros((80, 80, 80), np.float32)
    big[1, 1, 1] = np.inf
    zarr.create_array(str(tmp_path / "inf.zarr"), data=big, chunks=(40, 40, 40))
    volume = io.open_volume(tmp_path / "inf.zarr")
    assert float(volume.data[40:, 40:, 40:].sum().compute()) == 0.0  # clean chunk: fine
    with pytest.raises(ValueError, match="NaN or infinite voxels in a chunk"):
        volume.data.sum().compute()
    (shown,) = volume.display_levels()  # what napari draws: computations from it are checked too
    with pytest.raises(ValueError, match="NaN or infinite voxels in a chunk"):
        as_dask(shown).sum().compute()
    assert io.open_volume(tmp_path / "inf.zarr", check_finite=False).shape == (80, 80, 80)


def test_write_labels_adds_and_overwrites(tmp_path, image):
    path = io.save_ome_zarr(tmp_path / "img.zarr", image, (2.0, 1.0, 1.0), levels=2, chunks=8)
    first = (image > 2000).astype(np.uint8)
    io.write_labels(path, "pvs", first)
    np.testing.assert_array_equal(io.open_labels(path, "pvs").data.compute(), first)
    second = (image > 100).astype(np.uint8)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        io.write_labels(path, "pvs", second)
    # the lazy new labels may read the very arrays they replace
    lazy = (io.open_labels(path, "pvs").data * 0 + da.from_array(second, chunks=5)).astype("u1")
    io.write_labels(path, "pvs", lazy, overwrite=True)
    io.write_labels(path, "edited", first)
    volume = io.open_volume(path)
    assert volume.label_names == ("pvs", "edited")
    pvs = io.open_labels(path, "pvs")
    np.testing.assert_array_equal(pvs.data.compute(), second)
    assert len(pvs.levels) == 2 and pvs.spacing == (2.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="labels must match the image"):
        io.write_labels(path, "bad", np.zeros((3, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="several label images"):
        io.open_labels(zarr_path_with_two(tmp_path, image))
    # NIfTI target keeps the affine
    out = io.write_labels(tmp_path / "lab.nii.gz", "pvs", first, affine=OBLIQUE_AFFINE)
    np.testing.assert_allclose(nib.load(str(out)).affine, OBLIQUE_AFFINE, atol=1e-6)
    np.testing.assert_array_equal(io.open_labels(out).data.compute(), first)


def zarr_path_with_two(tmp_path, image):
    return io.save_ome_zarr(
        tmp_path / "two.zarr", image, labels={"a": image > 5, "b": image > 6}, levels=1
    )


def test_convert_reports_progress_and_cancels_cleanly(tmp_path):
    data = np.random.default_rng(2).random((24, 24, 24)).astype(np.float32)
    src = _nifti(tmp_path / "in.nii", data, np.diag([0.7, 0.7, 1.4, 1.0]))
    calls = []
    io.convert_to_ome_zarr(
        src,
        tmp_path / "out.zarr",
        levels=2,
        chunks=8,
        progress=lambda d, t, m: calls.append((d, t)),
    )
    assert calls[-1][0] == calls[-1][1] == 27 + 8
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    volume = io.open_volume(tmp_path / "out.zarr")
    assert volume.spacing == pytest.approx((0.7, 0.7, 1.4))
    np.testing.assert_array_equal(volume.data.compute(), data)

    cancel = threading.Event()

    def cancel_after_first(done, total, message):
        cancel.set()

    with pytest.raises(Cancelled):
        io.convert_to_ome_zarr(
            src, tmp_path / "c.zarr", chunks=8, progress=cancel_after_first, cancel=cancel
        )
    assert not (tmp_path / "c.zarr").exists()
    with pytest.raises(FileExistsError):
        io.convert_to_ome_zarr(src, tmp_path / "out.zarr")
    assert (tmp_path / "out.zarr").exists()  # an existing output is never removed


def test_save_ome_zarr_streams_without_computing_the_whole_array(tmp_path):
    """Each stored batch computes only its own chunks: count block calls of a lazy source."""
    calls = []

    def block(block_info=None):
        loc = block_info[None]["array-location"]
        calls.append(loc)
        return np.ones(tuple(b - a for a, b in loc), np.uint8)

    source = da.map_blocks(block, chunks=((16,) * 4,) * 3, dtype=np.uint8)
    io.save_ome_zarr(tmp_path / "s.zarr", source, levels=1, chunks=16)
    assert len(calls) == 64  # each chunk computed exactly once
    assert io.open_volume(tmp_path / "s.zarr").data.sum().compute() == 64**3


def test_cli_convert(tmp_path, capsys):
    import json

    from napari_pvs.cli import main

    data = np.random.default_rng(4).random((12, 14, 10)).astype(np.float32)
    src = _nifti(tmp_path / "sub_T2w.nii.gz", data, OBLIQUE_AFFINE)
    out = tmp_path / "out.zarr"
    assert main(["convert", str(src), str(out), "--levels", "2", "--chunks", "8"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shape"] == [12, 14, 10] and summary["modality"] == "T2"
    assert summary["levels"] == [[12, 14, 10], [6, 7, 5]]
    np.testing.assert_array_equal(io.open_volume(out).data.compute(), data)
    assert main(["convert", str(src), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(src), str(out), "--overwrite", "--levels", "1"]) == 0
    assert len(io.open_volume(out).levels) == 1
    assert main(["convert", str(tmp_path / "nope.nii"), str(tmp_path / "o.zarr")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["convert", str(out), str(tmp_path / "o.zarr")]) == 2
    assert "reads .nii or .nii.gz" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [(1.0, 2.0), (0.0, 1.0, 1.0), float("nan"), (-1.0, 1.0, 1.0)])
def test_one_spacing_check_serves_io_phantom_and_frangi(bad):
    from napari_pvs.io import check_spacing
    from napari_pvs.models.frangi import frangi_vesselness
    from napari_pvs.phantom import make_phantom

    assert check_spacing(1.5) == (1.5, 1.5, 1.5)
    assert check_spacing([0.5, 0.5, 3]) == (0.5, 0.5, 3.0)
    for call in (
        lambda: check_spacing(bad),
        lambda: make_phantom(shape=(16, 16, 16), spacing=bad),
        lambda: frangi_vesselness(np.zeros((8, 8, 8), np.float32), bad, "T2"),
    ):
        with pytest.raises(ValueError, match="spacing must be"):
            call()

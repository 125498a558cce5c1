"""A volume's contrast is guessed from the image itself, with a confidence, then from its name."""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_pvs.benchmark.data import PRESETS
from napari_pvs.modality import CONFIDENT, contrast_score, guess_modality
from napari_pvs.phantom import make_phantom

# Held-out-style phantoms: low SNR, bias field, thick slices, MNI anatomy, weak CSF contrast,
# and the benchmark's shifted preset (thin dense PVS, 2 mm slices, SNR 10) in both contrasts.
SHIFTED = {k: v for k, v in PRESETS["shifted"].items() if k not in ("modality", "csf_ratio")}
OPTIONS = {
    "default": {},
    "low-snr": {"snr": 5.0},
    "bias-field": {"bias_field": True, "snr": 8.0},
    "thick-slices": {"spacing": (3.0, 1.0, 1.0)},
    "mni": {"anatomy": "mni", "snr": 6.0},
    "weak-csf": {"snr": 10.0, "csf_ratio": {"T1": 0.6, "T2": 1.8}},
    "shifted": SHIFTED,
    "1mm": {"spacing": (1.0, 1.0, 1.0), "snr": 20.0},
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("modality", ["T1", "T2"])
def test_every_held_out_style_phantom_is_guessed_right_without_its_name(modality, option):
    kwargs = dict(OPTIONS[option])
    if isinstance(kwargs.get("csf_ratio"), dict):
        kwargs["csf_ratio"] = kwargs["csf_ratio"][modality]
    phantom = make_phantom((64, 80, 64), modality=modality, seed=7, **kwargs)
    guess = guess_modality(phantom.image, phantom.spacing, name="case_1.nii.gz")
    assert guess.modality == modality, guess
    assert 0.0 < guess.confidence <= 1.0
    assert modality in guess.reason


def test_the_score_has_the_sign_of_the_contrast_and_flips_with_it():
    t2 = make_phantom((64, 80, 64), modality="T2", seed=3)
    score = contrast_score(t2.image, t2.spacing)
    assert score > 0.2
    inverted = t2.image.max() - t2.image  # a crude T1 look: CSF now darkest, background bright
    inverted[t2.regions == 0] = 0.0
    assert contrast_score(inverted, t2.spacing) < -0.2


def test_a_256_cube_is_judged_from_a_bounded_sample_quickly():
    small = make_phantom((128, 128, 128), spacing=2.0, modality="T1", seed=5, snr=12.0)
    big = np.repeat(np.repeat(np.repeat(small.image, 2, 0), 2, 1), 2, 2)  # 256^3, 1 mm
    read = []

    class Counting:
        """Counts the voxels the test reads, like a lazy store would serve them."""

        shape, dtype, ndim = big.shape, big.dtype, 3

        def __getitem__(self, index):
            part = big[index]
            read.append(part.size)
            return part

    start = time.perf_counter()
    guess = guess_modality(Counting(), (1.0, 1.0, 1.0), name="case_2.nii.gz")
    elapsed = time.perf_counter() - start
    assert guess.modality == "T1" and guess.confident, guess
    assert sum(read) <= 1_300_000  # a bounded sample, not the 16.8 M voxels
    assert elapsed < 5.0  # ~0.1 s alone; generous for a shared 2-core machine


def test_the_name_decides_only_when_the_image_cannot():
    t1 = make_phantom((64, 80, 64), modality="T1", seed=2, snr=20.0)
    agree = guess_modality(t1.image, t1.spacing, name="sub-01_T1w.nii.gz")
    assert agree.modality == "T1" and agree.confident and "agrees" in agree.reason
    conflict = guess_modality(t1.image, t1.spacing, name="sub-01_T2w.nii.gz")
    assert conflict.modality == "T1" and "T2" in conflict.reason
    assert conflict.confidence < agree.confidence

    flat = np.ones((32, 32, 32), np.float32)
    from_name = guess_modality(flat, name="sub-01_T2w.nii.gz")
    assert (from_name.modality, from_name.confident) == ("T2", True)
    nothing = guess_modality(flat, name="case_3.nii.gz")
    assert (nothing.modality, nothing.confidence, nothing.confident) == ("unknown", 0.0, False)
    assert "constant" in nothing.reason


@pytest.mark.parametrize("seed", [0, 1])
def test_noise_alone_is_not_a_confident_guess(seed):
    noise = np.random.default_rng(seed).random((64, 64, 64)).astype(np.float32)
    guess = guess_modality(noise, name="noise.nii.gz")
    assert not guess.confident and guess.confidence < CONFIDENT and "unsure" in guess.reason


def test_project_add_records_the_guessed_contrast_or_names_the_option(tmp_path, capsys):
    from napari_pvs import io
    from napari_pvs.cli import main
    from napari_pvs.project import Project

    t1 = make_phantom((48, 56, 48), modality="T1", seed=4, snr=15.0)
    scan = io.save_ome_zarr(tmp_path / "case_1.zarr", t1.image, t1.spacing, levels=1)
    noise = np.random.default_rng(0).random((32, 32, 32)).astype(np.float32)
    unsure = io.save_ome_zarr(tmp_path / "case_2.zarr", noise, (1.0, 1.0, 1.0), levels=1)
    folder = str(tmp_path / "project")
    assert main(["project", "init", folder]) == 0
    assert main(["project", "add", folder, str(scan), str(unsure)]) == 0
    err = capsys.readouterr().err
    assert "case_2.zarr: cannot tell T1 from T2" in err and "--modality T1" in err
    assert "case_1" not in err
    modalities = {v.name: v.modality for v in Project.open(folder).volumes()}
    assert modalities == {"case_1": "T1", "case_2": "unknown"}


def test_predict_stops_before_the_run_when_the_contrast_cannot_be_told(tmp_path, capsys):
    from napari_pvs import io
    from napari_pvs.cli import main

    noise = np.random.default_rng(1).random((32, 32, 32)).astype(np.float32)
    unsure = io.save_ome_zarr(tmp_path / "case_3.zarr", noise, (1.0, 1.0, 1.0), levels=1)
    out = tmp_path / "pred.zarr"
    assert main(["predict", str(unsure), "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "case_3.zarr: cannot tell T1 from T2" in err and "--modality T1" in err
    assert "nothing was run" in err and not out.exists()

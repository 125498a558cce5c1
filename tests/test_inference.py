"""Chunked prediction: equal to a whole-volume sliding window, resumable, cancellable."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import zarr
from monai.inferers import sliding_window_inference

import tiny_models
from napari_pvs.inference import (
    DONE_ARRAY,
    Predictor,
    WindowPlan,
    display_level_shapes,
    importance_map,
    min_cluster_voxels,
    remove_small_clusters,
    window_starts,
)
from napari_pvs.intensity import normalize, robust_range
from napari_pvs.io import prediction_levels
from napari_pvs.metrics import label_clusters
from napari_pvs.progress import Cancelled


def tiny_unet(seed: int = 0, dropout: float = 0.2):
    return tiny_models.tiny_unet(seed, dropout)


def noisy_volume(shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = rng.normal(100.0, 20.0, shape).astype(np.float32)
    vol[:, :3] = 0  # some background, like a brain volume
    return vol


def monai_reference(model, volume: np.ndarray, window: int, overlap: float) -> np.ndarray:
    """Whole-volume sliding window (MONAI) on the same normalised input, probabilities blended."""
    lo, hi = robust_range(volume)
    x = torch.from_numpy(normalize(volume, lo, hi))[None, None]
    with torch.inference_mode():
        out = sliding_window_inference(
            x,
            (window,) * 3,
            2,
            lambda t: torch.sigmoid(model(t)),
            overlap=overlap,
            mode="gaussian",
        )
    return out[0, 0].numpy()


def read(group: zarr.Group, name: str) -> np.ndarray:
    return np.asarray(group[name][...])


def test_window_starts_match_monai_rule():
    assert window_starts(256, 64, 0.25) == ([0, 48, 96, 144, 192], 0)
    assert window_starts(200, 64, 0.25) == ([0, 48, 96, 136], 0)
    # smaller than the window: one window, padded symmetrically
    assert window_starts(10, 16, 0.25) == ([-3], 3)


def test_importance_map_is_monais():
    from monai.data.utils import compute_importance_map

    for window in [(16, 16, 16), (12, 20, 9)]:
        for mode in ("gaussian", "constant"):
            ours = importance_map(window, mode, 0.125)
            theirs = compute_importance_map(window, mode=mode, sigma_scale=0.125).numpy()
            np.testing.assert_array_equal(ours, theirs)


def test_cpu_reduced_precision_only_where_the_cpu_has_it(monkeypatch):
    import napari_pvs.models as models

    monkeypatch.setattr(models, "_cpu_has_native_bf16", lambda: False)
    assert models.autocast_dtype("cpu") is None
    assert Predictor(tiny_unet(), window=16, device="cpu").amp_dtype is None
    monkeypatch.setattr(models, "_cpu_has_native_bf16", lambda: True)
    assert models.autocast_dtype("cpu") == torch.bfloat16
    assert Predictor(tiny_unet(), window=16, device="cpu", amp=False).amp_dtype is None


@pytest.mark.skipif(
    __import__("napari_pvs.models").models.autocast_dtype("cpu") is None,
    reason="this CPU has no native bfloat16; inference stays in float32",
)
def test_bfloat16_inference_agrees_with_float32(tmp_path):
    model = tiny_unet()
    volume = noisy_volume((40, 36, 44))
    outs = {}
    for amp in (True, False):
        out = tmp_path / f"amp{amp}.zarr"
        Predictor(model, window=16, batch=2, device="cpu", amp=amp).predict(volume, out)
        group = zarr.open_group(str(out), mode="r")
        outs[amp] = read(group, "probability").astype(np.float32)
        precision = group.attrs["napari_pvs"]["run"]["precision"]
        assert precision == ("bfloat16" if amp else "float32")
    difference = np.abs(outs[True] - outs[False])
    assert 0 < difference.max() < 0.03  # really ran in bfloat16, and stayed close


@pytest.mark.skipif(
    __import__("napari_pvs.models").models.autocast_dtype("cpu") is None,
    reason="this CPU has no native bfloat16; inference stays in float32",
)
def test_bfloat16_fast_path_agrees_with_monai_on_the_same_weights(tmp_path):
    model = tiny_unet()
    volume = noisy_volume((41, 35, 50))
    predictor = Predictor(model, window=16, overlap=0.25, batch=2, device="cpu")
    assert predictor.amp_dtype == torch.bfloat16 and predictor.channels_last  # the fast path
    predictor.predict(volume, tmp_path / "bf16.zarr")
    probability = read(zarr.open_group(str(tmp_path / "bf16.zarr"), mode="r"), "probability")
    difference = np.abs(probability.astype(np.float32) - monai_reference(model, volume, 16, 0.25))
    assert 0 < difference.max() < 0.03


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_copy_fuses_norm_and_prelu_without_touching_the_model(dtype, channels_last):
    from napari_pvs.inference.fused import InstanceNormPReLU, OneSlopeLeakyReLU, inference_copy

    model = tiny_models.tiny_unet(channels=(4, 8, 16))
    with torch.no_grad():
        model.act.weight.fill_(0.1)  # the last activation: a slope other than the default
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy, fused = inference_copy(model, dtype, channels_last)
    assert fused == sum(isinstance(m, InstanceNormPReLU) for m in copy.modules()) > 0
    assert isinstance(copy.act, OneSlopeLeakyReLU) and copy.act.slope == pytest.approx(0.1)
    assert not any(isinstance(m, torch.nn.PReLU) for m in copy.modules())
    assert not any(isinstance(m, InstanceNormPReLU) for m in model.modules())
    for key, value in model.state_dict().items():  # the given model keeps its weights, exactly
        assert value.dtype == torch.float32 and torch.equal(value, before[key]), key
    x = torch.rand(3, 1, 16, 20, 24)  # several windows: each is normalised on its own
    with torch.inference_mode():
        expected = torch.sigmoid(model(x))
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            got = torch.sigmoid(copy(x).float())
        single = torch.sigmoid(model(x[1:2]))
    tolerance = 1e-5 if dtype is None else 0.03
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)
    torch.testing.assert_close(single, expected[1:2], atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_inference_copy_rewrites_the_cross_modal_models_instance_norms(dtype):
    """Affine instance norms outside norm + PReLU blocks (the default model's residual
    blocks) become per-sample batch norms: the same probabilities, the model untouched."""
    from napari_pvs.inference.fused import InstanceNormAsBatchNorm, inference_copy
    from test_models import tiny

    model = tiny("cross_modal", seed=2).eval()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(n.affine for n in norms)
    with torch.no_grad():  # affine parameters other than the initial 1 and 0
        for norm in norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.3, 0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy, rewritten = inference_copy(model, dtype, channels_last=True)
    assert rewritten == len(norms) == sum(isinstance(m, InstanceNormAsBatchNorm)
                                          for m in copy.modules())  # fmt: skip
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in copy.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.inference_mode():
        expected = torch.sigmoid(model(x, ["T2", "T1"]))
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            cl = x.contiguous(memory_format=torch.channels_last_3d)
            got = torch.sigmoid(copy(cl, ["T2", "T1"]).float())
    torch.testing.assert_close(got, expected, atol=1e-5 if dtype is None else 0.03, rtol=0)


@pytest.mark.parametrize("kind", ["zarr", "dask", "numpy", "one chunk"])
def test_windows_read_through_the_chunk_cache_equal_direct_reads(tmp_path, kind):
    """Boxes that cross chunk edges, and the volume's own edges, read through the cache equal
    the array's own slicing; the cache stays within its budget, and a volume stored as one
    chunk larger than a quarter of it is read directly."""
    import dask.array as da
    import zarr

    from napari_pvs.inference.inputs import ChunkCache

    values = np.random.default_rng(0).random((23, 30, 17)).astype(np.float32)
    stored = zarr.create_array(tmp_path / "v.zarr", shape=values.shape, chunks=(8, 7, 5),
                               dtype="float32")  # fmt: skip
    stored[...] = values
    data = {"zarr": stored, "dask": da.from_zarr(stored), "numpy": values,
            "one chunk": da.from_array(values, chunks=values.shape)}[kind]  # fmt: skip
    budget = 12 * 8 * 7 * 5 * 4  # twelve chunks
    cache = ChunkCache(data, budget_bytes=budget)
    assert (cache.bounds is None) == (kind in ("numpy", "one chunk"))
    rng = np.random.default_rng(1)
    for _ in range(40):
        lo = [int(rng.integers(0, n)) for n in values.shape]
        box = [(a, int(rng.integers(a + 1, n + 1))) for a, n in zip(lo, values.shape, strict=True)]
        got = cache.read(box)
        np.testing.assert_array_equal(got, values[tuple(slice(a, b) for a, b in box)])
        assert cache._bytes <= budget
    if kind in ("zarr", "dask"):
        assert len(cache._blocks) > 1


@pytest.mark.parametrize("kind", ["zarr", "dask", "numpy"])
def test_range_and_digest_samples_drawn_together_equal_each_drawn_alone(tmp_path, kind):
    """The predictor draws the range's and the digest's samples in one pass: the same values,
    so the run signature (and a resume of an existing store) does not change."""
    import dask.array as da
    import zarr

    from napari_pvs.inference.store import DIGEST_SAMPLE_VOXELS, input_digest, sample_digest
    from napari_pvs.intensity import RANGE_SAMPLE_VOXELS, sample_range, strided_samples

    values = noisy_volume((70, 64, 60))
    stored = zarr.create_array(tmp_path / "v.zarr", shape=values.shape, chunks=(16, 16, 16),
                               dtype="float32")  # fmt: skip
    stored[...] = values
    data = {"zarr": stored, "dask": da.from_zarr(stored), "numpy": values}[kind]
    # a range sample smaller than the volume, so the two strides differ (2 and 6)
    range_sample, digest_sample = strided_samples(data, 40_000, 2_000)
    assert range_sample.shape == (35, 32, 30) and digest_sample.shape == (12, 11, 10)
    assert sample_range(range_sample) == robust_range(values, max_voxels=40_000)
    assert sample_digest(digest_sample) == input_digest(values, 2_000)
    full_range, full_digest = strided_samples(data, RANGE_SAMPLE_VOXELS, DIGEST_SAMPLE_VOXELS)
    assert sample_range(full_range) == robust_range(values)
    assert sample_digest(full_digest) == input_digest(values)


def test_channels_last_by_default_only_for_models_with_the_fused_path():
    assert Predictor(tiny_unet(), window=16, device="cpu").channels_last

    class NoNorm(torch.nn.Module):  # nothing to fuse: run as given, contiguous
        name, config, size_divisor = "no_norm", {}, 1

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)
            self.mc_head = torch.nn.Conv3d(2, 1, 1)

        def features(self, image, modality=None):
            return self.conv(image)

        def head(self, features, sample=False):
            return self.mc_head(features)

    model = NoNorm()
    predictor = Predictor(model, window=16, device="cpu")
    assert not predictor.channels_last
    assert predictor.engine.runners[0] is model
    asked = Predictor(tiny_unet(), window=16, device="cpu", channels_last=False)
    assert asked.channels_last is False


def test_every_chunk_completes_after_its_last_window():
    plan = WindowPlan((70, 50, 41), (16, 16, 16), 0.25, (12, 24, 12))
    for chunk, rank in plan.finish_rank.items():
        assert max(plan.rank[w] for w in plan.covering_windows(chunk)) == rank


def test_chunked_equals_whole_volume_sliding_window(tmp_path):
    model = tiny_unet()
    volume = noisy_volume((41, 35, 50))
    affine = np.diag([0.5, 0.6, 0.7, 1.0])
    affine[:3, 3] = [10, 20, 30]

    class Vol:
        data = volume
        spacing = (0.5, 0.6, 0.7)
        modality = "T2"
        axes = ("z", "y", "x")
        source = None

    Vol.affine = affine
    predictor = Predictor(
        model, window=16, overlap=0.25, batch=3, chunks=12, device="cpu", amp=False
    )
    summary = predictor.predict(Vol(), tmp_path / "pred.zarr")
    assert summary.chunks_total == 4 * 3 * 5  # chunk borders run through the volume
    group = zarr.open_group(str(tmp_path / "pred.zarr"), mode="r")
    probability = read(group, "probability").astype(np.float32)
    assert probability.shape == volume.shape
    assert set(group.array_keys()) == {"probability", "segmentation", DONE_ARRAY}
    reference = monai_reference(model, volume, 16, 0.25)
    np.testing.assert_allclose(probability, reference, atol=2e-3)
    clear = np.abs(reference - 0.5) > 2e-3  # float16 storage may round across 0.5
    segmentation = read(group, "segmentation")
    np.testing.assert_array_equal(segmentation[clear], (reference >= 0.5)[clear])
    assert 0 < segmentation.mean() < 1
    meta = group.attrs["napari_pvs"]
    assert meta["spacing"] == [0.5, 0.6, 0.7]
    np.testing.assert_allclose(meta["affine"], affine)
    assert meta["complete"] is True
    assert group["probability"].attrs["napari_pvs"]["spacing"] == [0.5, 0.6, 0.7]


def test_volume_smaller_than_window_is_padded(tmp_path):
    model = tiny_unet()
    volume = noisy_volume((10, 40, 7))
    predictor = Predictor(model, window=16, batch=2, device="cpu", amp=False)
    predictor.predict(volume, tmp_path / "p.zarr")
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    probability = read(group, "probability").astype(np.float32)
    assert probability.shape == (10, 40, 7)
    np.testing.assert_allclose(probability, monai_reference(model, volume, 16, 0.25), atol=2e-3)


def test_window_not_divisible_by_size_divisor(tmp_path):
    model = tiny_models.tiny_unet(channels=(4, 8, 16))
    assert model.size_divisor == 4
    volume = noisy_volume((30, 25, 22))
    Predictor(model, window=18, batch=2, device="cpu").predict(volume, tmp_path / "p.zarr")
    probability = read(zarr.open_group(str(tmp_path / "p.zarr"), mode="r"), "probability")
    assert probability.shape == volume.shape
    assert np.isfinite(probability).all() and 0 < probability.mean() < 1


def test_uncertainty_arrays_with_mc(tmp_path):
    model = tiny_unet(dropout=0.5)
    volume = noisy_volume((30, 28, 26))
    Predictor(model, window=16, batch=4, device="cpu", mc_samples=4).predict(
        volume, tmp_path / "p.zarr"
    )
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    p = read(group, "probability").astype(np.float32)
    entropy = read(group, "entropy").astype(np.float32)
    mi = read(group, "mutual_information").astype(np.float32)
    variance = read(group, "variance").astype(np.float32)
    q = np.clip(p, 1e-7, 1 - 1e-7)
    np.testing.assert_allclose(entropy, -(q * np.log2(q) + (1 - q) * np.log2(1 - q)), atol=5e-3)
    assert (mi >= 0).all() and (mi <= entropy + 1e-3).all() and mi.max() > 0
    assert (variance >= 0).all() and (variance <= p * (1 - p) + 1e-3).all()


def test_resume_after_interruption_gives_identical_output(tmp_path):
    model = tiny_unet(dropout=0.5)
    volume = noisy_volume((64, 24, 20))  # long in z: early rows finish and are skipped
    options = dict(window=16, overlap=0.25, batch=2, chunks=12, device="cpu", mc_samples=3)

    Predictor(model, **options).predict(volume, tmp_path / "full.zarr")

    cancel = threading.Event()
    calls = []

    def stop_midway(done, total, message):
        calls.append(done)
        if done >= 0.7 * total:
            cancel.set()

    with pytest.raises(Cancelled):
        Predictor(model, **options).predict(
            volume, tmp_path / "resumed.zarr", progress=stop_midway, cancel=cancel
        )
    partial = zarr.open_group(str(tmp_path / "resumed.zarr"), mode="r")
    finished = read(partial, DONE_ARRAY).sum()
    assert 0 < finished < partial[DONE_ARRAY].size
    assert partial.attrs["napari_pvs"]["complete"] is False

    summary = Predictor(model, **options).predict(volume, tmp_path / "resumed.zarr")
    assert summary.chunks_skipped == finished
    assert summary.windows_run < summary.windows_total
    full = zarr.open_group(str(tmp_path / "full.zarr"), mode="r")
    resumed = zarr.open_group(str(tmp_path / "resumed.zarr"), mode="r")
    for name in ("probability", "segmentation", "entropy", "mutual_information", "variance"):
        np.testing.assert_array_equal(read(resumed, name), read(full, name), err_msg=name)
    assert resumed.attrs["napari_pvs"]["complete"] is True


KILLED_RUN = """
import os, signal, sys
import numpy as np
sys.path.insert(0, {tests!r})
import tiny_models
from napari_pvs.inference import Predictor

def kill_midway(done, total, message):
    if done >= total // 2:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final sync: as a crash

volume = np.load({volume!r})
Predictor(tiny_models.tiny_unet(dropout=0.5), **{options!r}).predict(
    volume, {out!r}, progress=kill_midway
)
"""


def test_resume_after_a_kill_gives_byte_identical_output(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    volume = noisy_volume((64, 24, 20))
    np.save(tmp_path / "volume.npy", volume)
    options = dict(window=16, overlap=0.25, batch=2, chunks=12, device="cpu", mc_samples=3)
    model = tiny_unet(dropout=0.5)
    Predictor(model, **options).predict(volume, tmp_path / "full.zarr")

    script = KILLED_RUN.format(
        tests=str(Path(__file__).parent),
        volume=str(tmp_path / "volume.npy"),
        options=options,
        out=str(tmp_path / "killed.zarr"),
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    partial = zarr.open_group(str(tmp_path / "killed.zarr"), mode="r")
    assert partial.attrs["napari_pvs"]["complete"] is False

    summary = Predictor(model, **options).predict(volume, tmp_path / "killed.zarr")
    assert summary.windows_run <= summary.windows_total
    full = zarr.open_group(str(tmp_path / "full.zarr"), mode="r")
    resumed = zarr.open_group(str(tmp_path / "killed.zarr"), mode="r")
    for name in ("probability", "segmentation", "entropy", "mutual_information", "variance"):
        np.testing.assert_array_equal(read(resumed, name), read(full, name), err_msg=name)
    assert resumed.attrs["napari_pvs"]["complete"] is True


class CountingModel(torch.nn.Module):
    """Wraps a model and counts how many batches reach ``features``."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.name, self.config, self.size_divisor = inner.name, inner.config, inner.size_divisor
        self.calls = 0

    def features(self, image, modality=None):
        self.calls += 1
        return self.inner.features(image, modality)

    def head(self, features, sample=False):
        return self.inner.head(features, sample=sample)


@pytest.mark.parametrize("lanes", [1, 2])
def test_cancel_stops_within_one_batch_per_lane(tmp_path, lanes):
    """Cancelled after the first batch is blended: the batches already running on the network
    lanes finish, nothing new starts."""
    model = CountingModel(tiny_unet())
    cancel = threading.Event()
    seen = []

    def cancel_after_first_batch(done, total, message):
        seen.append(done)
        if done > 0:
            cancel.set()

    predictor = Predictor(model, window=16, batch=2, device="cpu", lanes=lanes)
    with pytest.raises(Cancelled):
        predictor.predict(
            noisy_volume((40, 40, 40)), tmp_path / "p.zarr", cancel_after_first_batch, cancel
        )
    # the inference copy ran: the first batch, and the others already on a lane (a batch
    # still waiting for its lane when the cancel came is dropped)
    assert 1 <= predictor.engine.runners[0].calls <= lanes
    assert seen == [0, 2]


def test_network_lanes_write_the_same_bytes_and_draws(tmp_path):
    """Batches run at once on several lanes write the same bytes whichever lane runs which
    batch, MC-dropout draws included (each batch draws from its own stream), and what one lane
    on both threads writes up to rounding; torch's thread count is as before afterwards."""
    model = tiny_unet(dropout=0.5)
    volume = noisy_volume((40, 30, 36))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stores = {}
        for lanes in (1, 2, 3):
            out = tmp_path / f"lanes{lanes}.zarr"
            Predictor(model, window=16, batch=2, device="cpu", mc_samples=3, tta=4, lanes=lanes,
                      amp=False).predict(volume, out)  # fmt: skip
            assert torch.get_num_threads() == 2
            stores[lanes] = zarr.open_group(str(out), mode="r")
    finally:
        torch.set_num_threads(threads)
    for name in ("probability", "entropy", "mutual_information", "variance"):
        # two and three lanes: one thread each, so the same sums in the same order
        np.testing.assert_array_equal(read(stores[3], name), read(stores[2], name))
        # one lane on two threads: sums split across threads round differently, no more
        np.testing.assert_allclose(
            read(stores[2], name).astype(np.float32),
            read(stores[1], name).astype(np.float32),
            atol=2e-3,
        )
    np.testing.assert_array_equal(read(stores[3], "segmentation"), read(stores[2], "segmentation"))
    assert read(stores[1], "mutual_information").max() > 0  # the draws differed per sample


def test_default_lanes_one_per_thread_in_bfloat16_on_cpu_only():
    from napari_pvs.inference.engine import MAX_LANES, default_lanes

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_lanes(cpu, 2, torch.bfloat16) == 2
    assert default_lanes(cpu, 1, torch.bfloat16) == 1
    assert default_lanes(cpu, 16, torch.bfloat16) == MAX_LANES == 4
    assert default_lanes(cpu, 2, None) == 1  # float32: one lane (memory)
    assert default_lanes(cuda, 8, torch.float16) == 1


def test_batch_draws_continue_each_batchs_own_stream():
    """Sections of two batches' draws, interleaved as lanes make them, draw what each batch
    drew alone from its seed, and leave the process's generator as it was."""
    from napari_pvs.inference.engine import BatchDraws

    first, second = BatchDraws(7, torch.device("cpu")), BatchDraws(8, torch.device("cpu"))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    drawn = {7: [], 8: []}
    for draws, seed in ((first, 7), (second, 8), (first, 7), (first, 7), (second, 8)):
        with draws():
            drawn[seed].append(torch.rand(3))
    assert torch.equal(torch.get_rng_state(), before)
    for seed, values in drawn.items():
        torch.manual_seed(seed)
        assert torch.equal(torch.cat(values), torch.rand(3 * len(values)))


def test_incompatible_store_is_refused_with_the_difference(tmp_path):
    model = tiny_unet()
    volume = noisy_volume((20, 20, 20))
    Predictor(model, window=16, device="cpu").predict(volume, tmp_path / "p.zarr")
    with pytest.raises(ValueError, match=r"different run .*window: \[16, 16, 16\] -> \[12"):
        Predictor(model, window=12, device="cpu").predict(volume, tmp_path / "p.zarr")
    # overwrite=True starts afresh
    summary = Predictor(model, window=12, device="cpu").predict(
        volume, tmp_path / "p.zarr", overwrite=True
    )
    assert summary.chunks_skipped == 0
    # a finished store reruns nothing
    again = Predictor(model, window=12, device="cpu").predict(volume, tmp_path / "p.zarr")
    assert again.windows_run == 0 and again.chunks_skipped == again.chunks_total

    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w").create_array("x", shape=(2,), dtype="uint8")
    with pytest.raises(ValueError, match="not a napari-pvs prediction store"):
        Predictor(model, window=16, device="cpu").predict(volume, other)


def test_bad_arguments_have_clear_messages():
    model = tiny_unet()
    with pytest.raises(ValueError, match="overlap"):
        Predictor(model, overlap=1.0)
    with pytest.raises(ValueError, match="features/head contract"):
        Predictor(torch.nn.Conv3d(1, 1, 1))
    with pytest.raises(ValueError, match="3D volume"):
        Predictor(model, window=16, device="cpu").predict(np.zeros((4, 4)), "unused.zarr")
    with pytest.raises(ValueError, match="memory must be one of"):
        Predictor(model, memory="hoard")
    with pytest.raises(ValueError, match="lanes must be at least 1"):
        Predictor(model, lanes=0)


def test_heap_policies_change_memory_use_not_results(tmp_path):
    """Frontier cells live in their own mappings and the C heap policy only decides what is
    kept for reuse: every policy writes the same bytes."""
    from napari_pvs.inference import blending
    from napari_pvs.memory import MEMORY_POLICIES

    model = tiny_unet(dropout=0.3)
    volume = noisy_volume((40, 30, 36))
    mapped = []
    original = blending.mapped_copy

    def tracking_copy(array):
        copy = original(array)
        np.testing.assert_array_equal(copy, array)
        assert copy.base is not None and not np.shares_memory(copy, array)
        mapped.append(copy.shape)
        return copy

    stores = {}
    for policy in MEMORY_POLICIES:
        predictor = Predictor(model, window=16, chunks=12, device="cpu", mc_samples=2,
                              memory=policy)  # fmt: skip
        if policy == "reuse":
            blending.mapped_copy = tracking_copy
        try:
            predictor.predict(volume, tmp_path / f"{policy}.zarr")
        finally:
            blending.mapped_copy = original
        stores[policy] = zarr.open_group(str(tmp_path / f"{policy}.zarr"), mode="r")
    assert mapped  # the run kept its frontier cells in mappings
    for name in ("probability", "segmentation", "entropy", "mutual_information", "variance"):
        for policy in ("return", "system"):
            np.testing.assert_array_equal(read(stores[policy], name), read(stores["reuse"], name))


def test_predicts_a_lazy_volume_from_io(tmp_path):
    from napari_pvs.io import open_volume, save_ome_zarr

    volume = noisy_volume((24, 30, 20))
    save_ome_zarr(tmp_path / "img.ome.zarr", volume, spacing=(1.0, 0.8, 0.8), levels=1, chunks=16)
    lazy = open_volume(tmp_path / "img.ome.zarr")
    model = tiny_unet()
    Predictor(model, window=16, device="cpu", amp=False).predict(lazy, tmp_path / "p.zarr")
    probability = open_volume(tmp_path / "p.zarr" / "probability")
    assert probability.shape == volume.shape
    assert probability.spacing == (1.0, 0.8, 0.8)
    reference = monai_reference(model, volume, 16, 0.25)
    np.testing.assert_allclose(probability.data.compute().astype(np.float32), reference, atol=2e-3)


# --------------------------------------------------------------------------------------------
# the CLI: napari-pvs predict / rank


@pytest.fixture()
def cli_case(tmp_path):
    from napari_pvs.io import save_nifti
    from napari_pvs.models.checkpoint import save_checkpoint

    checkpoint = save_checkpoint(tiny_unet(dropout=0.5), tmp_path / "tiny.safetensors")
    affine = np.array([[0, 0, 1.2, -30], [0, 0.9, 0, -40], [1.1, 0, 0, -50], [0, 0, 0, 1]])
    image = save_nifti(tmp_path / "sub-01_T2w.nii.gz", noisy_volume((22, 26, 20)), affine)
    return tmp_path, str(checkpoint), str(image), affine


def test_cli_predict_then_rank(cli_case, capsys):
    from napari_pvs.cli import main

    tmp_path, checkpoint, image, _ = cli_case
    out = tmp_path / "pred.zarr"
    common = ["--model", checkpoint, "--device", "cpu", "--window", "16", "--batch", "2"]
    assert main(["predict", image, "--out", str(out), "--mc", "2", "--float32", *common]) == 0
    group = zarr.open_group(str(out), mode="r")
    assert group["mutual_information"].shape == (22, 26, 20)
    assert group.attrs["napari_pvs"]["modality"] == "T2"
    assert group.attrs["napari_pvs"]["run"]["precision"] == "float32"
    capsys.readouterr()
    assert main(["rank", str(out), "--n", "3", "--patch", "8", "--strategy", "bald"]) == 0
    printed = capsys.readouterr().out
    assert "pred.ranking-bald.csv" in printed
    assert (tmp_path / "pred.ranking-bald.json").exists()
    # --tta N averages N mirrorings (--tta alone: all 8); the default follows the model's rule
    for flags, expected in (([], 1), (["--tta", "4"], 4), (["--tta"], 8)):
        store = tmp_path / f"tta{expected}.zarr"
        assert main(["predict", image, "--out", str(store), *flags, *common]) == 0
        run = zarr.open_group(str(store), mode="r").attrs["napari_pvs"]["run"]
        assert run["tta"] == expected
    lean = tmp_path / "lean.zarr"
    assert main(["predict", image, "--out", str(lean), "--memory", "return", *common]) == 0
    np.testing.assert_array_equal(
        zarr.open_group(str(lean))["probability"][...],
        zarr.open_group(str(tmp_path / "tta1.zarr"))["probability"][...],
    )
    with pytest.raises(SystemExit):
        main(["predict", image, "--out", str(tmp_path / "x.zarr"), "--tta", "3", *common])
    assert "invalid choice" in capsys.readouterr().err
    # the recorded input is used to skip air; asking for more tissue than exists is refused
    args = ["rank", str(out), "--patch", "8", "--min-tissue", "1.01"]
    assert main(args) == 2
    assert "tissue" in capsys.readouterr().err
    assert main([*args[:-1], "0"]) == 0  # filter off
    assert main([*args[:-2], "--image", str(tmp_path / "gone.nii.gz")]) == 2
    assert "already exists" in capsys.readouterr().err  # the ranking just written is kept
    assert main([*args[:-2], "--image", str(tmp_path / "gone.nii.gz"), "--overwrite"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_predict_to_nifti_keeps_the_affine(cli_case):
    import nibabel as nib

    from napari_pvs.cli import main

    tmp_path, checkpoint, image, affine = cli_case
    out = tmp_path / "seg.nii.gz"
    args = ["predict", image, "--out", str(out), "--model", checkpoint, "--window", "16"]
    assert main([*args, "--device", "cpu"]) == 0
    written = nib.load(str(out))
    np.testing.assert_allclose(written.affine, affine)
    seg = np.asarray(written.dataobj)
    stored = zarr.open_group(str(tmp_path / "seg.zarr"), mode="r")["segmentation"][...]
    np.testing.assert_array_equal(seg, stored)


def test_cli_predict_bad_input_messages(cli_case, capsys, monkeypatch):
    from napari_pvs import cohort
    from napari_pvs.cli import main

    monkeypatch.setattr(cohort, "CONNECT_TIMEOUT", 2.0)

    tmp_path, checkpoint, image, _ = cli_case
    out = str(tmp_path / "p.zarr")
    assert main(["predict", image, "--out", out, "--model", str(tmp_path / "nope.st")]) == 2
    assert "does not exist" in capsys.readouterr().err
    code = main(
        ["predict", image, "--out", out, "--model", checkpoint, "--scheduler",
         "tcp://127.0.0.1:9", "--window", "16"]
    )  # fmt: skip
    assert code == 2 and "could not reach the dask scheduler" in capsys.readouterr().err
    if not torch.cuda.is_available():
        args = ["predict", image, "--out", out, "--model", checkpoint, "--window", "16"]
        assert main([*args, "--device", "cuda"]) == 0
        assert "falling back to CPU" in capsys.readouterr().err


def without_small_clusters(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Reference: label the whole mask at once and keep clusters of >= min_voxels voxels."""
    labels, count = label_clusters(mask > 0)
    keep = np.bincount(labels.ravel(), minlength=count + 1) >= min_voxels
    keep[0] = False
    return keep[labels]


def test_small_clusters_are_removed_chunk_by_chunk_exactly():
    rng = np.random.default_rng(0)
    mask = (rng.random((37, 41, 30)) < 0.08).astype(np.uint8)
    mask[2:30, 20, 20] = 1  # one long cluster through several chunks
    for min_voxels in (2, 3, 5, 9):
        expected = without_small_clusters(mask, min_voxels)
        chunked = mask.copy()
        removed = remove_small_clusters(chunked, min_voxels, (8, 9, 10))
        np.testing.assert_array_equal(chunked.astype(bool), expected)
        assert removed == int(mask.sum() - expected.sum()) > 0
        assert remove_small_clusters(chunked, min_voxels, (8, 9, 10)) == 0  # idempotent
    stored = zarr.create_array(zarr.storage.MemoryStore(), shape=mask.shape, chunks=(12, 12, 12),
                               dtype="uint8")  # fmt: skip
    stored[...] = mask
    remove_small_clusters(stored, 4, (12, 12, 12))
    np.testing.assert_array_equal(stored[...].astype(bool), without_small_clusters(mask, 4))
    assert min_cluster_voxels(3.0, (1, 1, 1)) == 3
    assert min_cluster_voxels(3.0, (0.5, 0.5, 0.5)) == 24
    assert min_cluster_voxels(0, (1, 1, 1)) == 0


def test_segmentation_follows_the_models_calibrated_rule(tmp_path):
    model = tiny_unet()
    volume = noisy_volume((30, 34, 28))
    Predictor(model, window=16, device="cpu", amp=False).predict(volume, tmp_path / "all.zarr")
    model.segmentation_rule = {"threshold": 0.5, "min_cluster_mm3": 4.0}
    predictor = Predictor(model, window=16, device="cpu", amp=False)
    summary = predictor.predict(volume, tmp_path / "rule.zarr")
    everything = read(zarr.open_group(str(tmp_path / "all.zarr"), mode="r"), "segmentation")
    group = zarr.open_group(str(tmp_path / "rule.zarr"), mode="r")
    expected = without_small_clusters(everything, 4)
    assert expected.sum() < everything.sum()  # the case has small clusters to remove
    np.testing.assert_array_equal(read(group, "segmentation").astype(bool), expected)
    assert summary.small_cluster_voxels_removed == int(everything.sum() - expected.sum())
    assert group.attrs["napari_pvs"]["run"]["min_cluster_mm3"] == 4.0
    # an explicit argument wins over the model's rule
    assert Predictor(model, window=16, device="cpu", min_cluster_mm3=0).min_cluster_mm3 == 0
    # the rule's test-time mirrorings are averaged, and give uncertainty maps as samples do
    model.segmentation_rule = {"threshold": 0.5, "min_cluster_mm3": 0.0, "tta": 4}
    Predictor(model, window=16, device="cpu", amp=False).predict(volume, tmp_path / "tta.zarr")
    mirrored = zarr.open_group(str(tmp_path / "tta.zarr"), mode="r")
    model.segmentation_rule = {"threshold": 0.5, "min_cluster_mm3": 0.0}
    explicit = Predictor(model, window=16, device="cpu", amp=False, tta=4)
    explicit.predict(volume, tmp_path / "explicit.zarr")
    explicit_group = zarr.open_group(str(tmp_path / "explicit.zarr"), mode="r")
    np.testing.assert_array_equal(
        read(mirrored, "probability"), read(explicit_group, "probability")
    )
    assert not np.array_equal(read(mirrored, "probability"), read(group, "probability"))
    assert "entropy" in mirrored and mirrored.attrs["napari_pvs"]["run"]["tta"] == 4
    assert Predictor(model, window=16, device="cpu", tta=False).tta == 1
    with pytest.raises(ValueError, match="min_cluster_mm3"):
        Predictor(model, window=16, device="cpu", min_cluster_mm3=-1)


def block_max(array: np.ndarray) -> np.ndarray:
    """Reference 2x2x2 max-pooling (floor), for the display levels."""
    z, y, x = (s // 2 * 2 for s in array.shape)
    a = array[:z, :y, :x]
    return a.reshape(z // 2, 2, y // 2, 2, x // 2, 2).max(axis=(1, 3, 5))


def test_large_predictions_get_max_pooled_display_levels(tmp_path):
    model = tiny_unet(dropout=0.5)
    volume = noisy_volume((70, 36, 33))  # odd edges: floor halving
    Predictor(model, window=16, batch=2, device="cpu", mc_samples=2, display_edge=20).predict(
        volume, tmp_path / "p.zarr"
    )
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    assert display_level_shapes((70, 36, 33), 20) == [(35, 18, 16), (17, 9, 8), (8, 4, 4)]
    assert display_level_shapes((20, 20, 20), 20) == []  # within the edge: full resolution only
    for name in ("probability", "segmentation", "entropy"):
        levels = prediction_levels(group, name, tmp_path / "p.zarr")
        assert [tuple(level.shape) for level in levels] == [
            (70, 36, 33), (35, 18, 16), (17, 9, 8), (8, 4, 4)
        ]  # fmt: skip
        full = read(group, name)
        np.testing.assert_array_equal(np.asarray(levels[1]), block_max(full), err_msg=name)
        np.testing.assert_array_equal(np.asarray(levels[2]), block_max(block_max(full)))
        np.testing.assert_array_equal(np.asarray(levels[3]), block_max(block_max(block_max(full))))
        shown = prediction_levels(group, name, tmp_path / "p.zarr", display=True)
        for view, level in zip(shown, levels, strict=True):  # the same values, read directly
            np.testing.assert_array_equal(np.asarray(view[3]), level[3].compute())
        assert levels[1].dtype == full.dtype
    # a thin tube one voxel wide is still there two halvings down (a stride would lose it)
    assert np.asarray(prediction_levels(group, "segmentation", "p")[2]).any() == bool(
        read(group, "segmentation").any()
    )
    # small predictions (the default edge) get none, and show at full resolution alone
    Predictor(model, window=16, batch=2, device="cpu").predict(volume, tmp_path / "small.zarr")
    small = zarr.open_group(str(tmp_path / "small.zarr"), mode="r")
    assert len(prediction_levels(small, "probability", tmp_path / "small.zarr")) == 1


def test_display_levels_are_used_only_once_complete(tmp_path):
    """A cancel while the levels are written leaves the store drawable at full resolution,
    not complete, and the rerun writes the levels again."""
    model = tiny_unet()
    volume = noisy_volume((48, 40, 40))
    cancel = threading.Event()

    def cancel_at_levels(done, total, message):
        if message == "writing display levels":
            cancel.set()

    options = dict(window=16, batch=2, device="cpu", display_edge=16)
    with pytest.raises(Cancelled):
        Predictor(model, **options).predict(volume, tmp_path / "p.zarr", cancel_at_levels, cancel)
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    assert group.attrs["napari_pvs"]["complete"] is False
    assert len(prediction_levels(group, "probability", tmp_path / "p.zarr")) == 1
    summary = Predictor(model, **options).predict(volume, tmp_path / "p.zarr")
    assert summary.windows_run == 0  # every chunk was done: only the levels were missing
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    levels = prediction_levels(group, "probability", tmp_path / "p.zarr")
    assert len(levels) == 4 and group.attrs["napari_pvs"]["complete"] is True  # 24, 12, 6
    np.testing.assert_array_equal(np.asarray(levels[1]), block_max(read(group, "probability")))


def test_a_completed_store_records_its_pvs_count_and_showing_it_reads_no_voxel(
    tmp_path, monkeypatch
):
    """The predictor records the segmentation's voxels and 26-connected clusters when it
    completes the store (the Segment step showed a 1024^3 count by reading 1 GB beside a
    scrolling viewer); the panel's statistics read the record, and an older store without one
    is counted from its voxels, to the same figures."""
    from napari_pvs._widgets import segment_run
    from napari_pvs.io import ATTRS_KEY
    from napari_pvs.io.predictions import recorded_pvs_count

    model = tiny_unet()
    volume = noisy_volume((30, 34, 28))
    Predictor(model, window=16, device="cpu", amp=False).predict(volume, tmp_path / "p.zarr")
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    mask = read(group, "segmentation") > 0
    expected = (int(mask.sum()), label_clusters(mask)[1])
    assert expected[0] > 0 and expected[1] > 1  # the case has several clusters to count
    assert recorded_pvs_count(group) == expected
    voxel_mm3 = 1.0  # noisy volumes are numpy arrays: unit spacing
    with monkeypatch.context() as patched:  # the record is read: counting would fail
        patched.setattr(segment_run, "count_pvs", lambda _: pytest.fail("counted again"))
        assert segment_run.pvs_statistics(tmp_path / "p.zarr") == (
            expected[0], expected[0] * voxel_mm3, expected[1]
        )  # fmt: skip
        assert segment_run.pvs_cluster_count(tmp_path / "p.zarr") == expected[1]
    # an older store, completed before counts were recorded: counted from its voxels
    writable = zarr.open_group(str(tmp_path / "p.zarr"), mode="r+")
    attrs = dict(writable.attrs[ATTRS_KEY])
    del attrs["pvs"]
    writable.attrs[ATTRS_KEY] = attrs
    assert recorded_pvs_count(writable) is None
    assert segment_run.pvs_statistics(tmp_path / "p.zarr") == (
        expected[0], expected[0] * voxel_mm3, expected[1]
    )  # fmt: skip
    # an incomplete store's record is not trusted
    attrs.update(complete=False, pvs={"voxels": 1, "clusters": 1})
    writable.attrs[ATTRS_KEY] = attrs
    assert recorded_pvs_count(writable) is None


def test_count_pvs_counts_26_connected_clusters_and_stops_at_its_size_limit(monkeypatch):
    from napari_pvs import metrics

    mask = np.zeros((10, 12, 14), np.uint8)
    mask[1, 1, 1] = mask[2, 2, 2] = 1  # corner neighbours: one cluster
    mask[6:9, 5, 5] = 1
    store = zarr.create_array(zarr.storage.MemoryStore(), shape=mask.shape, chunks=(4, 4, 4),
                              dtype="uint8")  # fmt: skip
    store[...] = mask
    assert metrics.count_pvs(store) == (5, 2)
    assert metrics.count_pvs(np.zeros((3, 3, 3), np.uint8)) == (0, 0)
    monkeypatch.setattr(metrics, "MAX_COUNT_VOXELS", mask.size - 1)
    assert metrics.count_pvs(store) == (5, None)  # voxels still summed, clusters not counted

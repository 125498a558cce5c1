"""Uncertainty measures and samplers: reference values, shared-feature MC == naive MC."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models
from napari_pvs.models import build_model
from napari_pvs.uncertainty import (
    MomentAccumulator,
    binary_entropy,
    flip_sets,
    mc_samples,
    naive_mc_samples,
    predictive_moments,
    predictive_samples,
    sample_count,
    uncertainty_from_moments,
)


def tiny_unet(seed: int = 0, dropout: float = 0.5):
    return tiny_models.tiny_unet(seed, dropout)


def test_measures_match_a_direct_computation():
    rng = np.random.default_rng(0)
    samples = rng.uniform(0, 1, (6, 1, 1, 3, 4, 5)).astype(np.float32)
    acc = MomentAccumulator()
    for s in samples:
        acc.add(torch.from_numpy(s))
    moments = acc.moments().numpy()[0]
    measures = uncertainty_from_moments(*moments)

    def h(p):
        return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))

    mean = samples.mean(0)[0, 0]
    np.testing.assert_allclose(measures["entropy"], h(mean), rtol=1e-4)
    expected_mi = h(mean) - h(samples[:, 0, 0]).mean(0)
    np.testing.assert_allclose(measures["mutual_information"], expected_mi, atol=1e-5)
    np.testing.assert_allclose(measures["variance"], samples.var(0)[0, 0], atol=1e-6)
    assert binary_entropy(np.float32(0.5)) == np.float32(1.0)


def test_agreeing_samples_have_no_mutual_information():
    p = torch.full((1, 1, 2, 2, 2), 0.3)
    acc = MomentAccumulator()
    for _ in range(4):
        acc.add(p)
    measures = uncertainty_from_moments(*acc.moments().numpy()[0])
    np.testing.assert_allclose(measures["mutual_information"], 0, atol=1e-6)
    np.testing.assert_allclose(measures["variance"], 0, atol=1e-6)
    np.testing.assert_allclose(measures["entropy"], binary_entropy(np.float32(0.3)), rtol=1e-5)


def test_shared_feature_mc_equals_naive_mc_on_a_seeded_case():
    model = tiny_unet()
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        torch.manual_seed(123)
        shared = torch.stack(list(mc_samples(model, image, "T2", 24)))
        torch.manual_seed(123)
        naive = torch.stack(list(naive_mc_samples(model, image, "T2", 24)))
        deterministic = torch.sigmoid(model(image, "T2"))
    # features use no randomness, so the same seed gives the same dropout masks...
    torch.testing.assert_close(shared, naive, atol=1e-5, rtol=1e-5)
    # ...and the samples really are random draws around the deterministic prediction
    assert shared.std(0).mean() > 1e-3
    # same distribution over seeds: per-voxel means of independent runs agree statistically
    with torch.inference_mode():
        torch.manual_seed(7)
        other = torch.stack(list(naive_mc_samples(model, image, "T2", 24)))
    spread = shared.std(0) / np.sqrt(24)
    assert ((shared.mean(0) - other.mean(0)).abs() <= 5 * spread + 1e-4).float().mean() > 0.99
    assert (shared.mean(0) - deterministic).abs().mean() < 0.05


def test_shared_mc_runs_the_expensive_part_once():
    model = tiny_unet()
    calls = {"features": 0}
    original = model.features

    def counted(image, modality=None):
        calls["features"] += 1
        return original(image, modality)

    model.features = counted
    with torch.inference_mode():
        list(mc_samples(model, torch.randn(1, 1, 16, 16, 16), "T1", 8))
        assert calls["features"] == 1
        list(naive_mc_samples(model, torch.randn(1, 1, 16, 16, 16), "T1", 8))
        assert calls["features"] == 9


class Pointwise(torch.nn.Module):
    """A voxel-wise model: any flip of the input flips the output the same way."""

    name, config, size_divisor = "pointwise", {}, 1

    def features(self, image, modality=None):
        return torch.cat([image, image**2], dim=1)

    def head(self, features, sample=False):
        return features[:, :1] * 2 - features[:, 1:]


class Shifted(torch.nn.Module):
    """A model whose output depends on position: flipping changes what it predicts."""

    name, config, size_divisor = "shifted", {}, 1

    def features(self, image, modality=None):
        return torch.roll(image, 1, dims=2)

    def head(self, features, sample=False):
        return features


def test_tta_flips_are_undone_before_combining():
    assert len(flip_sets(True)) == 8 and flip_sets(False) == [()]
    image = torch.randn(1, 1, 6, 5, 4)
    samples = list(predictive_samples([Pointwise()], image, None, mc=0, tta=True))
    assert len(samples) == sample_count(1, 0, True) == 8
    for s in samples:
        torch.testing.assert_close(s, samples[0])
    # a position-dependent model disagrees with itself under flips: TTA sees it
    shifted = torch.stack(list(predictive_samples([Shifted()], image, None, mc=0, tta=True)))
    assert shifted.std(0).max() > 0.05


def test_four_mirrorings_are_the_identity_and_one_mirror_per_axis():
    assert flip_sets(4) == [(), (2,), (3,), (4,)] and flip_sets(8) == flip_sets(True)
    assert flip_sets(1) == flip_sets(False) == [()]
    image = torch.randn(1, 1, 6, 5, 4)
    samples = list(predictive_samples([Shifted()], image, None, mc=0, tta=4))
    assert len(samples) == sample_count(1, 0, 4) == 4
    # each sample is the model run on the mirrored input, mirrored back
    for flip, sample in zip(flip_sets(4), samples, strict=True):
        mirrored = torch.flip(image, flip) if flip else image
        expected = torch.sigmoid(torch.roll(mirrored, 1, dims=2))
        torch.testing.assert_close(sample, torch.flip(expected, flip) if flip else expected)
    with pytest.raises(ValueError, match="one of"):
        flip_sets(3)


def test_ensemble_yields_one_sample_per_member_and_draw():
    models = [tiny_unet(0), tiny_unet(1)]
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        samples = list(predictive_samples(models, image, "T2", mc=3, tta=False))
        assert len(samples) == sample_count(2, 3, False) == 6
        torch.testing.assert_close(
            next(iter(predictive_samples(models[1:], image, "T2"))), torch.sigmoid(models[1](image))
        )


def test_batched_head_samples_are_the_sequential_draws():
    """head_samples gives, under one seed, exactly the masks of T dropout3d head calls."""
    unet = tiny_unet(dropout=0.4)
    torch.manual_seed(3)
    mednext = build_model("mednext_s", init_filters=4, kernel_size=3, dropout=0.4).eval()
    wrapped = tiny_unet(dropout=0.4)  # a head conv that is not pointwise: the fallback path
    wrapped.mc_head.conv = torch.nn.Sequential(
        torch.nn.Conv3d(4, 1, kernel_size=1), torch.nn.Softsign()
    )
    # MedNeXt's head is a wrapped ConvTranspose3d: still a pointwise map, so the fast path
    assert mednext.mc_head._pointwise_weights(4) is not None
    assert wrapped.mc_head._pointwise_weights(4) is None
    for model in (unet, mednext, wrapped):
        features = torch.randn(2, 4, 5, 6, 7)
        with torch.inference_mode():
            torch.manual_seed(11)
            batched = model.head_samples(features, 6)
            torch.manual_seed(11)
            sequential = torch.stack([model.head(features, sample=True) for _ in range(6)])
        assert batched.shape == (6, 2, 1, 5, 6, 7)
        torch.testing.assert_close(batched, sequential, atol=1e-5, rtol=1e-5)
        assert batched.std(0).mean() > 1e-3  # masks differ between samples


def test_predictive_moments_equal_accumulated_samples():
    """The fused path (logit stacks, softplus entropy) equals accumulating each sample."""
    model = tiny_unet()
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        torch.manual_seed(5)
        fused = predictive_moments([model], image, "T2", mc=4, tta=True)
        torch.manual_seed(5)
        acc = MomentAccumulator()
        for p in predictive_samples([model], image, "T2", mc=4, tta=True):
            acc.add(p)
    assert acc.count == sample_count(1, 4, True)
    torch.testing.assert_close(fused, acc.moments(), atol=2e-5, rtol=1e-4)

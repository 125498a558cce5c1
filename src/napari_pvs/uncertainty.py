"""Predictive uncertainty from Monte Carlo dropout, test-time flips and checkpoint ensembles.

Every source produces probability *samples* for the same window. Instead of keeping the
samples, :class:`MomentAccumulator` keeps three running means (of ``p``, of the per-sample
entropy ``H(p)`` and of ``p**2``), which is all the measures need and all that must be blended
across overlapping windows:

* predictive entropy ``H(mean p)`` (total uncertainty),
* mutual information (BALD) ``H(mean p) - mean H(p)`` (the model's disagreement with itself),
* variance ``mean p**2 - (mean p)**2``.

Entropies are in bits, so a voxel at p = 0.5 has entropy 1.

Monte Carlo dropout is cheap here because models split into a deterministic ``features``
(run once per window) and a stochastic ``head`` (rerun per sample); :func:`naive_mc_samples`
reruns the whole network per sample (as MONAI Label does) and exists to check that both give
the same distribution.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

from napari_pvs.models import FLIP_COUNTS

#: Names of the uncertainty arrays the inferer writes, in this order.
UNCERTAINTY_NAMES = ("entropy", "mutual_information", "variance")

_EPS = 1e-7


def binary_entropy(p):
    """Entropy in bits of a Bernoulli(p) voxel; works on numpy arrays and torch tensors."""
    if isinstance(p, torch.Tensor):
        q = p.clamp(_EPS, 1 - _EPS)
        return -(q * torch.log2(q) + (1 - q) * torch.log2(1 - q))
    q = np.clip(np.asarray(p, dtype=np.float32), _EPS, 1 - _EPS)
    return -(q * np.log2(q) + (1 - q) * np.log2(1 - q))


def uncertainty_from_moments(
    mean: np.ndarray, mean_entropy: np.ndarray, mean_square: np.ndarray
) -> dict[str, np.ndarray]:
    """Entropy, mutual information and variance from the three sample means (float32).

    Tiny negative values from rounding are clipped to 0 (both are non-negative by Jensen).
    """
    entropy = binary_entropy(mean)
    mutual_information = np.maximum(entropy - mean_entropy, 0.0)
    variance = np.maximum(mean_square - mean * mean, 0.0)
    return {
        "entropy": entropy.astype(np.float32, copy=False),
        "mutual_information": mutual_information.astype(np.float32, copy=False),
        "variance": variance.astype(np.float32, copy=False),
    }


class MomentAccumulator:
    """Running means of ``p``, ``H(p)`` and ``p**2`` over probability samples of one batch.

    The sums live in one ``(B, 3, D, H, W)`` tensor, so :meth:`moments` is one division.
    """

    def __init__(self) -> None:
        self.count = 0
        self._sums: torch.Tensor | None = None

    def _target(self, like: torch.Tensor) -> torch.Tensor:
        if self._sums is None:
            shape = (like.shape[0], 3, *like.shape[2:])
            self._sums = torch.zeros(shape, dtype=torch.float32, device=like.device)
        return self._sums

    def add(self, probability: torch.Tensor) -> None:
        """Add one probability sample ``(B, 1, D, H, W)``."""
        p = probability.float()
        sums = self._target(p)
        sums[:, 0:1] += p
        sums[:, 1:2] += binary_entropy(p)
        sums[:, 2:3].addcmul_(p, p)
        self.count += 1

    def add_logits(self, logits: torch.Tensor) -> None:
        """Add a stack of samples given as logits ``(S, B, 1, D, H, W)``, in one pass.

        Entropy from the logit ``z`` is ``softplus(z) - p z`` nats: exact, with no clamping
        and two fewer logarithms than from ``p``.
        """
        z = logits.float()
        sums = self._target(z[0])
        p = torch.sigmoid(z)
        entropy = torch.nn.functional.softplus(z)
        entropy.addcmul_(p, z, value=-1.0)
        sums[:, 0:1] += p.sum(0)
        sums[:, 1:2].add_(entropy.sum(0), alpha=1.0 / math.log(2.0))
        sums[:, 2:3] += p.mul_(p).sum(0)
        self.count += z.shape[0]

    def moments(self) -> torch.Tensor:
        """``(B, 3, D, H, W)``: mean p, mean entropy, mean p**2."""
        if self._sums is None:
            raise ValueError("no samples were added; add at least one probability sample")
        return self._sums / self.count


# --------------------------------------------------------------------------------------------
# sample sources


def flip_count(tta: bool | int) -> int:
    """How many mirrorings ``tta`` asks for: ``False`` 1 (none), ``True`` all 8, or 1, 4 or 8."""
    if isinstance(tta, bool):
        return 8 if tta else 1
    if tta not in FLIP_COUNTS:
        raise ValueError(
            f"test-time flips must be one of {FLIP_COUNTS} (1: none, 4: one mirror per axis, "
            f"8: all mirrorings), got {tta!r}"
        )
    return int(tta)


def flip_sets(tta: bool | int) -> list[tuple[int, ...]]:
    """Spatial flips used for test-time augmentation (see :func:`flip_count`).

    4 mirrorings (the identity and a mirror along each axis) gave nearly all of the accuracy of
    the 8 (as nnU-Net uses) on the tuning phantoms, at half the cost.
    """
    count = flip_count(tta)
    if count == 1:
        return [()]
    if count == 4:
        return [(), (2,), (3,), (4,)]
    axes = (2, 3, 4)
    return [combo for r in range(4) for combo in itertools.combinations(axes, r)]


def _head_logits(model: torch.nn.Module, features: torch.Tensor, samples: int) -> torch.Tensor:
    """``samples`` MC-dropout logits ``(samples, B, 1, ...)`` of one feature map.

    Uses the model's batched ``head_samples`` when it has one (one read of the features),
    otherwise calls ``head(features, sample=True)`` per sample.
    """
    batched = getattr(model, "head_samples", None)
    if callable(batched):
        return batched(features, samples)
    return torch.stack([model.head(features, sample=True) for _ in range(samples)])


def mc_samples(
    model: torch.nn.Module,
    image: torch.Tensor,
    modality: str | list[str] | None,
    samples: int,
) -> Iterator[torch.Tensor]:
    """Yield ``samples`` MC-dropout probability samples sharing one ``features`` pass.

    ``samples == 0`` yields the single deterministic prediction (dropout off).
    """
    features = model.features(image, modality)
    if samples <= 0:
        yield torch.sigmoid(model.head(features).float())
        return
    yield from torch.sigmoid(_head_logits(model, features, samples).float())


def naive_mc_samples(
    model: torch.nn.Module,
    image: torch.Tensor,
    modality: str | list[str] | None,
    samples: int,
) -> Iterator[torch.Tensor]:
    """Yield MC-dropout samples the expensive way: the full network once per sample.

    Reference for tests and benchmarks; :func:`mc_samples` gives the same distribution.
    """
    for _ in range(max(1, samples)):
        features = model.features(image, modality)
        yield torch.sigmoid(model.head(features, sample=samples > 0).float())


def predictive_samples(
    models: Sequence[torch.nn.Module],
    image: torch.Tensor,
    modality: str | list[str] | None,
    mc: int = 0,
    tta: bool | int = False,
) -> Iterator[torch.Tensor]:
    """Yield probability samples from every ensemble member x flip x MC draw, in input space.

    Flipped inputs are predicted and flipped back, so every sample aligns with ``image``.
    """
    for model in models:
        for flip in flip_sets(tta):
            flipped = torch.flip(image, flip) if flip else image
            for probability in mc_samples(model, flipped, modality, mc):
                yield torch.flip(probability, flip) if flip else probability


def predictive_moments(
    models: Sequence[torch.nn.Module],
    image: torch.Tensor,
    modality: str | list[str] | None,
    mc: int = 0,
    tta: bool | int = False,
    draws: Callable[[], AbstractContextManager] = nullcontext,
) -> torch.Tensor:
    """Moments ``(B, 3, ...)`` (see :class:`MomentAccumulator`) of every sample of
    :func:`predictive_samples`, the same draws in the same order, without materialising
    probabilities one sample at a time: each feature map's MC logits go in as one stack.

    Every MC-dropout draw is made inside ``draws()``: a caller running several batches at
    once on threads makes each batch's draws there, from that batch's own random stream
    (:class:`napari_pvs.inference.engine.BatchDraws`); the features never draw.
    """
    acc = MomentAccumulator()
    for model in models:
        for flip in flip_sets(tta):
            flipped = torch.flip(image, flip) if flip else image
            features = model.features(flipped, modality)
            if mc > 0:
                with draws():
                    logits = _head_logits(model, features, mc)
            else:
                logits = model.head(features)[None]
            if flip:
                logits = torch.flip(logits, [d + 1 for d in flip])
            acc.add_logits(logits)
    return acc.moments()


def sample_count(n_models: int, mc: int, tta: bool | int) -> int:
    """How many probability samples :func:`predictive_samples` yields per window."""
    return n_models * len(flip_sets(tta)) * max(1, mc)

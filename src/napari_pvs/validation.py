"""One validation Dice for a model version, the worse-round guard and the convergence check.

**Validation Dice** (:func:`validation_dice`): on the project's fixed validation patches, each
patch's prediction is thresholded at 0.5 and compared with its labels over the labelled voxels
only (255 excluded); the true positives, false positives and false negatives are summed over
all patches and Dice is ``2 TP / (2 TP + FP + FN)`` of the sums (pooled, not a mean of
per-patch Dice, so a patch without PVS does not count as a perfect 1). No PVS predicted or
labelled anywhere gives 1. The value always comes with the set's size (number of patches).

**Worse-round guard** (:func:`round_is_worse`): a paired bootstrap over validation patches.
Both versions are scored on the same patches; each of ``resamples`` draws resamples the
patches with replacement (the same draw for both versions) and takes the difference of their
pooled Dice. The new version is *worse* when the whole one-sided ``1 - alpha`` bootstrap
interval lies below zero: its ``1 - alpha`` quantile of the difference is negative, i.e. the
drop is larger than the validation set's noise. The draws are seeded, so the decision is
reproducible. With a single patch there is nothing to resample: any drop counts as worse.

**Convergence** (:func:`convergence`): a training curve of validation Dice has converged when it
moved by less than ``tolerance`` (0.01) over the last quarter of its steps (max minus min of the
points from ``last_step - quarter`` on, at least two points; the steps span from ``start``,
the training's first step, or else the first point).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from napari_pvs.io import UNLABELLED

#: The threshold of the one validation Dice (probability of PVS).
VALIDATION_THRESHOLD = 0.5
#: Bootstrap draws, one-sided level and seed of the worse-round guard.
GUARD_RESAMPLES = 2000
GUARD_ALPHA = 0.05
GUARD_SEED = 0
#: A curve has converged when it moved less than this over its last quarter.
CONVERGENCE_TOLERANCE = 0.01
CONVERGENCE_TAIL = 0.25


@dataclass(frozen=True)
class PatchCounts:
    """Voxel counts of one validation patch at the validation threshold."""

    tp: int
    fp: int
    fn: int


def patch_counts(probability, labels, threshold: float = VALIDATION_THRESHOLD) -> PatchCounts:
    """TP, FP and FN of one patch over its labelled voxels (labels 0/1, 255 not labelled)."""
    probability = np.asarray(probability)
    labels = np.asarray(labels)
    if probability.shape != labels.shape:
        raise ValueError(
            f"probability shape {probability.shape} does not match labels {labels.shape}"
        )
    labelled = labels != UNLABELLED
    predicted = (probability >= threshold) & labelled
    truth = (labels == 1) & labelled
    return PatchCounts(
        tp=int(np.count_nonzero(predicted & truth)),
        fp=int(np.count_nonzero(predicted & ~truth)),
        fn=int(np.count_nonzero(~predicted & truth)),
    )


def _pooled(counts: np.ndarray) -> float:
    tp, fp, fn = counts.sum(axis=0)
    denominator = 2 * tp + fp + fn
    return 1.0 if denominator == 0 else float(2 * tp / denominator)


def _as_array(per_patch: Sequence[PatchCounts]) -> np.ndarray:
    return np.asarray([(c.tp, c.fp, c.fn) for c in per_patch], dtype=np.int64).reshape(-1, 3)


def validation_dice(per_patch: Sequence[PatchCounts]) -> tuple[float | None, int]:
    """Pooled Dice of a version over the validation patches and their number (None, 0: none)."""
    if not per_patch:
        return None, 0
    return _pooled(_as_array(per_patch)), len(per_patch)


@dataclass(frozen=True)
class GuardDecision:
    """The worse-round guard's verdict with its evidence."""

    worse: bool
    new_dice: float
    current_dice: float
    difference: float  # new - current
    upper_bound: float  # one-sided (1 - alpha) bootstrap bound of the difference
    patches: int
    resamples: int
    seed: int

    def sentence(self, new_version: int, current_version: int) -> str:
        """One sentence for the Train step and ``napari-pvs round`` (empty when not worse)."""
        if not self.worse:
            return ""
        return (
            f"v{new_version} scores validation Dice {self.new_dice:.3f} on {self.patches} "
            f"patches, below v{current_version}'s {self.current_dice:.3f} by more than the "
            f"set's noise, so it was kept but v{current_version} stays current; make "
            f"v{new_version} current if you want it anyway."
        )


def round_is_worse(
    new_per_patch: Sequence[PatchCounts],
    current_per_patch: Sequence[PatchCounts],
    *,
    resamples: int = GUARD_RESAMPLES,
    alpha: float = GUARD_ALPHA,
    seed: int = GUARD_SEED,
) -> GuardDecision:
    """Whether the new version's validation Dice is below the current one's by more than the
    set's noise (paired bootstrap over patches; see the module notes). Both lists hold the same
    patches in the same order."""
    if len(new_per_patch) != len(current_per_patch):
        raise ValueError(
            f"the versions were scored on different patch sets ({len(new_per_patch)} and "
            f"{len(current_per_patch)} patches); score both on the same validation patches"
        )
    if not new_per_patch:
        raise ValueError("no validation patches: nothing to compare the versions on")
    if resamples < 1 or not 0 < alpha < 1:
        raise ValueError(f"need resamples >= 1 and 0 < alpha < 1, got {resamples} and {alpha}")
    new = _as_array(new_per_patch)
    current = _as_array(current_per_patch)
    n = len(new)
    new_dice, current_dice = _pooled(new), _pooled(current)
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    differences = np.empty(resamples)
    for i, draw in enumerate(draws):
        differences[i] = _pooled(new[draw]) - _pooled(current[draw])
    upper = float(np.quantile(differences, 1 - alpha))
    return GuardDecision(
        worse=upper < 0,
        new_dice=new_dice,
        current_dice=current_dice,
        difference=new_dice - current_dice,
        upper_bound=upper,
        patches=n,
        resamples=int(resamples),
        seed=int(seed),
    )


@dataclass(frozen=True)
class Convergence:
    """Whether a validation curve settled: how much it moved over its last quarter."""

    converged: bool
    movement: float | None  # max - min over the tail; None: too few points to tell
    tail_points: int

    def describe(self) -> str:
        if self.movement is None:
            return f"converged: no (only {self.tail_points} point(s) in the last quarter)"
        verdict = "yes" if self.converged else "no"
        return (
            f"converged: {verdict} (validation Dice moved {self.movement:.3f} over the last "
            f"quarter, {self.tail_points} points)"
        )


def convergence(
    steps: Sequence[float],
    dice: Sequence[float],
    *,
    tolerance: float = CONVERGENCE_TOLERANCE,
    tail: float = CONVERGENCE_TAIL,
    start: float | None = None,
) -> Convergence:
    """Whether validation Dice moved by less than ``tolerance`` over the last ``tail`` of the
    steps (see the module notes)."""
    steps_array = np.asarray(steps, dtype=np.float64)
    dice_array = np.asarray(dice, dtype=np.float64)
    if steps_array.shape != dice_array.shape or steps_array.ndim != 1:
        raise ValueError("steps and dice must be two lists of the same length")
    if not 0 < tail <= 1:
        raise ValueError(f"tail must be in (0, 1], got {tail}")
    if steps_array.size == 0:
        return Convergence(False, None, 0)
    order = np.argsort(steps_array, kind="stable")
    steps_array, dice_array = steps_array[order], dice_array[order]
    first = steps_array[0] if start is None else min(float(start), steps_array[0])
    last = steps_array[-1]
    values = dice_array[steps_array >= last - tail * (last - first)]
    if values.size < 2:
        return Convergence(False, None, int(values.size))
    movement = float(values.max() - values.min())
    return Convergence(movement < tolerance, movement, int(values.size))

"""One validation Dice, the worse-round guard and the convergence check."""

from __future__ import annotations

import numpy as np
import pytest

from napari_pvs.validation import (
    PatchCounts,
    convergence,
    patch_counts,
    round_is_worse,
    validation_dice,
)


def test_patch_counts_skip_unlabelled_voxels_at_threshold_half():
    probability = np.array([0.9, 0.5, 0.49, 0.1, 0.8, 0.7])
    labels = np.array([1, 0, 1, 0, 255, 1])
    assert patch_counts(probability, labels) == PatchCounts(tp=2, fp=1, fn=1)


def test_validation_dice_is_pooled_over_patches_with_the_set_size():
    per_patch = [PatchCounts(3, 1, 0), PatchCounts(0, 0, 0), PatchCounts(1, 0, 3)]
    # pooled: 2 * 4 / (2 * 4 + 1 + 3) = 8 / 12; a mean of per-patch Dice would be higher
    assert validation_dice(per_patch) == (pytest.approx(8 / 12), 3)
    assert validation_dice([PatchCounts(0, 0, 0)]) == (1.0, 1)
    assert validation_dice([]) == (None, 0)


def patches(dice_per_patch, n, seed):
    """``n`` patches of 100 true voxels each whose Dice scatter around ``dice_per_patch``."""
    rng = np.random.default_rng(seed)
    out = []
    for value in np.clip(rng.normal(dice_per_patch, 0.05, n), 0.05, 1.0):
        tp = int(np.rint(100 * value))
        out.append(PatchCounts(tp=tp, fp=100 - tp, fn=100 - tp))
    return out


def test_clearly_worse_round_is_caught():
    current = patches(0.7, 12, seed=1)
    new = patches(0.4, 12, seed=2)
    decision = round_is_worse(new, current)
    assert decision.worse and decision.upper_bound < 0 and decision.patches == 12
    assert decision.difference == pytest.approx(decision.new_dice - decision.current_dice)
    text = decision.sentence(3, 2)
    assert "v3" in text and "v2 stays current" in text and "12 patches" in text


def test_clearly_better_round_passes():
    decision = round_is_worse(patches(0.7, 12, seed=2), patches(0.4, 12, seed=1))
    assert not decision.worse and decision.sentence(3, 2) == ""


def test_drop_within_the_noise_passes_and_the_verdict_is_seeded():
    # the new version is a little worse on some patches, a little better on others
    current = [PatchCounts(50, 50, 50), PatchCounts(80, 20, 20), PatchCounts(60, 40, 40)] * 2
    new = [PatchCounts(47, 53, 53), PatchCounts(84, 16, 16), PatchCounts(55, 45, 45)] * 2
    decision = round_is_worse(new, current)
    assert decision.difference < 0 and not decision.worse and decision.upper_bound > 0
    assert round_is_worse(new, current) == decision  # same seed, same verdict


def test_a_consistent_small_drop_is_beyond_the_noise():
    current = [PatchCounts(60 + i, 40 - i, 40 - i) for i in range(10)]
    new = [PatchCounts(57 + i, 43 - i, 43 - i) for i in range(10)]
    assert round_is_worse(new, current).worse


def test_guard_refuses_different_sets():
    with pytest.raises(ValueError, match="different patch sets"):
        round_is_worse([PatchCounts(1, 0, 0)], [PatchCounts(1, 0, 0)] * 2)
    with pytest.raises(ValueError, match="no validation patches"):
        round_is_worse([], [])


def test_convergence_over_the_last_quarter():
    steps = [0, 50, 100, 150, 200, 250, 300, 350, 400]
    rising = [0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6]
    flat = [0.1, 0.3, 0.4, 0.45, 0.47, 0.48, 0.500, 0.505, 0.508]
    assert not convergence(steps, rising).converged
    result = convergence(steps, flat)  # the last quarter is steps 300-400: moved 0.008
    assert result.converged and result.movement == pytest.approx(0.008)
    assert result.tail_points == 3 and "converged: yes" in result.describe()
    assert not convergence([0, 400], [0.1, 0.5]).converged
    short = convergence([400], [0.5])
    assert not short.converged and short.movement is None and "converged: no" in short.describe()
    # a curve that starts late (smoothed): the quarter is of the training steps from `start`
    late = convergence([200, 300, 350, 400], [0.3, 0.49, 0.5, 0.505])
    assert late.tail_points == 2  # the quarter of 200-400: from 350 on
    # from step 0 the quarter is from 300 on
    assert convergence([200, 300, 350, 400], [0.3, 0.49, 0.5, 0.505], start=0).tail_points == 3

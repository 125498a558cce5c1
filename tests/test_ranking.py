"""Patch ranking: block scores, non-maximum suppression, exclusion, strategies."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import zarr

from napari_pvs.ranking import (
    DEFAULT_STRATEGY,
    SCORE_MEANINGS,
    STRATEGIES,
    PatchGrid,
    patch_features,
    rank_patches,
    resolve_strategy,
    save_ranking,
)

SHAPE = (64, 64, 96)


def make_store(path, with_samples: bool = True):
    """A prediction store with designed maps.

    Entropy is highest in a blob around (24, 24, 24) among predicted PVS; mutual information
    is highest around (40, 40, 72), where nothing is predicted.
    """
    z, y, x = np.indices(SHAPE, dtype=np.float32)
    hot = np.exp(-((z - 24) ** 2 + (y - 24) ** 2 + (x - 24) ** 2) / 400)
    cold = np.exp(-((z - 40) ** 2 + (y - 40) ** 2 + (x - 72) ** 2) / 400)
    probability = np.where(hot > 0.05, 0.4, 0.02).astype(np.float16)
    segmentation = np.zeros(SHAPE, np.uint8)
    segmentation[8:40, 8:40, 8:40] = np.indices((32, 32, 32)).sum(0) % 7 == 0
    segmentation[40:44, 8:12, 60:64] = 1  # a second, isolated predicted PVS
    group = zarr.open_group(str(path), mode="w")
    group.attrs["napari_pvs"] = {"affine": np.diag([2.0, 1.0, 1.0, 1.0]).tolist()}
    group.create_array("probability", data=probability, chunks=(48, 48, 48))
    group.create_array("segmentation", data=segmentation, chunks=(48, 48, 48))
    if with_samples:
        group.create_array("entropy", data=(0.1 + hot).astype(np.float16), chunks=(48,) * 3)
        mi = (0.01 + 0.5 * cold).astype(np.float16)
        group.create_array("mutual_information", data=mi, chunks=(48,) * 3)
    return path


def boxes(table):
    return [(np.array(r.bbox_start), np.array(r.bbox_stop)) for r in table]


def test_block_scores_match_a_direct_computation():
    data = np.random.default_rng(0).random((37, 30, 45)).astype(np.float32)
    grid = PatchGrid(data.shape, patch=16, stride=8)
    sums = grid.reduce(data)
    assert sums.shape == tuple(grid.n) == (4, 3, 5)
    for index in [(0, 0, 0), (1, 2, 3), (3, 2, 4)]:
        start, stop = grid.box(index)
        expected = data[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))].sum()
        assert sums[index] == pytest.approx(expected, rel=1e-5)
    assert grid.voxels()[3, 2, 4] == 13 * 14 * 13  # clipped at the far edges
    with pytest.raises(ValueError, match="multiple of stride"):
        PatchGrid(data.shape, patch=16, stride=5)


def test_nms_leaves_no_overlaps_and_spreads_out(tmp_path):
    store = make_store(tmp_path / "p.zarr")
    table = rank_patches(store, n=10, patch=16, stride=4, strategy="entropy")
    assert len(table) == 10 and [r.rank for r in table] == list(range(1, 11))
    assert table[0].score == max(r.score for r in table)
    found = boxes(table)
    for i, (a0, a1) in enumerate(found):
        for b0, b1 in found[i + 1 :]:
            assert not (np.all(a0 < b1) and np.all(b0 < a1)), "chosen patches overlap"
            assert np.linalg.norm((a0 + a1) / 2 - (b0 + b1) / 2) >= 1.5 * 16
    # the best patch sits on the entropy hot spot
    assert np.linalg.norm(np.array(table[0].centre) - 24) < 6


def test_labelled_patches_are_excluded(tmp_path):
    store = make_store(tmp_path / "p.zarr")
    best = rank_patches(store, n=1, patch=16, strategy="entropy")[0]
    labels = np.full(SHAPE, 255, np.uint8)
    region = tuple(slice(a, b) for a, b in zip(best.bbox_start, best.bbox_stop, strict=True))
    labels[region] = 0  # annotated as background: labelled all the same
    labels[region][0, 0, 0] = 1
    table = rank_patches(store, n=30, patch=16, strategy="entropy", exclude=labels)
    assert best.bbox_start not in [r.bbox_start for r in table]
    # a store in which 0 means "not annotated"
    marks = np.zeros(SHAPE, np.uint8)
    marks[40, 40, 40] = 1
    table = rank_patches(
        store, n=50, patch=16, strategy="random", exclude=marks, unlabelled_value=0
    )
    for r in table:
        assert not all(a <= 40 < b for a, b in zip(r.bbox_start, r.bbox_stop, strict=True))
    # boxes already queued are skipped too
    table = rank_patches(store, n=5, patch=16, exclude_boxes=[(best.bbox_start, best.bbox_stop)])
    assert best.bbox_start not in [r.bbox_start for r in table]
    with pytest.raises(ValueError, match="same volume"):
        rank_patches(store, exclude=np.zeros((4, 4, 4), np.uint8))


def test_strategies_differ_as_specified(tmp_path):
    store = make_store(tmp_path / "p.zarr")
    entropy = rank_patches(store, n=6, patch=16, strategy="entropy")
    bald = rank_patches(store, n=6, patch=16, strategy="bald")
    assert np.linalg.norm(np.array(entropy[0].centre) - [24, 24, 24]) < 3
    assert np.linalg.norm(np.array(bald[0].centre) - [40, 40, 72]) < 3

    stratified = rank_patches(store, n=6, patch=16, strategy="stratified")
    kinds = [r.predicted_pvs_voxels > 0 for r in stratified]
    assert kinds[:4] == [True, False, True, False]  # alternating strata
    assert any(r.predicted_pvs == 0 for r in stratified)

    fg = rank_patches(store, n=6, patch=16, strategy="fg-random", seed=1)
    assert fg and all(r.predicted_pvs > 0 for r in fg)
    rand = rank_patches(store, n=12, patch=16, strategy="random", seed=1)
    assert any(r.predicted_pvs == 0 for r in rand)
    again = rank_patches(store, n=12, patch=16, strategy="random", seed=1)
    assert [r.bbox_start for r in again] == [r.bbox_start for r in rand]
    other = rank_patches(store, n=12, patch=16, strategy="random", seed=2)
    assert [r.bbox_start for r in other] != [r.bbox_start for r in rand]


def test_predicted_pvs_counts_and_world_centres(tmp_path):
    store = make_store(tmp_path / "p.zarr")
    table = rank_patches(store, n=96, patch=16, strategy="random", min_distance=0)
    assert len(table) == 4 * 4 * 6
    row = next(r for r in table if r.bbox_start == [32, 0, 48])
    assert row.predicted_pvs == 1 and row.predicted_pvs_voxels == 4 * 4 * 4
    assert row.centre_mm == [2 * row.centre[0], row.centre[1], row.centre[2]]


def test_deterministic_prediction_ranks_by_entropy_but_not_bald(tmp_path):
    store = make_store(tmp_path / "p.zarr", with_samples=False)
    table = rank_patches(store, n=3, patch=16, strategy="entropy")
    assert table[0].score == pytest.approx(-(0.4 * np.log2(0.4) + 0.6 * np.log2(0.6)), abs=0.05)
    with pytest.raises(ValueError, match="--mc 8"):
        rank_patches(store, strategy="bald")
    with pytest.raises(ValueError, match="unknown strategy"):
        rank_patches(store, strategy="margin")


def test_save_ranking_writes_csv_and_json_beside_the_store(tmp_path):
    store = make_store(tmp_path / "case.zarr")
    table = rank_patches(store, n=4, patch=16, strategy="bald")
    csv_path, json_path = save_ranking(table, store)
    assert csv_path == tmp_path / "case.ranking-bald.csv"
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4]
    assert int(rows[0]["start_0"]) == table[0].bbox_start[0]
    saved = json.loads(json_path.read_text())
    assert saved["patches"][0]["bbox_stop"] == table[0].bbox_stop


def test_patches_in_the_air_are_skipped_given_the_image(tmp_path):
    store = make_store(tmp_path / "p.zarr")
    rng = np.random.default_rng(0)
    image = rng.rayleigh(3.0, SHAPE).astype(np.float32)  # air: Rician noise, not zeros
    image[:, :, :48] = 100 + rng.normal(0, 5, (64, 64, 48))  # the head fills x < 48
    everywhere = rank_patches(store, n=40, patch=16, strategy="random")
    assert any(r.bbox_start[2] >= 48 for r in everywhere)
    on_head = rank_patches(store, n=40, patch=16, strategy="random", image=image)
    assert on_head and all(r.bbox_stop[2] <= 56 for r in on_head)  # at least half tissue
    # the entropy maximum sits in the head, so the best patch does not change
    assert (
        rank_patches(store, n=1, patch=16, image=image)[0].bbox_start
        == rank_patches(store, n=1, patch=16)[0].bbox_start
    )
    with pytest.raises(ValueError, match="volume that was predicted"):
        rank_patches(store, image=image[:10])
    with pytest.raises(ValueError, match="tissue"):
        rank_patches(store, image=np.zeros(SHAPE, np.float32))


def _scored_store(path, scores) -> str:
    """A store of 8^3 patches in a row along x whose mean entropy is ``scores[i]``."""
    shape = (8, 8, 8 * len(scores))
    entropy = np.repeat(np.asarray(scores, np.float32), 8)[None, None, :] * np.ones(shape)
    group = zarr.open_group(str(path), mode="w")
    group.create_array("probability", data=np.full(shape, 0.1, np.float16))
    group.create_array("segmentation", data=np.zeros(shape, np.uint8))
    group.create_array("entropy", data=entropy.astype(np.float32))
    return str(path)


def test_decaying_noise_draws_in_proportion_to_the_scores(tmp_path):
    scores = [0.4, 0.2, 0.12, 0.1, 0.07, 0.05, 0.04, 0.02]  # distinct: no ties to break
    store = zarr.open_group(_scored_store(tmp_path / "s.zarr", scores), mode="r")
    first = [
        rank_patches(store, n=1, patch=8, min_distance=0, noise=1.0, seed=seed)[0].bbox_start[2]
        // 8
        for seed in range(300)
    ]
    frequency = np.bincount(first, minlength=len(scores)) / len(first)
    # temperature 1: a draw with probability score / sum(scores) (power sampling)
    np.testing.assert_allclose(frequency, np.array(scores) / sum(scores), atol=0.08)
    # the table keeps the noiseless score of the patch drawn
    row = rank_patches(store, n=1, patch=8, min_distance=0, noise=1.0, seed=3)[0]
    assert row.score == pytest.approx(scores[row.bbox_start[2] // 8], abs=1e-3)
    # seeded: same seed and round, same queue; another round draws again
    again = [rank_patches(store, n=8, patch=8, min_distance=0, noise=1.0, seed=5,
                          noise_round=r) for r in (0, 0, 1)]  # fmt: skip
    starts = [[row.bbox_start for row in table] for table in again]
    assert starts[0] == starts[1]
    # the noise decays: by round 30 (temperature 1e-9) the queue is the noiseless order
    noiseless = rank_patches(store, n=8, patch=8, min_distance=0)
    late = rank_patches(store, n=8, patch=8, min_distance=0, noise=1.0, seed=5, noise_round=30)
    assert [r.bbox_start for r in late] == [r.bbox_start for r in noiseless]
    assert [r.bbox_start[2] // 8 for r in noiseless][:2] == [0, 1]
    with pytest.raises(ValueError, match="noise must be"):
        rank_patches(store, noise=-1)


def test_stratified_foreground_share(tmp_path):
    store = make_store(tmp_path / "p.zarr")
    table = rank_patches(store, n=6, patch=16, strategy="stratified", foreground_share=2 / 3)
    kinds = [r.predicted_pvs_voxels > 0 for r in table]
    assert kinds[:3] == [True, True, False]  # two thirds from the PVS stratum
    default = rank_patches(store, n=6, patch=16, strategy="stratified")
    half = rank_patches(store, n=6, patch=16, strategy="stratified", foreground_share=0.5)
    assert [r.bbox_start for r in half] == [r.bbox_start for r in default]
    with pytest.raises(ValueError, match="foreground_share"):
        rank_patches(store, strategy="stratified", foreground_share=1.5)


def test_every_registered_name_ranks_and_unknown_names_are_refused(tmp_path):
    store = make_store(tmp_path / "p.zarr")
    for name in STRATEGIES:
        table = rank_patches(store, n=4, patch=16, strategy=name, seed=1)
        assert len(table) == 4, name
        assert {r.strategy for r in table} == {resolve_strategy(name)}
    assert resolve_strategy("default") == DEFAULT_STRATEGY != "default"
    assert set(SCORE_MEANINGS) == set(STRATEGIES)
    default = rank_patches(store, n=6, patch=16, strategy="default")
    alias = rank_patches(store, n=6, patch=16, strategy=DEFAULT_STRATEGY)
    assert [r.bbox_start for r in default] == [r.bbox_start for r in alias]
    with pytest.raises(ValueError, match="choose one of default, entropy, bald"):
        rank_patches(store, strategy="coreset")


def test_clasp_is_two_thirds_stratified_with_decaying_noise(tmp_path):
    store = make_store(tmp_path / "p.zarr")
    noiseless = rank_patches(store, n=6, patch=16, strategy="clasp", noise=0)
    assert [r.predicted_pvs_voxels > 0 for r in noiseless][:3] == [True, True, False]
    plain = rank_patches(store, n=6, patch=16, strategy="stratified", foreground_share=2 / 3)
    assert [r.bbox_start for r in noiseless] == [r.bbox_start for r in plain]
    # round 0 carries noise 1: the queues drawn by different seeds differ ...
    drawn = {
        tuple(map(tuple, (r.bbox_start for r in rank_patches(store, n=6, patch=16,
                                                             strategy="clasp", seed=s))))
        for s in range(6)
    }  # fmt: skip
    assert len(drawn) > 1
    # ... and the noise decays over rounds: late rounds follow the scores (the first picks;
    # later ones tie on the flat background, where any noise reorders them)
    late = [
        rank_patches(store, n=2, patch=16, strategy="clasp", seed=s, noise_round=40)
        for s in range(6)
    ]
    assert all([r.bbox_start for r in t] == [r.bbox_start for r in noiseless[:2]] for t in late)


def test_fg_random_draws_in_proportion_to_predicted_pvs(tmp_path):
    segmentation = np.zeros((8, 8, 16), np.uint8)
    segmentation[:, :, :2] = 1  # 128 PVS voxels in patch 0
    segmentation[0, 0, 8] = 1  # 1 in patch 1
    group = zarr.open_group(str(tmp_path / "f.zarr"), mode="w")
    group.create_array("probability", data=np.full(segmentation.shape, 0.1, np.float16))
    group.create_array("segmentation", data=segmentation)
    first = [
        rank_patches(group, n=1, patch=8, strategy="fg-random", seed=s, min_distance=0)[0]
        .bbox_start[2] // 8
        for s in range(200)
    ]
    assert np.mean(np.array(first) == 0) > 0.95  # 128 / 129 expected; uniform would be 0.5


def test_diverse_spreads_its_picks_over_unlike_patches(tmp_path):
    store = make_store(tmp_path / "p.zarr")
    diverse = rank_patches(store, n=4, patch=16, strategy="diverse")
    entropy = rank_patches(store, n=4, patch=16, strategy="entropy")
    assert diverse[0].bbox_start == entropy[0].bbox_start  # starts from the most uncertain
    assert [r.bbox_start for r in diverse] != [r.bbox_start for r in entropy]
    features = patch_features(
        zarr.open_group(str(store), mode="r"), PatchGrid(SHAPE, 16, 16),
        np.zeros((4, 4, 6)), np.zeros((4, 4, 6)),
    )  # fmt: skip
    assert features.shape == (4, 4, 6, 6)

    def spread(table):
        vectors = [features[tuple(np.array(r.bbox_start) // 16)] for r in table]
        return min(
            np.linalg.norm(a - b) for i, a in enumerate(vectors) for b in vectors[i + 1 :]
        )

    assert spread(diverse) > spread(entropy)
    centres = np.array([r.centre for r in diverse])
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1) + np.eye(len(centres)) * 99
    assert gaps.min() >= 1.5 * 16  # the spacing rule still holds

"""The benchmark's ``candidates`` strategy: yes/no review of predicted clusters by a simulated
annotator, end to end on tiny phantoms, its cost model and its printed lines."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from napari_pvs import io, limits, ranking
from napari_pvs.benchmark import BenchmarkConfig, parse_strategies
from napari_pvs.benchmark.answers import answer_lines, simulated_answer, summarise_answers
from napari_pvs.cli import main

TINY_UNET = '{"channels": [4, 8], "num_res_units": 1, "feature_channels": 4}'
NUMBER = r"(\d\.\d{3}|n/a)"
PRECISION_RECALL = re.compile(
    rf"^candidates: precision {NUMBER} -> {NUMBER}, recall {NUMBER} -> {NUMBER} "
    r"after (\d+) answers$"
)
AT_START_RECALL = re.compile(
    rf"^candidates: at the start's recall \(threshold swept on the test volumes\): precision "
    rf"{NUMBER} -> {NUMBER} after (\d+) answers; random {NUMBER} after its last round$"
)
EQUAL_MINUTES = re.compile(
    r"^candidates: Dice (\d\.\d{3}) at (\d+\.\d) annotator-minutes; best patch strategy "
    r"there: (n/a|\S+ \d\.\d{3})$"
)


def _shown(value: str) -> str:
    return "n/a" if value == "" else f"{float(value):.3f}"


@pytest.mark.slow
def test_candidates_strategy_end_to_end_beside_a_patch_strategy(tiny_data, tmp_path, capsys):
    """Two rounds of 4 answers from the same start project as ``random``'s patches: the
    simulated answers go through Project.answer by the stated rule, the rounds train on them,
    and the printed lines parse and agree with the CSV."""
    out = tmp_path / "bench"
    argv = [
        "benchmark", "active-learning",
        "--pool-images", str(tiny_data["pool-1"]), str(tiny_data["pool-2"]),
        "--test-images", str(tiny_data["test-1"]),
        "--strategies", "random,candidates", "--answers-per-round", "4",
        "--seconds-per-patch", "90", "--seconds-per-answer", "6",
        "--rounds", "2", "--per-round", "2", "--patch", "16", "--seeds", "1",
        "--init", "scratch", "--scratch-model", "unet", "--scratch-config", TINY_UNET,
        "--steps", "4", "--steps-per-patch", "1", "--max-steps", "12", "--validate-every", "2",
        "--patience", "2", "--mc", "2", "--lr", "3e-3", "--initial-strategy", "fg-random",
        "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    with open(out / "learning_curve.csv") as handle:
        rows = list(csv.DictReader(handle))
    own = [r for r in rows if r["strategy"] == "candidates"]
    patches = [r for r in rows if r["strategy"] == "random"]
    # the same start (model, initial patches) as the patch strategy; no patch is added
    assert own[0]["dice"] == patches[0]["dice"]
    assert [int(r["labelled_patches"]) for r in own] == [4, 4, 4]
    assert [int(r["answers"]) for r in own] == [0, 4, 8]
    # the cost model: 90 s a patch, 6 s an answer
    assert [float(r["annotator_minutes"]) for r in own] == [6.0, 6.4, 6.8]
    assert [float(r["annotator_minutes"]) for r in patches] == [6.0, 9.0, 12.0]
    # the budget counts answers as training items: 4 + 1 per (2 patches + training answers)
    assert all(int(r["budget"]) > 6 for r in own[1:])

    (line,) = [line for line in printed if PRECISION_RECALL.match(line)]
    found = PRECISION_RECALL.match(line).groups()
    first, last = own[0], own[-1]
    assert found == (
        _shown(first["cluster_precision"]), _shown(last["cluster_precision"]),
        _shown(first["cluster_recall"]), _shown(last["cluster_recall"]), "8",
    )  # fmt: skip
    # the precision at the start's recall: from the CSV, and at the start at least the rule's
    (line,) = [line for line in printed if AT_START_RECALL.match(line)]
    assert AT_START_RECALL.match(line).groups() == (
        _shown(first["precision_at_start_recall"]), _shown(last["precision_at_start_recall"]),
        "8", _shown(patches[-1]["precision_at_start_recall"]),
    )  # fmt: skip
    assert float(first["precision_at_start_recall"]) >= float(first["cluster_precision"])
    (line,) = [line for line in printed if EQUAL_MINUTES.match(line)]
    dice, minutes, best = EQUAL_MINUTES.match(line).groups()
    assert (dice, minutes) == (f"{float(last['dice']):.3f}", "6.8")
    # random's Dice at 6.8 min: between its rounds 0 (6.0 min) and 1 (9.0 min)
    at_equal = np.interp(6.8, [6.0, 9.0, 12.0], [float(r["dice"]) for r in patches])
    assert best == f"random {at_equal:.3f}"
    summary = json.loads((out / "summary.json").read_text())
    answers = summary["answers"]
    assert set(answers["per_minute"]) == {"random", "candidates"}
    assert "candidates" not in summary["strategies"]  # the patch summary stays patches'
    assert (out / "annotator_minutes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The simulated annotator answered through Project.answer by the rule, and the last
    # round trained on the training answers (held-out ones measured, not trained on).
    from napari_pvs.project import Project

    truth = {vid: np.asarray(io.open_labels(tiny_data[f"pool-{vid}"], "pvs").data)
             for vid in (1, 2)}  # fmt: skip
    with Project.open(out / "projects" / "candidates-seed0", readonly=True) as project:
        given = project.answers()
        assert len(given) == 8 and {a.annotator for a in given} == {"simulated"}
        assert len(project.annotations()) == 4
        for answer in given:
            crop = summary["data"]["pool"][answer.volume_id - 1]["crop"][0]
            box = tuple(slice(a + c, b + c) for a, b, c in
                        zip(answer.bbox_start, answer.bbox_stop, crop, strict=True))  # fmt: skip
            cluster = project.candidate_mask(answer.candidate_id)
            assert answer.answer == simulated_answer(truth[answer.volume_id][box][cluster])
        metrics = project.current_version().metrics
        train = [a for a in given if a.split == "train"]
        assert metrics["train_answers"] == len(train) > 0
        assert metrics["held_out_answers"] == len(given) - len(train)


def test_the_simulated_answer_is_yes_from_half_the_cluster():
    assert simulated_answer(np.array([1, 1, 0, 0], bool)) == "yes"  # exactly half
    assert simulated_answer(np.array([1, 0, 0], bool)) == "no"
    assert simulated_answer(np.array([[1]], bool)) == "yes"
    with pytest.raises(ValueError, match="at least one voxel"):
        simulated_answer(np.zeros(0, bool))


def test_candidates_parse_as_a_benchmark_strategy_not_a_patch_ranking():
    specs = parse_strategies("entropy,candidates")
    assert [s.asks_candidates for s in specs] == [False, True]
    config = BenchmarkConfig(specs)
    assert [s.name for s in config.patch_strategies] == ["entropy"]
    assert config.answers_per_round == 25
    # the cost model's defaults: 120 s a patch, 3 s an answer
    assert config.annotator_minutes(4, 100) == pytest.approx(8 + 5)
    assert "candidates" not in ranking.STRATEGIES
    with pytest.raises(ValueError, match="is not a strategy"):
        limits.check_strategy("candidates")  # a project's queue cannot use it
    with pytest.raises(ValueError, match="takes no options"):
        parse_strategies("candidates:noise=1")
    with pytest.raises(ValueError, match="cost model"):
        BenchmarkConfig(specs, seconds_per_answer=0)
    with pytest.raises(ValueError, match="answers_per_round"):
        BenchmarkConfig(specs, answers_per_round=0)


def test_answer_summary_and_lines_against_a_hand_computation():
    config = BenchmarkConfig(parse_strategies("random,candidates"), seeds=[0, 1])

    def row(strategy, seed, rnd, patches, answers, dice, precision, recall, matched):
        return {"strategy": strategy, "seed": seed, "round": rnd, "labelled_patches": patches,
                "answers": answers, "dice": dice, "cluster_precision": precision,
                "cluster_recall": recall, "precision_at_start_recall": matched,
                "annotator_minutes": config.annotator_minutes(patches, answers)}  # fmt: skip

    rows = []
    for seed in (0, 1):
        rows += [row("random", seed, 0, 4, 0, 0.40, 0.6, 0.5, 0.62),
                 row("random", seed, 1, 12, 0, 0.56, 0.6, 0.5, 0.64 + 0.02 * seed),
                 row("candidates", seed, 0, 4, 0, 0.40, 0.6, 0.5, 0.62)]  # fmt: skip
    rows += [row("candidates", 0, 1, 4, 100, 0.50, 0.70, 0.49, 0.58),
             row("candidates", 1, 1, 4, 100, 0.54, 0.74, 0.51, 0.60)]  # fmt: skip
    answers = summarise_answers(rows, config)
    # candidates: 8 + 5 = 13 minutes; random: 8 -> 24 minutes, Dice 0.40 -> 0.56, so at 13
    # minutes 0.40 + 0.16 x 5 / 16
    assert answers["minutes"] == pytest.approx(13.0)
    assert answers["patch_dice_at_equal_minutes"]["random"] == pytest.approx(0.45)
    assert answers["curve"][-1]["cluster_precision"] == pytest.approx(0.72)
    assert answer_lines(answers) == [
        "candidates: precision 0.600 -> 0.720, recall 0.500 -> 0.500 after 100 answers",
        "candidates: at the start's recall (threshold swept on the test volumes): precision "
        "0.620 -> 0.590 after 100 answers; random 0.650 after its last round",
        "candidates: Dice 0.520 at 13.0 annotator-minutes; best patch strategy there: random 0.450",
    ]


def test_a_seed_that_never_reaches_the_start_recall_leaves_the_mean_undefined():
    """One seed's model reaching no threshold at the start's recall (None) must not leave the
    other seed's precision standing as the mean."""
    config = BenchmarkConfig(parse_strategies("candidates"), seeds=[0, 1])
    rows = [
        {"strategy": "candidates", "seed": seed, "round": rnd, "labelled_patches": 4,
         "answers": 25 * rnd, "dice": 0.5, "cluster_precision": 0.6, "cluster_recall": 0.5,
         "precision_at_start_recall": None if (seed, rnd) == (1, 1) else 0.7,
         "annotator_minutes": config.annotator_minutes(4, 25 * rnd)}
        for seed in (0, 1) for rnd in (0, 1)
    ]  # fmt: skip
    answers = summarise_answers(rows, config)
    assert [p["precision_at_start_recall"] for p in answers["curve"]] == [
        pytest.approx(0.7),
        None,
    ]
    assert "precision 0.700 -> n/a after 25 answers" in answer_lines(answers)[1]

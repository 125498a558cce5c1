"""The labelling-efficiency benchmark: end to end on tiny phantoms, and its arithmetic."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from napari_pvs import io
from napari_pvs.benchmark import (
    FULL,
    BenchmarkConfig,
    describe_shift,
    final_lines,
    make_benchmark_data,
    parse_strategies,
    summarise,
    tissue_box,
)
from napari_pvs.benchmark.protocol import curve_convergence
from napari_pvs.benchmark.report import gap_warnings, seed_interval
from napari_pvs.cli import main
from napari_pvs.phantom import make_phantom

TINY_UNET = '{"channels": [4, 8], "num_res_units": 1, "feature_channels": 4}'
FINAL = re.compile(r"^(\S+): (\d+|never) patches to 95%$")
GAP = re.compile(r"^(\S+): gap closed (-?\d+\.\d+|n/a)$")
YIELD = re.compile(r"^(\S+): error yield (\d+\.\d\d|n/a) \(clusters (\d+\.\d\d|n/a)\)$")
REFERENCE = re.compile(r"^reference converged: (yes|no)$")
#: Every strategy name, as written in --strategies (and stratified with an option).
ALL_STRATEGIES = ("random", "fg-random", "entropy", "bald", "stratified", "clasp", "diverse",
                  "default", "stratified:noise=1")  # fmt: skip


@pytest.mark.slow
def test_benchmark_runs_every_strategy_end_to_end_through_the_project(tiny_data, tmp_path,
                                                                     capsys):  # fmt: skip
    """Every strategy name, label-limited rounds (budget 4 + 1/patch, at most 12 steps,
    validated every 2): the printed lines parse, each round carries its convergence check."""
    out = tmp_path / "bench"
    argv = [
        "benchmark", "active-learning",
        "--pool-images", str(tiny_data["pool-1"]), str(tiny_data["pool-2"]),
        "--test-images", str(tiny_data["test-1"]),
        "--regions", f"{tiny_data['test-1']}/labels/regions",
        "--strategies", ",".join(ALL_STRATEGIES),
        "--rounds", "2", "--per-round", "2", "--patch", "16", "--seeds", "1",
        "--init", "scratch", "--scratch-model", "unet", "--scratch-config", TINY_UNET,
        "--steps", "4", "--steps-per-patch", "1", "--max-steps", "12", "--validate-every", "2",
        "--patience", "2", "--mc", "2", "--lr", "3e-3", "--initial-strategy", "fg-random",
        "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    # the last lines: whether the reference converged, then per strategy N to 95%, gap closed
    # and error yield, in the order given
    tail = lines[-(1 + 3 * len(ALL_STRATEGIES)):]
    assert REFERENCE.match(tail[0])
    for index, strategy in enumerate(ALL_STRATEGIES):
        n, gap, found = tail[1 + 3 * index : 4 + 3 * index]
        assert [FINAL.match(n)[1], GAP.match(gap)[1], YIELD.match(found)[1]] == [strategy] * 3
    # each round's convergence evidence is printed as it ends
    evidence = [line for line in captured.err.splitlines() if " round " in line and "Dice" in line]
    assert len(evidence) == 2 * len(ALL_STRATEGIES)
    assert all(re.search(r"converged: (yes|no) ", line) for line in evidence)

    with open(out / "learning_curve.csv") as handle:
        rows = list(csv.DictReader(handle))
    for strategy in ALL_STRATEGIES:
        own = [r for r in rows if r["strategy"] == strategy]
        assert [int(r["round"]) for r in own] == [0, 1, 2]
        # 4 shared initial patches (2 of them validation), then 2 more per round
        assert [int(r["labelled_patches"]) for r in own] == [4, 6, 8]
        assert {int(r["validation_patches"]) for r in own} == {2}
        assert [int(r["version"]) for r in own] == [1, 2, 3]  # scratch: v1 trained on the start
        assert all(0 <= float(r["dice"]) <= 1 and r["dice_white_matter"] for r in own)
        # the budget grows with the training patches (2 initial + 2 per round)
        assert [int(r["budget"]) for r in own[1:]] == [8, 10]
        assert all(0 < int(r["steps"]) <= int(r["budget"]) for r in own[1:])
        assert all(r["converged"] in ("True", "False") for r in own[1:])
    starts = {r["dice"] for r in rows if r["round"] == "0" and r["strategy"] != FULL}
    assert len(starts) == 1  # every strategy starts from the same model
    (full,) = [r for r in rows if r["strategy"] == FULL]
    assert int(full["labelled_patches"]) > 8 and int(full["train_patches"]) > 6
    assert int(full["budget"]) == 12  # the same rule, at its cap

    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategies"]["random"]["curve"][-1]["labelled_patches"] == 8
    assert summary["strategies"]["random"]["auc_vs_random"] == pytest.approx(1.0)
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The annotator went through Project.accept: the label stores hold the ground truth of
    # exactly the reviewed boxes, and the ledger has every round.
    from napari_pvs.project import Project

    truth = {vid: np.asarray(io.open_labels(tiny_data[f"pool-{vid}"], "pvs").data)
             for vid in (1, 2)}  # fmt: skip
    with Project.open(out / "projects" / "random-seed0", readonly=True) as project:
        annotations = project.annotations()
        assert len(annotations) == 8 and {a.annotator for a in annotations} == {"simulated"}
        assert [v.status for v in project.versions()] == ["ready"] * 4
        assert all("validation_counts" in v.metrics for v in project.versions()[1:])
        # --retrain start: the start round trained v1 from v0; every later round starts at v1
        assert [(r.base_version, r.new_version) for r in project.rounds()] == [
            (0, 1), (1, 2), (1, 3)
        ]
        assert project.current_version().version == 3
        for a in annotations:
            box = tuple(slice(s, e) for s, e in zip(a.start, a.stop, strict=True))
            volume = project.volume(a.volume_id)
            crop = summary["data"]["pool"][a.volume_id - 1]["crop"][0]
            whole = tuple(slice(s + c, e + c) for s, e, c in
                          zip(a.start, a.stop, crop, strict=True))  # fmt: skip
            stored = np.asarray(project.labels(volume.id)["labels"][box])
            np.testing.assert_array_equal(stored, truth[a.volume_id][whole])


def test_summary_arithmetic_against_a_hand_computation():
    config = BenchmarkConfig(parse_strategies("entropy,random"), rounds=2, per_round=4,
                             seeds=[0, 1])  # fmt: skip

    def row(strategy, seed, rnd, labelled, dice):
        return {"strategy": strategy, "seed": seed, "round": rnd, "labelled_patches": labelled,
                "dice": dice, "cluster_f1": dice}  # fmt: skip

    rows = [row(FULL, 0, 2, 100, 0.78), row(FULL, 1, 2, 100, 0.82)]  # full: 0.80
    for seed in (0, 1):
        rows += [row("entropy", seed, 0, 4, 0.40), row("random", seed, 0, 4, 0.40)]
    rows += [row("entropy", 0, 1, 8, 0.70), row("entropy", 1, 1, 8, 0.80),  # mean 0.75 < 0.76
             row("entropy", 0, 2, 12, 0.76), row("entropy", 1, 2, 12, 0.78),  # 0.77 >= 0.76
             row("random", 0, 1, 8, 0.50), row("random", 1, 1, 8, 0.50),
             row("random", 0, 2, 12, 0.60), row("random", 1, 2, 12, 0.60)]  # fmt: skip
    summary = summarise(rows, config)
    assert summary["target_dice"] == pytest.approx(0.76)
    entropy, rand = summary["strategies"]["entropy"], summary["strategies"]["random"]
    assert entropy["patches_to_95"] == 12 and rand["patches_to_95"] is None
    assert entropy["patches_to_95_per_seed"] == {"0": 12, "1": 8}
    # gap 0.40 -> 0.80; entropy closes (0.35 + 0.37) / 2 / 0.40, random (0.1 + 0.2) / 2 / 0.40
    assert entropy["gap_closed"] == pytest.approx(0.9)
    assert rand["gap_closed"] == pytest.approx(0.375)
    # bootstrap over the two seeds: means 8, 10 or 12; a seed that never reaches is "never"
    assert entropy["patches_to_95_interval"] == [8.0, 12.0]
    assert rand["patches_to_95_interval"] == [None, None]
    # trapezoids over 4, 8, 12 patches: entropy 4 (0.575 + 0.76) = 5.34, random 4 (0.45 + 0.55)
    assert entropy["auc_vs_random"] == pytest.approx(5.34 / 4.0)
    assert rand["auc_vs_random"] == pytest.approx(1.0)
    assert not summary["reference_converged"]  # no convergence evidence in these rows
    # random ran out of patches after round 1: areas over 4-8 patches, the range both cover
    short = summarise([r for r in rows if not (r["strategy"] == "random" and r["round"] == 2)],
                      config)  # fmt: skip
    assert short["strategies"]["entropy"]["auc_vs_random"] == pytest.approx(2.3 / 1.8)
    assert final_lines(summary) == [
        "reference converged: no",
        "entropy: 12 patches to 95%",
        "entropy: gap closed 0.900",
        "entropy: error yield n/a (clusters n/a)",
        "random: never patches to 95%",
        "random: gap closed 0.375",
        "random: error yield n/a (clusters n/a)",
    ]


def test_seed_interval_and_a_converged_reference_flags_a_gap_above_limit():
    assert seed_interval([10, 10, 10]) == [10.0, 10.0]
    low, high = seed_interval([8, 12, None])  # one seed never reaches: the upper bound never
    assert low == pytest.approx(28 / 3) and high is None  # (8, 8, 12): 8 alone is 1/27 < 5%
    summary = {"reference_converged": True,
               "strategies": {"a": {"gap_closed": 1.07}, "b": {"gap_closed": 1.04}}}  # fmt: skip
    (warning,) = gap_warnings(summary)
    assert warning.startswith("warning: a closed 1.070 of the gap (> 1.05)")
    assert gap_warnings({**summary, "reference_converged": False}) == []


def test_step_budget_grows_with_the_labelled_set_in_whole_validations():
    (spec,) = parse_strategies("random")
    config = BenchmarkConfig([spec], steps=20, steps_per_patch=2, max_steps=60, validate_every=6)
    assert [config.budget(n) for n in (0, 12, 100)] == [24, 48, 60]  # 20, 44 rounded up; cap
    assert config.reference_budget(100) == 60
    assert BenchmarkConfig([spec], steps=50, retrain="current").budget(100) == 50
    assert BenchmarkConfig([spec], max_steps=400).validation_interval(400) == 50  # budget / 8
    # what a round trains (whole intervals of validation_interval(budget)) is the budget itself
    for config in (BenchmarkConfig([spec], steps=100, steps_per_patch=8), BenchmarkConfig([spec])):
        for n in range(0, 80):
            budget = config.budget(n)
            interval = min(budget, config.validation_interval(budget))
            assert -(-budget // interval) * interval == budget, (n, budget, interval)
    with pytest.raises(ValueError, match="initial_strategy"):
        BenchmarkConfig([spec], initial_strategy="entropy")


def test_convergence_check_reads_a_smoothed_validation_curve():
    steps = [25, 50, 75, 100, 125, 150, 175, 200]
    rising = [0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70, 0.80]
    assert not curve_convergence(steps, rising, 3).converged
    # a plateau with epoch-to-epoch noise of 0.02: raw it has not converged, smoothed it has
    noisy = [0.10, 0.30, 0.40, 0.41, 0.40, 0.42, 0.40, 0.42]
    raw = curve_convergence(steps, noisy, 1)
    smoothed = curve_convergence(steps, noisy, 3)
    assert not raw.converged and raw.movement == pytest.approx(0.02)
    assert smoothed.converged and smoothed.movement < 0.01
    assert "converged: yes" in smoothed.describe()
    assert not curve_convergence([50], [0.3], 3).converged  # one point: cannot tell


def test_strategy_specs_parse_and_refuse_bad_ones():
    clasp, plain, named = parse_strategies("stratified:noise=1:share=0.67,bald,clasp:decay=0.7")
    assert (clasp.name, clasp.noise, clasp.foreground_share) == ("stratified", 1.0, 0.67)
    assert not clasp.product_defaults and plain.product_defaults
    # clasp keeps its own noise and share (None: the strategy's), only the decay is given
    assert (named.noise, named.foreground_share, named.noise_decay) == (None, None, 0.7)
    assert not parse_strategies("clasp")[0].product_defaults  # its noise needs the round
    with pytest.raises(ValueError, match="unknown strategy"):
        parse_strategies("margin")
    with pytest.raises(ValueError, match="bad strategy option"):
        parse_strategies("entropy:temperature=2")
    with pytest.raises(ValueError, match="repeat"):
        parse_strategies("random,random")
    with pytest.raises(ValueError, match="twice validation"):
        BenchmarkConfig([plain], initial=2, validation=2)


def test_tissue_box_keeps_the_head_and_every_pvs_and_drops_air():
    # air above and below the head; at SNR 8 and faint CSF the smoothed air still has specks
    # over the tissue level, which the largest-piece rule must ignore
    p = make_phantom((96, 48, 48), spacing=(4.0, 1.0, 1.0), seed=4, snr=8, csf_ratio=1.8)
    start, stop = tissue_box(p.image, p.pvs.astype(bool))
    box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    assert p.pvs[box].sum() == p.pvs.sum()
    assert (p.regions[box] > 0).sum() == (p.regions > 0).sum()
    assert np.prod(np.subtract(stop, start)) < 0.6 * p.image.size  # the air went


def test_make_data_writes_shifted_phantoms_and_says_how_far(tmp_path):
    description = make_benchmark_data(tmp_path / "d", shape=(32, 40, 32), pool=1, test=1)
    assert json.loads((tmp_path / "d" / "data.json").read_text())["preset"] == "shifted"
    image = io.open_volume(description["pool"][0])
    assert image.spacing == (2.0, 0.8, 0.8)
    assert io.open_labels(description["test"][0], "pvs").shape == image.shape
    shift = " ".join(describe_shift("shifted"))
    assert "25% below the lowest" in shift and "anisotropy 2.5:1" in shift
    with pytest.raises(FileExistsError):
        make_benchmark_data(tmp_path / "d", shape=(32, 40, 32))


def test_site_t1_preset_writes_its_own_field_of_view(tmp_path, monkeypatch):
    """The site-t1 preset: thick-slice T1w with a strong bias field, at its own shape unless
    one is given; the shift lines name the bias field."""
    import napari_pvs.phantom as phantom_module

    shapes = []
    real = phantom_module.make_phantom

    def small_phantom(shape, **options):  # record the shape asked for, make a small one
        shapes.append(tuple(shape))
        return real((24, 40, 32), **options)

    monkeypatch.setattr(phantom_module, "make_phantom", small_phantom)
    description = make_benchmark_data(tmp_path / "d", preset="site-t1", pool=1, test=1)
    assert shapes == [(68, 192, 160)] * 2 and description["shape"] == [68, 192, 160]
    assert "shape" not in description["parameters"]
    image = io.open_volume(description["test"][0])
    assert image.spacing == (2.5, 0.9, 0.9) and image.modality == "T1"
    assert description["phantoms"][0]["bias_strength"] == 2.5
    assert "bias field: 2.5x the trained amplitude" in " ".join(description["shift"])
    make_benchmark_data(tmp_path / "e", preset="site-t1", shape=(24, 40, 32), pool=1, test=1)
    assert shapes[-1] == (24, 40, 32)


@pytest.mark.slow
@pytest.mark.parametrize("tune", [True, False])
def test_tune_start_trains_the_given_model_on_the_initial_patches_before_round_1(
    tiny_data, tmp_path, tune
):
    """``--tune-start`` with a given checkpoint: the start project trains it on the initial
    patches by the label-limited budget (4 + 1 x 2 training patches = 6 steps), that version
    is round 0 of every strategy, and each round retrains from it. Without it round 0 is the
    checkpoint as given and rounds retrain from that."""
    from napari_pvs.models import build_model
    from napari_pvs.models.checkpoint import save_checkpoint
    from napari_pvs.project import Project

    given = save_checkpoint(
        build_model("unet", **json.loads(TINY_UNET)), tmp_path / "given.safetensors"
    )
    out = tmp_path / "bench"
    argv = [
        "benchmark", "active-learning",
        "--pool-images", str(tiny_data["pool-1"]), str(tiny_data["pool-2"]),
        "--test-images", str(tiny_data["test-1"]),
        "--strategies", "random", "--rounds", "1", "--per-round", "2", "--patch", "16",
        "--seeds", "1", "--init", str(given), "--steps", "4", "--steps-per-patch", "1",
        "--max-steps", "12", "--validate-every", "2", "--patience", "2", "--mc", "0",
        "--lr", "3e-3", "--initial-strategy", "fg-random", "--out", str(out),
    ] + (["--tune-start"] if tune else [])  # fmt: skip
    assert main(argv) == 0
    start_version = 1 if tune else 0
    with Project.open(out / "projects" / "start-seed0") as start:
        assert start.current_version().version == start_version
        if tune:
            (tuned,) = start.rounds()
            assert tuned.base_version == 0 and tuned.config["steps"] == 6
            assert len(start.annotations(split="train")) == 2
    with Project.open(out / "projects" / "random-seed0") as project:
        strategy_round = project.rounds()[-1]
        assert strategy_round.base_version == start_version
    with open(out / "learning_curve.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["strategy"] == "random"]
    assert int(rows[0]["version"]) == start_version  # round 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["tune_start"] is tune


def test_cluster_sweep_and_precision_at_a_matched_recall_against_a_hand_count(tmp_path):
    """Three true PVS (A, C, E) and two false clusters (B, and a one-voxel speck D that the
    smallest-cluster rule removes), each at its own probability: the sweep's precision and
    recall at each threshold are the hand counts, and the precision at a recall is the best
    one among the points that reach it."""
    from napari_pvs.benchmark.cases import Case
    from napari_pvs.benchmark.scoring import SWEEP_THRESHOLDS, cluster_sweep, precision_at_recall

    truth = np.zeros((12, 12, 12), bool)
    probability = np.zeros(truth.shape, np.float16)
    truth[1, 1, 1:5] = truth[5, 5, 1:5] = truth[9, 9, 1:5] = True  # A, C, E
    probability[1, 1, 1:5] = 0.8  # A
    probability[1, 9, 1:5] = 0.3  # B: no PVS
    probability[5, 5, 1:4] = 0.35  # C: three of its four voxels
    probability[9, 1, 9] = 0.95  # D: one voxel, under the smallest cluster kept
    case = Case("hand", tmp_path, np.zeros(truth.shape, np.float32), truth, None,
                (1.0, 1.0, 1.0), np.eye(4), "T2", [[0, 0, 0], [12, 12, 12]])  # fmt: skip
    sweep = cluster_sweep(probability, case, min_voxels=2)
    expected = {0.1: (2 / 3, 2 / 3), 0.2: (2 / 3, 2 / 3), 0.3: (2 / 3, 2 / 3),
                0.9: (0.0, 0.0)}  # fmt: skip
    expected.update({t: (1.0, 1 / 3) for t in (0.4, 0.5, 0.6, 0.7, 0.8)})
    assert [row[0] for row in sweep] == list(SWEEP_THRESHOLDS)
    for threshold, precision, recall in sweep:
        assert (precision, recall) == pytest.approx(expected[threshold]), threshold

    metrics = {"cluster_precision": 1.0, "cluster_recall": 1 / 3, "cluster_sweep": sweep}
    assert precision_at_recall(metrics, 1 / 3) == pytest.approx(1.0)  # the rule's own point
    assert precision_at_recall(metrics, 0.68) == pytest.approx(2 / 3)  # 0.02 below is matched
    assert precision_at_recall(metrics, 0.7) is None  # no threshold reaches it

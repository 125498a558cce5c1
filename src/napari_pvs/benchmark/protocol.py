"""The labelling-efficiency benchmark's protocol: how many reviewed patches each strategy needs.

A simulated annotator works through the product's own loop. For every strategy and seed a
project (:class:`napari_pvs.project.Project`) starts from a copy of the same start project (same
model, same pool volumes, same initial labelled patches, same fixed validation patches); each
round it ranks the pool (:meth:`Project.rank`, or :func:`napari_pvs.ranking.rank_patches` +
:meth:`Project.record_queue` for strategy options the project API does not take), reveals the
ground truth of the ``per_round`` patches queued first through :meth:`Project.accept` (the
call a person's review makes), runs a round (:func:`napari_pvs.rounds.run_round`: fine-tune
through ``training.fit``, write the version, re-predict the pool) and scores the new current
version on the test volumes with the product's segmentation rule (``Predictor`` defaults from
the checkpoint: threshold and smallest cluster; ``test_tta`` mirrorings, 1 by default where
the bundled rule says 4, for speed). Every strategy gets the same training steps per round and
the same seeds.

**Label-limited** (``retrain="start"``, the default): every round trains the start model on
all patches labelled so far (via :meth:`Project.rollback`), to convergence: a step budget that
grows with the labelled set (``steps + steps_per_patch x training patches``, at most
``max_steps``), validated on the fixed validation patches every ``budget / 8`` steps (the one
validation Dice), stopped after ``patience`` validations without improvement, best weights
kept. Each round reports its convergence evidence: the validation Dice (a moving mean of
``smooth`` validations) moved by less than 0.01 over the last quarter of its steps. So each
point of the curve is a function of the labelled set, not of the steps trained. With
``tune_start`` (always with ``init="scratch"``) the start model is first trained on the initial
patches by the same rule and that version is round 0 and the model every round starts from, so
round 1 measures what the first round's labels add, not what the initial patches taught.
**Step-limited** (``retrain="current"``, the product's loop): each round fine-tunes the current
version ``steps`` steps; the model at round r has had r rounds of steps.

The reference is full supervision: per seed, every patch box of the pool grid is accepted and
one round trains the start model by the same rule (``full_steps`` overrides its budget; with
``retrain="current"`` it defaults to ``rounds * steps``); the run says whether every seed's
reference converged. A round the worse-round guard keeps aside is made current anyway here:
the benchmark measures what each labelled set gives.
Per strategy the benchmark reports N, the labelled patches at which the seed-mean Dice first
reaches 95% of the seed-mean full-supervision Dice (``never`` if it does not), with a
bootstrap 90% interval over seeds; "gap closed": the share of the Dice gap between the start
model and full supervision closed, averaged over the rounds; the area under the Dice curve
relative to random's; final Dice ± std over seeds; and the **error yield** of each round's
picks for the model that chose them (:mod:`napari_pvs.error_yield`; round 0 is printed).

Labelled patches count every accepted patch, the shared initial ones (training and
validation) included. Pool patches alternate between pool volumes (each volume ranked on its
own; the volume order of each round drawn by seed), so every strategy spends its budget the
same way. With ``crop`` the pool and test volumes are cut to their tissue bounding box (plus
ground truth, plus a margin) before anything runs, so predictions do not pay for the air
around the head; the ground truth outside it is empty by construction.

This module runs the protocol (start projects, rounds, full supervision); the strategies and
configuration are in :mod:`.config`, the volumes in :mod:`.cases`, the reviewer in
:mod:`.annotator`, the test metrics in :mod:`.scoring`, the figures and files in :mod:`.report`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_pvs.benchmark.annotator import SimulatedAnnotator
from napari_pvs.benchmark.answers import (
    CandidateAnnotator,
    answer_lines,
    plot_per_minute,
    summarise_answers,
)
from napari_pvs.benchmark.cases import Case, load_case
from napari_pvs.benchmark.config import BenchmarkConfig, StrategySpec
from napari_pvs.benchmark.report import (
    FULL,
    final_lines,
    plot_learning_curve,
    summarise,
    write_csv,
)
from napari_pvs.benchmark.scoring import precision_at_recall, score
from napari_pvs.models.checkpoint_checks import file_sha256
from napari_pvs.progress import CancelToken, ProgressCallback, check_cancelled, no_progress


@dataclass
class BenchmarkResult:
    """The rows of every scored point, their summary, the files written and the final lines."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    csv_path: Path
    png_path: Path
    summary_path: Path
    lines: list[str]


class _Runner:
    """Per seed: the start project, full supervision, then each strategy's rounds on a copy."""

    def __init__(
        self,
        pool: list[Case],
        test: list[Case],
        out: Path,
        config: BenchmarkConfig,
        progress: ProgressCallback,
        cancel: CancelToken | None,
    ) -> None:
        self.pool, self.test, self.out, self.config = pool, test, out, config
        self.progress, self.cancel = progress, cancel
        self.annotator = SimulatedAnnotator(pool, config.patch)
        self.candidate_annotator = CandidateAnnotator(pool)
        self.rows: list[dict[str, Any]] = []
        self.score_cache: dict[str, dict[str, Any]] = {}
        #: Per seed, the start project's cluster recall at the rule (each row's precision is
        #: also given at this recall: ``precision_at_start_recall``).
        self.start_recall: dict[int, float] = {}
        self.start_seconds: list[float] = []
        per_seed = 2 + len(config.strategies) * config.rounds
        self.total = per_seed * len(config.seeds)
        self.done = 0

    # -- helpers ------------------------------------------------------------------------------
    def tick(self, message: str) -> None:
        self.progress(self.done, self.total, message)

    def step_done(self, message: str) -> None:
        self.done += 1
        self.tick(message)

    def start_checkpoint(self, seed: int) -> Path:
        from napari_pvs.models import build_model
        from napari_pvs.models.checkpoint import default_checkpoint_path, save_checkpoint

        init = self.config.init
        if init == "default":
            return default_checkpoint_path()
        if init != "scratch":
            path = Path(init)
            if not path.is_file():
                raise FileNotFoundError(f"--init {init}: no such checkpoint")
            return path
        import torch

        torch.manual_seed(seed)
        model = build_model(self.config.scratch_model, **self.config.scratch_config)
        path = self.out / "start" / f"scratch-seed{seed}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_checkpoint(model, path, training={"init": "scratch", "seed": seed})

    def round_config(self, steps: int, seed: int, rerank: bool):
        from napari_pvs.rounds import RoundConfig

        c = self.config
        label_limited = c.retrain == "start"
        return RoundConfig(
            steps=steps,
            batch_size=c.batch_size,
            patch=c.patch,
            learning_rate=c.learning_rate,
            device=c.device,
            seed=seed,
            n=c.per_round,
            rerank=rerank,
            patience=c.patience if label_limited else None,
            validate_every=c.validation_interval(steps),
        )

    def run_round(self, project, steps: int, seed: int, rerank: bool):
        """One round; returns its outcome and the convergence check of its validation curve
        (the per-epoch validation Dice, a moving mean of ``config.smooth``)."""
        from napari_pvs.rounds import run_round

        events: list[dict[str, Any]] = []
        outcome = run_round(
            project, self.round_config(steps, seed, rerank), cancel=self.cancel,
            on_event=events.append,
        )  # fmt: skip
        if outcome.status != "done":
            raise RuntimeError(f"round in {project.path} {outcome.status}: {outcome.message}")
        epochs = [e for e in events if e["kind"] == "validation" and e.get("source") == "fit"]
        check = curve_convergence([e["step"] for e in epochs], [e["dice"] for e in epochs],
                                  self.config.smooth)  # fmt: skip
        if not outcome.current:  # the guard kept it aside: the benchmark measures it anyway
            project.rollback(outcome.version)
        return outcome, check

    def error_yield(self, project, records) -> tuple[float | None, float | None]:
        """Voxel and cluster error yield of the picked ``records`` for the current version's
        segmentation of the pool (see :mod:`napari_pvs.error_yield`)."""
        import zarr

        from napari_pvs.error_yield import pooled_error_yield

        volumes = []
        for vid, case in enumerate(self.pool, start=1):
            store = zarr.open_group(str(project.predict(vid)), mode="r")
            boxes = [(r.start, r.stop) for r in records if r.volume_id == vid]
            volumes.append((np.asarray(store["segmentation"][:]), case.truth, boxes))
        if not records:
            return None, None
        result = pooled_error_yield(volumes)
        return result.voxel_yield, result.cluster_yield

    def score_current(self, project) -> tuple[dict[str, Any], float]:
        """Test metrics of the current version (cached by checkpoint content) and seconds."""
        started = time.perf_counter()
        path = project.checkpoint_path()
        digest = file_sha256(path)
        if digest not in self.score_cache:
            model, _ = project.load_model(device=self.config.device)
            self.score_cache[digest] = score(model, self.test, self.config.test_tta,
                                             self.config.device)  # fmt: skip
        return self.score_cache[digest], time.perf_counter() - started

    def row(self, project, spec_label: str, seed: int, round_index: int, metrics, **extra):
        annotations = project.annotations()
        answers = int(extra.pop("answers", 0))
        row = {
            "strategy": spec_label,
            "seed": seed,
            "round": round_index,
            "labelled_patches": len(annotations),
            "answers": answers,
            "annotator_minutes": self.config.annotator_minutes(len(annotations), answers),
            "train_patches": sum(a.split == "train" for a in annotations),
            "validation_patches": sum(a.split == "validation" for a in annotations),
            "pvs_patches": sum(not a.empty for a in annotations),
            "version": project.current_version().version,
            **metrics,
            **extra,
        }
        if seed in self.start_recall:
            row["precision_at_start_recall"] = precision_at_recall(metrics, self.start_recall[seed])
        self.rows.append(row)
        return row

    # -- the phases ---------------------------------------------------------------------------
    def make_start(self, seed: int) -> tuple[Path, list[dict[str, Any]]]:
        """The start project of a seed: model, pool, initial patches, start predictions."""
        from napari_pvs.project import Project

        c = self.config
        folder = self.out / "projects" / f"start-seed{seed}"
        self.tick(f"seed {seed}: start project")
        began = time.perf_counter()
        with Project.create(
            folder,
            model=self.start_checkpoint(seed),
            seed=seed,
            validation_fraction=0.5,
            validation_max=c.validation,
        ) as project:
            project.update_settings(
                predict_tta=1, predict_mc=c.mc_samples, patch=c.patch, device=c.device
            )
            for index, case in enumerate(self.pool, start=1):
                record = project.add_volume(case.path, modality=case.modality, name=case.name)
                if record.id != index:  # the runner addresses pool volume i as id i
                    raise RuntimeError(f"pool volume {index} got id {record.id} in {folder}")
            started = time.perf_counter()
            first = StrategySpec(c.initial_strategy)
            records, _ = self.annotator.pick(project, first, c.initial, seed, 0)
            self.annotator.accept(project, records)
            if len(records) < c.initial:  # fg-random finds too few patches with PVS: top up
                more, _ = self.annotator.pick(
                    project, StrategySpec("random"), c.initial - len(records), seed, 0
                )
                self.annotator.accept(project, more)
            seconds_rank = time.perf_counter() - started
            seconds_round = 0.0
            if c.init == "scratch" or c.tune_start:  # a start model that has seen them
                started = time.perf_counter()
                steps = c.steps if c.init == "scratch" else c.budget(
                    len(project.annotations(split="train"))
                )
                self.run_round(project, steps, seed * 1000, rerank=False)
                seconds_round = time.perf_counter() - started
            for vid in range(1, len(self.pool) + 1):
                project.predict(vid)
            metrics, seconds_score = self.score_current(project)
            self.start_recall[seed] = metrics["cluster_recall"]
            start_row = {
                "metrics": metrics,
                "seconds_rank": round(seconds_rank, 2),
                "seconds_round": round(seconds_round, 2),
                "seconds_score": round(seconds_score, 2),
            }
        self.start_seconds.append(time.perf_counter() - began)
        self.step_done(f"seed {seed}: start Dice {metrics['dice']:.3f}")
        return folder, [start_row]

    @contextlib.contextmanager
    def strategy_project(self, start: Path, spec: StrategySpec, seed: int, start_row: dict):
        """A strategy's own copy of the seed's start project, open, its start row written."""
        from napari_pvs.project import Project

        folder = self.out / "projects" / f"{_slug(spec.label)}-seed{seed}"
        shutil.copytree(start, folder)
        with Project.open(folder) as project:
            self.row(project, spec.label, seed, 0, start_row["metrics"], note="start",
                     seconds_score=start_row["seconds_score"])  # fmt: skip
            yield project

    def run_strategy(self, start: Path, spec: StrategySpec, seed: int, start_row: dict) -> None:
        c = self.config
        with self.strategy_project(start, spec, seed, start_row) as project:
            if not strategy_reads_uncertainty(spec.name):  # one pass is enough
                project.update_settings(predict_mc=0)
            start_version = project.current_version().version
            for round_index in range(1, c.rounds + 1):
                check_cancelled(self.cancel)
                self.tick(f"seed {seed} {spec.label}: round {round_index}")
                started = time.perf_counter()
                cpu_started = time.process_time()
                records, note = self.annotator.pick(project, spec, c.per_round, seed, round_index)
                ranked = time.perf_counter()
                # the picks against the errors of the model that chose them (round index - 1)
                voxel_yield, cluster_yield = self.error_yield(project, records)
                self.annotator.accept(project, records)
                if c.retrain == "start":  # every round from the start model: labels, not steps
                    project.rollback(start_version)
                accepted = time.perf_counter()
                budget = c.budget(len(project.annotations(split="train")))
                outcome, check = self.run_round(
                    project, budget, seed * 1000 + round_index, rerank=round_index < c.rounds
                )
                trained = time.perf_counter()
                metrics, seconds_score = self.score_current(project)
                self.row(
                    project,
                    spec.label,
                    seed,
                    round_index,
                    metrics,
                    seconds_rank=round(ranked - started, 2),
                    seconds_accept=round(accepted - ranked, 2),
                    seconds_round=round(trained - accepted, 2),
                    seconds_score=round(seconds_score, 2),
                    **training_fields(outcome, check, budget, cpu_started),
                    error_yield=voxel_yield,
                    cluster_error_yield=cluster_yield,
                    note=note or ("" if len(records) == c.per_round else
                                  f"only {len(records)} patches left to queue"),
                )  # fmt: skip
                self.step_done(
                    f"seed {seed} {spec.label} round {round_index}: Dice {metrics['dice']:.3f}; "
                    f"{outcome.metrics.get('steps_trained')} of {budget} steps on "
                    f"{len(project.annotations())} labelled patches, {check.describe()}"
                )

    def run_full(self, start: Path, seed: int) -> None:
        """Full supervision: every patch box of the pool grid accepted, one long round."""
        from napari_pvs.project import Project

        c = self.config
        folder = self.out / "projects" / f"full-seed{seed}"
        shutil.copytree(start, folder)
        self.tick(f"seed {seed}: full supervision")
        with Project.open(folder) as project:
            started = time.perf_counter()
            cpu_started = time.process_time()
            self.annotator.accept_everything(project)
            accepted = time.perf_counter()
            budget = c.reference_budget(len(project.annotations(split="train")))
            outcome, check = self.run_round(project, budget, seed * 1000 + 999, rerank=False)
            trained = time.perf_counter()
            metrics, seconds_score = self.score_current(project)
            self.row(
                project,
                FULL,
                seed,
                c.rounds,
                metrics,
                seconds_accept=round(accepted - started, 2),
                seconds_round=round(trained - accepted, 2),
                seconds_score=round(seconds_score, 2),
                **training_fields(outcome, check, budget, cpu_started),
            )
        self.step_done(
            f"seed {seed}: full supervision Dice {metrics['dice']:.3f}; "
            f"{outcome.metrics.get('steps_trained')} of {budget} steps, {check.describe()}"
        )

    def run_candidates(self, start: Path, spec: StrategySpec, seed: int, start_row: dict):
        """The ``candidates`` strategy: from the same start project, each round the simulated
        annotator answers ``answers_per_round`` candidates of the current version (yes when
        at least half the cluster is PVS), then a round trains by the same rule as the patch
        strategies (label-limited: the start model on everything labelled, each answer a
        training item of the step budget; held-out answers are not trained on)."""
        c = self.config
        with self.strategy_project(start, spec, seed, start_row) as project:
            start_version = project.current_version().version
            for round_index in range(1, c.rounds + 1):
                check_cancelled(self.cancel)
                self.tick(f"seed {seed} {spec.label}: round {round_index}")
                started = time.perf_counter()
                cpu_started = time.process_time()
                given = self.candidate_annotator.answer(
                    project, c.answers_per_round, seed, round_index
                )
                answered = time.perf_counter()
                if c.retrain == "start":
                    project.rollback(start_version)
                items = len(project.annotations(split="train")) + len(
                    [a for a in project.answers(split="train") if a.answer != "skip"]
                )
                budget = c.budget(items)
                outcome, check = self.run_round(
                    project, budget, seed * 1000 + round_index, rerank=False
                )
                trained = time.perf_counter()
                metrics, seconds_score = self.score_current(project)
                answers = [a for a in project.answers() if a.answer != "skip"]
                self.row(
                    project,
                    spec.label,
                    seed,
                    round_index,
                    metrics,
                    answers=len(answers),
                    seconds_rank=round(answered - started, 2),
                    seconds_round=round(trained - answered, 2),
                    seconds_score=round(seconds_score, 2),
                    **training_fields(outcome, check, budget, cpu_started),
                    answer_precision=outcome.metrics.get("answer_precision"),
                    note="" if len(given) == c.answers_per_round else
                    f"only {len(given)} candidates left to answer",
                )  # fmt: skip
                self.step_done(
                    f"seed {seed} {spec.label} round {round_index}: Dice {metrics['dice']:.3f}, "
                    f"cluster precision {metrics['cluster_precision']:.3f}, recall "
                    f"{metrics['cluster_recall']:.3f} after {len(answers)} answers; "
                    f"{outcome.metrics.get('steps_trained')} of {budget} steps, "
                    f"{check.describe()}"
                )

    def run(self) -> None:
        for seed in self.config.seeds:
            start, (start_row,) = self.make_start(seed)
            self.run_full(start, seed)
            for spec in self.config.strategies:
                if spec.asks_candidates:
                    self.run_candidates(start, spec, seed, start_row)
                else:
                    self.run_strategy(start, spec, seed, start_row)


def training_fields(outcome, check, budget: int, cpu_started: float) -> dict[str, Any]:
    """A scored row's training columns: the round's steps and budget, its convergence evidence
    and validation Dice, the CPU seconds since ``cpu_started`` and the machine's load."""
    return {
        "cpu_seconds": round(time.process_time() - cpu_started, 2),
        "load": round(os.getloadavg()[0], 2),
        "steps": outcome.metrics.get("steps_trained"),
        "budget": budget,
        "converged": check.converged,
        "convergence_movement": check.movement,
        "validation_dice": outcome.metrics.get("validation_dice"),
    }


def strategy_reads_uncertainty(name: str) -> bool:
    """False for the strategies that rank without MC-dropout uncertainty (one pass will do)."""
    from napari_pvs.ranking import resolve_strategy

    return resolve_strategy(name) not in ("random", "fg-random")


def curve_convergence(steps: Sequence[float], dice: Sequence[float], smooth: int = 1):
    """:func:`napari_pvs.validation.convergence` of a validation curve after a moving mean of
    ``smooth`` evaluations (each at the step of its last one), over the last quarter of the
    training steps (from step 0): on a small validation set the epoch-to-epoch noise is larger
    than the 0.01 tolerance."""
    from napari_pvs.validation import convergence

    steps, dice = list(steps), list(dice)
    window = max(1, min(int(smooth), len(dice)))
    means = [float(np.mean(dice[i - window + 1 : i + 1])) for i in range(window - 1, len(dice))]
    return convergence(steps[window - 1 :], means, start=0)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def run_benchmark(
    pool_images: Sequence[str | Path],
    pool_labels: Sequence[str | Path],
    test_images: Sequence[str | Path],
    test_labels: Sequence[str | Path],
    out: str | Path,
    config: BenchmarkConfig,
    *,
    regions: Sequence[str | Path] | None = None,
    progress: ProgressCallback = no_progress,
    cancel: CancelToken | None = None,
) -> BenchmarkResult:
    """Run the benchmark into the new (or empty) folder ``out``; see the module notes."""
    from napari_pvs import atomic

    if len(pool_images) != len(pool_labels) or not pool_images:
        raise ValueError(
            f"give one --pool-labels per --pool-images (got {len(pool_images)} images and "
            f"{len(pool_labels)} labels)"
        )
    if len(test_images) != len(test_labels) or not test_images:
        raise ValueError(
            f"give one --test-labels per --test-images (got {len(test_images)} images and "
            f"{len(test_labels)} labels)"
        )
    if regions and len(regions) != len(test_images):
        raise ValueError(f"give one --regions map per test image ({len(test_images)})")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} is not an empty folder; choose a new --out folder")
    for given in (*pool_images, *pool_labels, *test_images, *test_labels, *(regions or [])):
        if atomic.overlaps(out, given):
            raise ValueError(f"--out {out} overlaps the input {given}; choose another folder")
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "projects").mkdir()
    started = time.perf_counter()
    progress(0, 0, "reading the pool and test volumes")
    pool = [
        load_case(image, labels, name=f"pool-{i}", modality=config.modality, crop=config.crop,
                  write_to=out / "data" / f"pool-{i}.zarr")
        for i, (image, labels) in enumerate(zip(pool_images, pool_labels, strict=True), 1)
    ]  # fmt: skip
    test = [
        load_case(image, labels, name=f"test-{i}", modality=config.modality, crop=config.crop,
                  regions_path=regions[i - 1] if regions else None)
        for i, (image, labels) in enumerate(zip(test_images, test_labels, strict=True), 1)
    ]  # fmt: skip
    runner = _Runner(pool, test, out, config, progress, cancel)
    runner.run()
    summary = summarise(runner.rows, config)
    summary["answers"] = summarise_answers(runner.rows, config)
    summary["config"] = _jsonable(asdict(config))
    summary["data"] = {
        "pool": [{"path": str(c.path), "shape": list(c.truth.shape), "crop": c.crop,
                  "pvs_voxels": int(c.truth.sum())} for c in pool],
        "test": [{"shape": list(c.truth.shape), "crop": c.crop, "pvs_voxels": int(c.truth.sum())}
                 for c in test],
    }  # fmt: skip
    summary["costs"]["seconds_start"] = float(np.mean(runner.start_seconds))
    summary["seconds_total"] = round(time.perf_counter() - started, 1)
    csv_path = write_csv(runner.rows, out / "learning_curve.csv")
    training = (
        f"{config.steps} steps per round" if config.retrain == "current" else
        f"retrained from the start model to convergence ({config.steps} + "
        f"{config.steps_per_patch}/patch steps, at most {config.max_steps})"
    )  # fmt: skip
    title = (
        f"init {config.init}{' tuned on the initial patches' if config.tune_start else ''}, "
        f"{config.per_round} patches of {config.patch}^3 per round, "
        f"{training}, seeds {', '.join(map(str, config.seeds))}"
    )
    png_path = plot_learning_curve(summary, runner.rows, out / "learning_curve.png", title)
    if "curve" in summary["answers"]:  # the candidates strategy ran
        minutes_png = plot_per_minute(summary["answers"], out / "annotator_minutes.png", title)
        summary["answers"]["png"] = str(minutes_png)
    summary_path = out / "summary.json"
    atomic.write_text(summary_path, json.dumps(summary, indent=1))
    lines = final_lines(summary) + answer_lines(summary["answers"])
    return BenchmarkResult(runner.rows, summary, csv_path, png_path, summary_path, lines)


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist")
                                 else str(v)))  # fmt: skip

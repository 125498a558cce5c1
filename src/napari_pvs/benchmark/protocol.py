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
the same seeds. By default each round fine-tunes the current version, as the product's loop
does (the model at round r has had r rounds of steps); with ``retrain="start"`` every round
fine-tunes the start model on all patches labelled so far (via :meth:`Project.rollback`), so
the curve measures labels alone.

The reference is full supervision: per seed, every patch box of the pool grid is accepted and
one round of ``full_steps`` fine-tunes the start model (default: the steps the last round's
model has had in all, ``rounds * steps``, or ``steps`` with ``retrain="start"``).
Per strategy the benchmark reports N, the labelled patches at which the seed-mean Dice first
reaches 95% of the seed-mean full-supervision Dice (``never`` if it does not), and "gap
closed": the share of the Dice gap between the start model and full supervision closed,
averaged over the rounds (the normalised area under the learning curve).

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

import hashlib
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
from napari_pvs.benchmark.cases import Case, load_case
from napari_pvs.benchmark.config import BenchmarkConfig, StrategySpec
from napari_pvs.benchmark.report import (
    FULL,
    final_lines,
    plot_learning_curve,
    summarise,
    write_csv,
)
from napari_pvs.benchmark.scoring import score
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
        self.rows: list[dict[str, Any]] = []
        self.score_cache: dict[str, dict[str, Any]] = {}
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
        return RoundConfig(
            steps=steps,
            batch_size=c.batch_size,
            patch=c.patch,
            learning_rate=c.learning_rate,
            device=c.device,
            seed=seed,
            n=c.per_round,
            rerank=rerank,
        )

    def run_round(self, project, steps: int, seed: int, rerank: bool):
        from napari_pvs.rounds import run_round

        outcome = run_round(
            project, self.round_config(steps, seed, rerank), cancel=self.cancel
        )
        if outcome.status != "done":
            raise RuntimeError(f"round in {project.path} {outcome.status}: {outcome.message}")
        return outcome

    def score_current(self, project) -> tuple[dict[str, Any], float]:
        """Test metrics of the current version (cached by checkpoint content) and seconds."""
        started = time.perf_counter()
        path = project.checkpoint_path()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest not in self.score_cache:
            model, _ = project.load_model(device=self.config.device)
            self.score_cache[digest] = score(model, self.test, self.config.test_tta,
                                             self.config.device)  # fmt: skip
        return self.score_cache[digest], time.perf_counter() - started

    def row(self, project, spec_label: str, seed: int, round_index: int, metrics, **extra):
        annotations = project.annotations()
        row = {
            "strategy": spec_label,
            "seed": seed,
            "round": round_index,
            "labelled_patches": len(annotations),
            "train_patches": sum(a.split == "train" for a in annotations),
            "validation_patches": sum(a.split == "validation" for a in annotations),
            "pvs_patches": sum(not a.empty for a in annotations),
            "version": project.current_version().version,
            **metrics,
            **extra,
        }
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
            records, _ = self.annotator.pick(project, StrategySpec("random"), c.initial, seed, 0)
            self.annotator.accept(project, records)
            seconds_rank = time.perf_counter() - started
            seconds_round = 0.0
            if c.init == "scratch":  # a start model worth ranking with: trained on them
                started = time.perf_counter()
                self.run_round(project, c.steps, seed * 1000, rerank=False)
                seconds_round = time.perf_counter() - started
            for vid in range(1, len(self.pool) + 1):
                project.predict(vid)
            metrics, seconds_score = self.score_current(project)
            start_row = {
                "metrics": metrics,
                "seconds_rank": round(seconds_rank, 2),
                "seconds_round": round(seconds_round, 2),
                "seconds_score": round(seconds_score, 2),
            }
        self.start_seconds.append(time.perf_counter() - began)
        self.step_done(f"seed {seed}: start Dice {metrics['dice']:.3f}")
        return folder, [start_row]

    def run_strategy(self, start: Path, spec: StrategySpec, seed: int, start_row: dict) -> None:
        from napari_pvs.project import Project

        c = self.config
        folder = self.out / "projects" / f"{_slug(spec.label)}-seed{seed}"
        shutil.copytree(start, folder)
        with Project.open(folder) as project:
            if spec.name in ("random", "fg-random"):  # they read no uncertainty: one pass
                project.update_settings(predict_mc=0)
            start_version = project.current_version().version
            self.row(project, spec.label, seed, 0, start_row["metrics"], note="start",
                     seconds_score=start_row["seconds_score"])  # fmt: skip
            for round_index in range(1, c.rounds + 1):
                check_cancelled(self.cancel)
                self.tick(f"seed {seed} {spec.label}: round {round_index}")
                started = time.perf_counter()
                cpu_started = time.process_time()
                records, note = self.annotator.pick(project, spec, c.per_round, seed, round_index)
                ranked = time.perf_counter()
                self.annotator.accept(project, records)
                if c.retrain == "start":  # every round from the start model: labels, not steps
                    project.rollback(start_version)
                accepted = time.perf_counter()
                outcome = self.run_round(
                    project, c.steps, seed * 1000 + round_index, rerank=round_index < c.rounds
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
                    cpu_seconds=round(time.process_time() - cpu_started, 2),
                    load=round(os.getloadavg()[0], 2),
                    steps=outcome.metrics.get("steps"),
                    validation_dice=outcome.metrics.get("validation_dice"),
                    note=note or ("" if len(records) == c.per_round else
                                  f"only {len(records)} patches left to queue"),
                )  # fmt: skip
                self.step_done(f"seed {seed} {spec.label}: Dice {metrics['dice']:.3f}")

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
            outcome = self.run_round(
                project, int(c.full_steps), seed * 1000 + 999, rerank=False
            )
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
                cpu_seconds=round(time.process_time() - cpu_started, 2),
                load=round(os.getloadavg()[0], 2),
                steps=outcome.metrics.get("steps"),
                validation_dice=outcome.metrics.get("validation_dice"),
            )
        self.step_done(f"seed {seed}: full supervision Dice {metrics['dice']:.3f}")

    def run(self) -> None:
        for seed in self.config.seeds:
            start, (start_row,) = self.make_start(seed)
            self.run_full(start, seed)
            for spec in self.config.strategies:
                self.run_strategy(start, spec, seed, start_row)


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
    title = (
        f"init {config.init}, {config.per_round} patches of {config.patch}^3 per round, "
        f"{config.steps} steps per round, seeds {', '.join(map(str, config.seeds))}"
    )
    png_path = plot_learning_curve(summary, runner.rows, out / "learning_curve.png", title)
    summary_path = out / "summary.json"
    atomic.write_text(summary_path, json.dumps(summary, indent=1))
    return BenchmarkResult(
        runner.rows, summary, csv_path, png_path, summary_path, final_lines(summary)
    )


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist")
                                 else str(v)))  # fmt: skip

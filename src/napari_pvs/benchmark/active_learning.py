"""Labelling-efficiency benchmark: how many reviewed patches each queue strategy needs.

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
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_pvs.progress import CancelToken, ProgressCallback, check_cancelled, no_progress
from napari_pvs.ranking import DEFAULT_NOISE_DECAY, STRATEGIES

#: Share of the full-supervision Dice a strategy must reach.
TARGET_SHARE = 0.95
#: Voxels of context kept around the tissue bounding box when cropping.
CROP_MARGIN = 6
#: Name of the full-supervision reference in the CSV.
FULL = "full-supervision"
ANNOTATOR = "simulated"
CSV_FIELDS = (
    "strategy", "seed", "round", "labelled_patches", "train_patches", "validation_patches",
    "pvs_patches", "dice", "cluster_f1", "cluster_precision", "cluster_recall",
    "dice_white_matter", "dice_basal_ganglia", "predicted_pvs", "true_pvs", "version",
    "steps", "validation_dice", "seconds_rank", "seconds_accept", "seconds_round",
    "seconds_score", "cpu_seconds", "load", "note",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Strategies


@dataclass(frozen=True)
class StrategySpec:
    """A queue strategy with optional ranking options, written ``NAME[:key=value...]``.

    Keys: ``noise`` (initial score-noise temperature), ``decay`` (its factor per round),
    ``share`` (``stratified``: share of picks with predicted PVS). ``stratified:noise=1:share=0.67``
    is nnActive's ClaSP PE (two thirds class-stratified, decaying noise).
    """

    name: str
    noise: float = 0.0
    noise_decay: float = DEFAULT_NOISE_DECAY
    foreground_share: float = 0.5
    label: str = ""

    @property
    def product_defaults(self) -> bool:
        """True when ``Project.rank`` ranks exactly like this (no extra options)."""
        return self.noise == 0 and self.foreground_share == 0.5


def parse_strategies(text: str | Sequence[str]) -> list[StrategySpec]:
    """``"bald,entropy,stratified:noise=1"`` (or a list of such items) -> specs, checked."""
    items = text.split(",") if isinstance(text, str) else list(text)
    keys = {"noise": "noise", "decay": "noise_decay", "share": "foreground_share"}
    specs = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, *options = item.split(":")
        if name not in STRATEGIES:
            raise ValueError(
                f"unknown strategy {name!r} in {item!r}; choose from {', '.join(STRATEGIES)} "
                "(options: NAME:noise=1:decay=0.5:share=0.67)"
            )
        values: dict[str, float] = {}
        for option in options:
            key, _, value = option.partition("=")
            if key not in keys or not value:
                raise ValueError(
                    f"bad strategy option {option!r} in {item!r}; use noise=T, decay=D or share=F"
                )
            try:
                values[keys[key]] = float(value)
            except ValueError as exc:
                raise ValueError(f"strategy option {option!r} needs a number") from exc
        spec = StrategySpec(name, label=item, **values)
        if spec.noise < 0 or not 0 < spec.noise_decay <= 1 or not 0 <= spec.foreground_share <= 1:
            raise ValueError(f"{item!r}: need noise >= 0, 0 < decay <= 1 and 0 <= share <= 1")
        specs.append(spec)
    if not specs:
        raise ValueError("no strategy given; e.g. --strategies bald,entropy,stratified,random")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"strategies repeat: {', '.join(labels)}")
    return specs


# ---------------------------------------------------------------------------------------------
# Configuration and data


@dataclass
class BenchmarkConfig:
    """Everything that decides a benchmark run (written to ``summary.json``)."""

    strategies: list[StrategySpec]
    rounds: int = 5
    per_round: int = 8
    patch: int = 32
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    init: str = "default"  # "default", "scratch" or a checkpoint path
    steps: int = 50  # training steps per round (rounds train in epochs of 50)
    batch_size: int = 2
    learning_rate: float = 3e-4
    retrain: str = "current"  # each round fine-tunes the current version, or the "start" one
    initial: int = 4  # random patches every strategy starts with (validation ones included)
    validation: int = 2  # of which fixed validation patches
    full_steps: int | None = None  # full supervision: default rounds * steps
    test_tta: int = 1  # mirrorings when scoring (the bundled rule says 4: slower)
    mc_samples: int = 8  # MC-dropout samples of project predictions (BALD needs them)
    crop: bool = True
    scratch_model: str = "cross_modal"
    scratch_config: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    modality: str | None = None

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.per_round < 1 or self.steps < 1:
            raise ValueError("rounds, per_round and steps must be at least 1")
        if not self.seeds:
            raise ValueError("give at least one seed")
        if self.validation < 1:
            raise ValueError("need at least one validation patch (rounds validate on them)")
        if self.initial < 2 * self.validation:
            raise ValueError(
                f"initial ({self.initial}) must be at least twice validation "
                f"({self.validation}): half of the initial patches become validation patches"
            )
        if self.retrain not in ("current", "start"):
            raise ValueError(f"retrain must be 'current' or 'start', got {self.retrain!r}")
        if self.full_steps is None:  # the training the last round's model has had in all
            self.full_steps = self.steps if self.retrain == "start" else self.rounds * self.steps


@dataclass
class Case:
    """One image with its complete ground truth, as the benchmark uses it (maybe cropped)."""

    name: str
    path: Path  # what a project adds (the cropped copy, or the original)
    image: np.ndarray
    truth: np.ndarray  # bool
    regions: np.ndarray | None
    spacing: tuple[float, float, float]
    affine: np.ndarray
    modality: str
    crop: list[list[int]]  # [start, stop] in the original volume


def tissue_box(image: np.ndarray, truth: np.ndarray, margin: int = CROP_MARGIN):
    """Bounding box (start, stop) of the head and every true PVS, grown by ``margin``.

    Air in magnitude images carries Rician noise, so the image is smoothed (on a 2x coarser
    grid) before :func:`napari_pvs.intensity.tissue_mask` separates tissue from air, and only
    the largest connected piece (the head) counts.
    """
    from scipy import ndimage

    from napari_pvs.intensity import robust_range, tissue_mask

    low, high = robust_range(image)
    coarse = ndimage.uniform_filter(np.asarray(image[::2, ::2, ::2], np.float32), 3)
    mask = tissue_mask(coarse, low, high)
    labels, count = ndimage.label(mask)
    if count > 1:  # noise specks in the air survive smoothing at low SNR: keep the head
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    start = np.array(image.shape)
    stop = np.zeros(3, int)
    for points, scale in ((np.argwhere(mask), 2), (np.argwhere(truth), 1)):
        if len(points):
            start = np.minimum(start, points.min(axis=0) * scale)
            stop = np.maximum(stop, points.max(axis=0) * scale + scale)
    if np.any(stop <= start):  # nothing found: keep everything
        return [0, 0, 0], [int(s) for s in image.shape]
    start = np.maximum(start - margin, 0)
    stop = np.minimum(stop + margin, image.shape)
    return [int(v) for v in start], [int(v) for v in stop]


def load_case(
    image_path: str | Path,
    labels_path: str | Path,
    *,
    name: str,
    regions_path: str | Path | None = None,
    modality: str | None = None,
    crop: bool = True,
    write_to: Path | None = None,
) -> Case:
    """Open an image and its ground truth (NIfTI, zarr, OME-Zarr ``labels/pvs``), check them,
    crop them to the tissue box and (for pool volumes, ``write_to``) write the crop."""
    from napari_pvs import io

    volume = io.open_volume(image_path, modality=modality)
    labels = io.open_labels(labels_path, "pvs" if _has_label(labels_path, "pvs") else None)
    if labels.shape != volume.shape:
        raise ValueError(
            f"{labels_path} has shape {labels.shape} but {image_path} has {volume.shape}; "
            "give the ground truth of that image, voxel for voxel"
        )
    truth = np.asarray(labels.data)
    values = np.unique(truth)
    if not set(values.tolist()) <= {0, 1}:
        raise ValueError(
            f"{labels_path} holds values {values.tolist()[:8]}; the ground truth must be "
            "complete 0/1 PVS labels (255 = unlabelled is not allowed here)"
        )
    image = np.asarray(volume.data, dtype=np.float32)
    regions = None
    if regions_path is not None:
        regions_volume = io.open_labels(
            regions_path, "regions" if _has_label(regions_path, "regions") else None
        )
        if regions_volume.shape != volume.shape:
            raise ValueError(
                f"{regions_path} has shape {regions_volume.shape} but {image_path} has "
                f"{volume.shape}; give the region map of that image"
            )
        regions = np.asarray(regions_volume.data).astype(np.int64)
    truth = truth.astype(bool)
    start, stop = (
        tissue_box(image, truth) if crop else ([0, 0, 0], [int(s) for s in volume.shape])
    )
    box = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    affine = np.asarray(volume.affine, np.float64).copy()
    affine[:3, 3] = affine[:3, :3] @ np.asarray(start, np.float64) + affine[:3, 3]
    path = Path(image_path)
    cropped = [list(start), list(stop)] != [[0, 0, 0], list(volume.shape)]
    image, truth = image[box], truth[box]
    if write_to is not None and cropped:
        path = io.save_ome_zarr(
            write_to,
            image,
            volume.spacing,
            labels={"pvs": truth.astype(np.uint8)},
            modality=volume.modality,
            levels=1,
            affine=affine,
        )
    return Case(
        name=name,
        path=path,
        image=np.ascontiguousarray(image),
        truth=np.ascontiguousarray(truth),
        regions=None if regions is None else np.ascontiguousarray(regions[box]),
        spacing=tuple(float(s) for s in volume.spacing),  # type: ignore[arg-type]
        affine=affine,
        modality=volume.modality,
        crop=[list(start), list(stop)],
    )


def _has_label(path: str | Path, name: str) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "labels" / name).is_dir()


# ---------------------------------------------------------------------------------------------
# Scoring


def score(model, cases: Sequence[Case], tta: int = 1, device: str = "cpu") -> dict[str, Any]:
    """Segment every test case with the product's rule and average the metrics over cases."""
    import zarr

    from napari_pvs.inference import Predictor
    from napari_pvs.io import Volume
    from napari_pvs.metrics import evaluate

    per_case = []
    with tempfile.TemporaryDirectory(prefix="napari-pvs-score-") as tmp:
        for index, case in enumerate(cases):
            out = Path(tmp) / f"{index}.zarr"
            volume = Volume(case.image, case.spacing, case.affine, modality=case.modality)
            Predictor(model, modality=case.modality, tta=tta, device=device).predict(volume, out)
            segmentation = np.asarray(zarr.open_group(str(out), mode="r")["segmentation"][:])
            result = evaluate(segmentation, case.truth, case.regions, case.spacing)
            regions = result.get("regions", {})
            per_case.append(
                {
                    "dice": result["dice"],
                    "cluster_f1": result["cluster"]["f1"],
                    "cluster_precision": result["cluster"]["precision"],
                    "cluster_recall": result["cluster"]["recall"],
                    "dice_white_matter": regions.get("white_matter", {}).get("dice"),
                    "dice_basal_ganglia": regions.get("basal_ganglia", {}).get("dice"),
                    "predicted_pvs": result["count"]["pred"],
                    "true_pvs": result["count"]["gt"],
                }
            )
    merged: dict[str, Any] = {}
    for key in per_case[0]:
        values = [c[key] for c in per_case if c[key] is not None]
        if not values:
            merged[key] = None
        elif key in ("predicted_pvs", "true_pvs"):
            merged[key] = int(sum(values))
        else:
            merged[key] = float(np.mean(values))
    return merged


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class BenchmarkResult:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    csv_path: Path
    png_path: Path
    summary_path: Path
    lines: list[str]


class _Runner:
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

    def pick(self, project, spec: StrategySpec, n: int, seed: int, round_index: int):
        """The ``n`` patches a reviewer would open next: each volume ranked on its own, then
        taken in turn (volume order drawn by seed). Returns (patch records, note)."""
        rank_seed = seed * 1000 + round_index
        note = ""
        queues = []
        for vid in range(1, len(self.pool) + 1):
            try:
                records = self._rank(project, spec, vid, n, rank_seed, round_index)
            except ValueError as exc:  # fg-random with nothing predicted: as a reviewer would
                if spec.name != "fg-random" or "predicted PVS" not in str(exc):
                    raise
                records = self._rank(project, StrategySpec("random"), vid, n, rank_seed, 0)
                note = f"no predicted PVS in pool-{vid}: random there"
            queues.append(sorted(records, key=lambda r: r.rank))
        order = np.random.default_rng([seed, round_index, 77]).permutation(len(queues))
        picked = []
        for position in range(max((len(q) for q in queues), default=0)):
            for index in order:
                if position < len(queues[index]):
                    picked.append(queues[index][position])
        return picked[:n], note

    def _rank(self, project, spec: StrategySpec, vid: int, n: int, seed: int, round_index: int):
        """One volume's queue: ``Project.rank``, or its own steps for options it lacks."""
        from napari_pvs.project import UNREVIEWED
        from napari_pvs.ranking import rank_patches

        if spec.product_defaults:
            return project.rank(vid, strategy=spec.name, n=n, patch=self.config.patch, seed=seed)
        ranked = rank_patches(
            project.predict(vid),
            n=n,
            patch=self.config.patch,
            strategy=spec.name,
            exclude=project.labels(vid)["labels"],
            unlabelled_value=UNREVIEWED,
            exclude_boxes=project.excluded_boxes(vid),
            seed=seed,
            image=project.open_volume(vid),
            noise=spec.noise,
            noise_round=max(round_index - 1, 0),
            noise_decay=spec.noise_decay,
            foreground_share=spec.foreground_share,
        )
        return project.record_queue(vid, ranked, model_version=project.current_version().version)

    def accept(self, project, records) -> None:
        for record in records:
            case = self.pool[record.volume_id - 1]
            box = tuple(slice(a, b) for a, b in zip(record.start, record.stop, strict=True))
            project.accept(
                record.volume_id,
                record.start,
                record.stop,
                case.truth[box].astype(np.uint8),
                annotator=ANNOTATOR,
                patch_id=record.id,
            )

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
            records, _ = self.pick(project, StrategySpec("random"), c.initial, seed, 0)
            self.accept(project, records)
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
                records, note = self.pick(project, spec, c.per_round, seed, round_index)
                ranked = time.perf_counter()
                self.accept(project, records)
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
        from napari_pvs.ranking import PatchGrid

        c = self.config
        folder = self.out / "projects" / f"full-seed{seed}"
        shutil.copytree(start, folder)
        self.tick(f"seed {seed}: full supervision")
        with Project.open(folder) as project:
            started = time.perf_counter()
            cpu_started = time.process_time()
            for vid, case in enumerate(self.pool, start=1):
                grid = PatchGrid(case.truth.shape, c.patch, c.patch)
                for index in np.ndindex(*grid.n):
                    lo, hi = grid.box(index)
                    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
                    project.accept(
                        vid, lo, hi, case.truth[box].astype(np.uint8), annotator=ANNOTATOR
                    )
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


# ---------------------------------------------------------------------------------------------
# Summary, CSV, figure


def summarise(rows: Sequence[dict[str, Any]], config: BenchmarkConfig) -> dict[str, Any]:
    """N to 95% and gap closed per strategy (seed-mean curves), plus costs, as a dict."""
    full = [r["dice"] for r in rows if r["strategy"] == FULL]
    full_dice = float(np.mean(full))
    target = TARGET_SHARE * full_dice
    strategies: dict[str, Any] = {}
    first = config.strategies[0].label
    start_dice = float(np.mean([r["dice"] for r in rows if r["strategy"] == first
                                and r["round"] == 0]))  # fmt: skip
    for spec in config.strategies:
        own = [r for r in rows if r["strategy"] == spec.label]
        rounds = sorted({r["round"] for r in own})
        curve = []
        for round_index in rounds:
            at = [r for r in own if r["round"] == round_index]
            curve.append(
                {
                    "round": round_index,
                    "labelled_patches": float(np.mean([r["labelled_patches"] for r in at])),
                    "dice": float(np.mean([r["dice"] for r in at])),
                    "dice_sd": float(np.std([r["dice"] for r in at])),
                    "cluster_f1": float(np.mean([r["cluster_f1"] for r in at])),
                    "seeds": len(at),
                }
            )
        reached = next((p["labelled_patches"] for p in curve if p["dice"] >= target), None)
        gap = full_dice - start_dice
        closed = (
            float(np.mean([(p["dice"] - start_dice) / gap for p in curve[1:]]))
            if gap > 0 and len(curve) > 1
            else None
        )
        per_seed_n = {}
        for seed in config.seeds:
            seed_rows = sorted((r for r in own if r["seed"] == seed), key=lambda r: r["round"])
            per_seed_n[str(seed)] = next(
                (r["labelled_patches"] for r in seed_rows if r["dice"] >= target), None
            )
        strategies[spec.label] = {
            "patches_to_95": None if reached is None else round(reached),
            "gap_closed": closed,
            "final_dice": curve[-1]["dice"],
            "final_dice_sd": curve[-1]["dice_sd"],
            "final_cluster_f1": curve[-1]["cluster_f1"],
            "patches_to_95_per_seed": per_seed_n,
            "curve": curve,
        }
    round_rows = [r for r in rows if r["strategy"] != FULL and r["round"] > 0]

    def mean_of(key: str, among) -> float | None:
        values = [r[key] for r in among if r.get(key) is not None]
        return float(np.mean(values)) if values else None

    costs: dict[str, float | None] = {
        key: mean_of(key, round_rows)
        for key in ("seconds_rank", "seconds_accept", "seconds_round", "seconds_score")
    }
    cpu, load = mean_of("cpu_seconds", round_rows), mean_of("load", round_rows)
    measured = [v for v in costs.values() if v is not None]
    costs["seconds_per_round"] = sum(measured) if measured else None
    full_rows = [r for r in rows if r["strategy"] == FULL]
    full_costs = [mean_of(k, full_rows) for k in ("seconds_accept", "seconds_round",
                                                  "seconds_score")]  # fmt: skip
    costs["seconds_full_supervision"] = (
        sum(v for v in full_costs if v is not None) if any(full_costs) else None
    )
    # This process's CPU seconds per round and the machine's 1-minute load average: on a shared
    # machine the wall time above is longer than the work.
    costs["cpu_seconds_per_round"], costs["load_average"] = cpu, load
    return {
        "full_supervision_dice": full_dice,
        "full_supervision_dice_per_seed": full,
        "start_dice": start_dice,
        "target_dice": target,
        "strategies": strategies,
        "costs": costs,
    }


def estimate_minutes(
    costs: dict[str, Any], strategies: int, seeds: int, rounds: int, full_scale: float = 1.0
) -> float:
    """Wall time of a run of that size from measured costs: per round, per start project and
    per full-supervision run (scaled by ``full_scale``, e.g. the ratio of its steps)."""
    per_round = costs["seconds_per_round"] or 0.0
    full = (costs["seconds_full_supervision"] or 0.0) * full_scale
    start = costs.get("seconds_start") or 0.0
    return (strategies * seeds * rounds * per_round + seeds * (full + start)) / 60


def final_lines(summary: dict[str, Any]) -> list[str]:
    """The benchmark's last lines: per strategy, N to 95% then the gap closed."""
    lines = []
    for label, result in summary["strategies"].items():
        n = result["patches_to_95"]
        lines.append(f"{label}: {'never' if n is None else n} patches to 95%")
        gap = result["gap_closed"]
        lines.append(f"{label}: gap closed {'n/a' if gap is None else f'{gap:.3f}'}")
    return lines


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    from napari_pvs import atomic

    with atomic.atomic_output(path, overwrite=True) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CSV_FIELDS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in CSV_FIELDS})
    return path


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.5f}"
    return value


def plot_learning_curve(summary: dict[str, Any], rows, path: Path, title: str = "") -> Path:
    """Dice and cluster F1 against labelled patches: seed mean, min-max band, references."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from napari_pvs import atomic

    figure = Figure(figsize=(11, 4.4), dpi=110)
    axes = figure.subplots(1, 2)
    for ax, key, name in ((axes[0], "dice", "voxel Dice"), (axes[1], "cluster_f1", "cluster F1")):
        for label in summary["strategies"]:
            own = [r for r in rows if r["strategy"] == label]
            rounds = sorted({r["round"] for r in own})
            x = [np.mean([r["labelled_patches"] for r in own if r["round"] == k]) for k in rounds]
            values = [[r[key] for r in own if r["round"] == k] for k in rounds]
            mean = [np.mean(v) for v in values]
            ax.plot(x, mean, marker="o", ms=3, label=label)
            ax.fill_between(x, [min(v) for v in values], [max(v) for v in values], alpha=0.15)
        full = [r[key] for r in rows if r["strategy"] == FULL]
        if full:
            ax.axhline(np.mean(full), color="black", ls="--", lw=1, label="full supervision")
        if key == "dice":
            ax.axhline(summary["target_dice"], color="grey", ls=":", lw=1, label="95% of full")
        ax.set_xlabel("labelled patches")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    with atomic.atomic_output(path, overwrite=True) as tmp:
        figure.savefig(tmp, format="png")
    return path


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


def format_table(summary: dict[str, Any]) -> str:
    """A readable table of the summary (printed before the final lines)."""
    lines = [
        f"start Dice {summary['start_dice']:.3f}; full supervision Dice "
        f"{summary['full_supervision_dice']:.3f} (target {summary['target_dice']:.3f})",
        f"{'strategy':<34}{'N to 95%':>9}{'gap closed':>12}{'final Dice':>16}{'final F1':>10}",
    ]
    for label, r in summary["strategies"].items():
        n = "never" if r["patches_to_95"] is None else str(r["patches_to_95"])
        gap = "n/a" if r["gap_closed"] is None else f"{r['gap_closed']:.3f}"
        dice = f"{r['final_dice']:.3f} ± {r['final_dice_sd']:.3f}"
        lines.append(f"{label:<34}{n:>9}{gap:>12}{dice:>16}{r['final_cluster_f1']:>10.3f}")
    costs = summary["costs"]
    if costs.get("seconds_per_round") is not None:
        lines.append(
            "per round (mean): rank {seconds_rank:.1f} s, accept {seconds_accept:.1f} s, round "
            "(train + re-predict) {seconds_round:.1f} s, score {seconds_score:.1f} s".format(
                **costs
            )
        )
    if costs.get("cpu_seconds_per_round") is not None:
        lines.append(
            f"this process used {costs['cpu_seconds_per_round']:.0f} CPU seconds per round; "
            f"machine load average {costs['load_average']:.1f}"
        )
    return "\n".join(lines)


__all__ = [
    "BenchmarkConfig",
    "BenchmarkResult",
    "Case",
    "StrategySpec",
    "estimate_minutes",
    "final_lines",
    "format_table",
    "load_case",
    "parse_strategies",
    "run_benchmark",
    "score",
    "summarise",
    "tissue_box",
]

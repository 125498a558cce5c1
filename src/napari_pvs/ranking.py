"""Rank 3D patches for annotation from a prediction store's uncertainty maps.

Patches are scored by block reduction, streamed slab by slab from zarr (memory is one slab of
``stride`` voxels, never the volume). Strategies:

* ``entropy``: mean predictive entropy of the patch (from ``entropy``, or from
  ``probability`` for a deterministic prediction);
* ``bald``: mean mutual information (needs MC dropout, TTA or an ensemble at predict time);
* ``stratified``: class-stratified predictive entropy: patches with and without predicted PVS
  are ranked by entropy separately and picked alternately (``foreground_share`` of the picks
  from the PVS stratum, default one half), so both kinds appear;
* ``clasp``: nnActive's ClaSP PE (Luth et al. 2026, arXiv 2601.13677): ``stratified`` with
  two thirds of the picks from the PVS stratum and power noise on the log-scores that decays
  over rounds (``noise`` 1 and ``noise_decay`` 0.5 unless given; pass the round as
  ``noise_round``);
* ``diverse``: entropy with a diversity term: greedy k-center in feature space (see
  :func:`patch_features`) over the ``DIVERSE_POOL_FACTOR`` x ``n`` most uncertain spaced-out
  candidates, starting from the most uncertain;
* ``fg-random``: random among patches with predicted PVS, each drawn with probability
  proportional to its predicted PVS voxels, i.e. the grid patch holding a uniformly drawn
  predicted-PVS voxel (nnActive's strong 3D baseline, snapped to the patch grid; labelled
  foreground never counts because labelled patches are excluded anyway);
* ``random``: random among all patches;
* ``default``: an alias for :data:`DEFAULT_STRATEGY`, the queue the product ships.

:data:`STRATEGIES` is the one registry of names: the CLI, the project settings, the widgets
and the benchmark read it, and :func:`resolve_strategy` refuses any other name with the list.

Chosen patches never overlap and keep their centres at least ``min_distance`` voxels apart
(greedy non-maximum suppression), so the queue does not crowd one spot. Already-labelled
patches are excluded: ``exclude`` is a label array or store of the volume's shape in which
``unlabelled_value`` (default 255) marks voxels nobody has labelled and any other value
(0 = background, 1 = PVS, ...) marks a labelled voxel; a patch with any labelled voxel is
skipped. For stores where 0 means "not annotated", pass ``unlabelled_value=0``.
``exclude_boxes`` skips patches overlapping given boxes (e.g. patches already in the queue).
Given the ``image``, patches that are mostly air (less than ``min_tissue`` of their voxels are
tissue, see :func:`napari_pvs.intensity.tissue_mask`) are skipped: there is nothing to
annotate there, however uncertain or random.

Decaying noise on the scores (``noise``, nnActive's ClaSP PE): with ``noise`` T > 0 the score
strategies rank by ``log(score) + T' * Gumbel`` with T' = T * ``noise_decay`` ** ``noise_round``,
which draws patches with probability proportional to ``score ** (1 / T')`` (power sampling).
Early rounds, whose model is least trustworthy, explore; later rounds follow the scores. The
noise is seeded (by ``seed`` and ``noise_round``) and off by default.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from napari_pvs import atomic

#: Every queue strategy by name (the one registry; ``default`` is an alias, see below).
STRATEGIES = ("default", "entropy", "bald", "stratified", "clasp", "diverse", "fg-random", "random")
#: What ``default`` stands for: the product's queue. ``entropy``: on the README's shifted-site
#: data its first 8 patches hold 3.0x random's share of the start model's wrong voxels,
#: 1.3x fg-random's and 1.8x ``stratified``'s (``benchmarks/bench_error_yield.py``); in the
#: label-limited benchmark it learns as fast as fg-random, not faster (README).
DEFAULT_STRATEGY = "entropy"
DEFAULT_PATCH = 32
#: Default minimum centre distance between chosen patches, in patch sizes.
DEFAULT_MIN_DISTANCE = 1.5
#: Default share of a patch's voxels that must be tissue (with an image given).
DEFAULT_MIN_TISSUE = 0.5
#: Default factor by which the score noise shrinks each round (see ``noise``).
DEFAULT_NOISE_DECAY = 0.5
#: Strategies ranked by a score (the ones ``noise`` perturbs).
SCORE_STRATEGIES = ("entropy", "bald", "stratified", "clasp", "diverse")
#: ClaSP PE's defaults: share of picks with predicted PVS, and round-0 noise temperature.
CLASP_FOREGROUND_SHARE = 2 / 3
CLASP_NOISE = 1.0
#: ``diverse`` picks by k-center among this many times ``n`` most uncertain candidates.
DIVERSE_POOL_FACTOR = 4


def resolve_strategy(name: str) -> str:
    """The concrete strategy ``name`` stands for (``default`` -> :data:`DEFAULT_STRATEGY`);
    an unknown name is refused with the list."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return DEFAULT_STRATEGY if name == "default" else name


@dataclass
class RankedPatch:
    """One row of the ranking table (voxel coordinates in the volume's own axis order)."""

    rank: int
    score: float
    bbox_start: list[int]
    bbox_stop: list[int]
    centre: list[float]
    centre_mm: list[float]
    predicted_pvs: int
    predicted_pvs_voxels: int
    strategy: str


def _slab_block_sums(array, stride: int, transform=None) -> np.ndarray:
    """Sums over ``stride``-sized blocks, read one z-slab at a time (lazy over zarr).

    Slabs are a common multiple of ``stride`` and the array's z chunk when that stays small,
    so every stored chunk is decoded once.
    """
    shape = tuple(int(s) for s in array.shape)
    grid = [math.ceil(s / stride) for s in shape]
    out = np.empty(grid, dtype=np.float64)
    chunks = getattr(array, "chunksize", None) or getattr(array, "chunks", None)  # dask | zarr
    chunk_z = int(chunks[0]) if chunks and chunks[0] else stride
    common = math.lcm(stride, chunk_z)
    thickness = common if common <= 4 * max(stride, chunk_z) else stride
    starts_y = np.arange(0, shape[1], stride)
    starts_x = np.arange(0, shape[2], stride)
    for z0 in range(0, shape[0], thickness):
        slab = np.asarray(array[z0 : min(z0 + thickness, shape[0])])
        slab = transform(slab) if transform is not None else slab
        for offset in range(0, slab.shape[0], stride):
            # summing over the leading axis is fast; reduceat along it is not
            plane = slab[offset : offset + stride].sum(axis=0, dtype=np.float64)
            plane = np.add.reduceat(plane, starts_y, axis=0)
            out[(z0 + offset) // stride] = np.add.reduceat(plane, starts_x, axis=1)
    return out


def _patch_sums(blocks: np.ndarray, per_patch: int, n_patches: Sequence[int]) -> np.ndarray:
    """Sum ``per_patch`` consecutive blocks along every axis (clipped at the far edge)."""
    out = blocks
    for axis, n in enumerate(n_patches):
        csum = np.concatenate(
            [np.zeros_like(out.take([0], axis=axis)), np.cumsum(out, axis=axis)], axis=axis
        )
        lo = np.arange(n)
        hi = np.minimum(lo + per_patch, out.shape[axis])
        out = csum.take(hi, axis=axis) - csum.take(lo, axis=axis)
    return out


class PatchGrid:
    """Candidate patches: starts every ``stride`` voxels, the last one reaching the far edge."""

    def __init__(self, shape: Sequence[int], patch: int, stride: int) -> None:
        if patch < 1 or stride < 1:
            raise ValueError(f"patch and stride must be positive, got {patch} and {stride}")
        if patch % stride:
            raise ValueError(
                f"patch ({patch}) must be a multiple of stride ({stride}), e.g. stride={patch}"
            )
        self.shape = tuple(int(s) for s in shape)
        self.patch = patch
        self.stride = stride
        self.per_patch = patch // stride
        self.n = [max(1, math.ceil(max(s - patch, 0) / stride) + 1) for s in self.shape]

    def reduce(self, array, transform=None) -> np.ndarray:
        """Per-patch sums of ``array`` (or of ``transform(slab)``)."""
        blocks = _slab_block_sums(array, self.stride, transform)
        return _patch_sums(blocks, self.per_patch, self.n)

    def voxels(self) -> np.ndarray:
        sizes = [
            np.minimum(np.arange(n) * self.stride + self.patch, s) - np.arange(n) * self.stride
            for n, s in zip(self.n, self.shape, strict=True)
        ]
        return sizes[0][:, None, None] * sizes[1][None, :, None] * sizes[2][None, None, :]

    def box(self, index: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        start = np.asarray(index) * self.stride
        stop = np.minimum(start + self.patch, self.shape)
        return start, stop


def _overlaps(start, stop, box_start, box_stop) -> bool:
    return bool(np.all(start < box_stop) and np.all(box_start < stop))


def _select(
    order: Sequence[tuple[int, int, int]] | Sequence[Sequence[tuple[int, int, int]]],
    grid: PatchGrid,
    n: int,
    min_distance: float,
    interleave: bool = False,
    first_share: float = 0.5,
) -> list[tuple[int, int, int]]:
    """Greedy non-maximum suppression over candidates in priority order.

    With ``interleave`` ``order`` is a list of per-stratum orders taken from in turn; with two
    strata, ``first_share`` of the turns go to the first (0.5: alternately, first one first).
    """
    streams = [list(o) for o in order] if interleave else [list(order)]
    positions = [0] * len(streams)
    chosen: list[tuple[int, int, int]] = []
    boxes: list[tuple[np.ndarray, np.ndarray]] = []
    centres: list[np.ndarray] = []
    turn = 0
    while len(chosen) < n and any(p < len(s) for p, s in zip(positions, streams, strict=True)):
        stream = _stream_for_turn(turn, len(streams), first_share)
        turn += 1
        while positions[stream] < len(streams[stream]):
            index = streams[stream][positions[stream]]
            positions[stream] += 1
            start, stop = grid.box(index)
            centre = (start + stop) / 2
            if any(_overlaps(start, stop, a, b) for a, b in boxes):
                continue
            if centres and np.min(np.linalg.norm(np.asarray(centres) - centre, axis=1)) < (
                min_distance
            ):
                continue
            chosen.append(tuple(int(i) for i in index))
            boxes.append((start, stop))
            centres.append(centre)
            break
    return chosen


def _stream_for_turn(turn: int, n_streams: int, first_share: float) -> int:
    """Which stratum picks at ``turn``: round robin, or for two strata the first one whenever
    its share of the turns so far would otherwise fall below ``first_share``."""
    if n_streams != 2:
        return turn % n_streams
    before = math.ceil(turn * first_share - 1e-9)
    after = math.ceil((turn + 1) * first_share - 1e-9)
    return 0 if after > before else 1


def scheduled_noise(noise: float, noise_round: int, decay: float = DEFAULT_NOISE_DECAY) -> float:
    """The score-noise temperature of round ``noise_round``: ``noise * decay ** noise_round``."""
    if noise < 0 or not 0 < decay <= 1 or noise_round < 0:
        raise ValueError(
            f"noise must be >= 0, noise_decay in (0, 1] and noise_round >= 0, got {noise}, "
            f"{decay} and {noise_round}"
        )
    return float(noise) * float(decay) ** int(noise_round)


def rank_patches(
    prediction,
    n: int = 20,
    patch: int = DEFAULT_PATCH,
    stride: int | None = None,
    strategy: str = "entropy",
    exclude=None,
    unlabelled_value: int = 255,
    exclude_boxes: Sequence[tuple[Sequence[int], Sequence[int]]] = (),
    min_distance: float | None = None,
    seed: int = 0,
    image=None,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    noise: float | None = None,
    noise_round: int = 0,
    noise_decay: float = DEFAULT_NOISE_DECAY,
    foreground_share: float | None = None,
) -> list[RankedPatch]:
    """Rank patches of a prediction store (path or zarr group) for annotation.

    Returns at most ``n`` rows, fewer when exclusion, spacing and the tissue filter leave
    fewer candidates. ``min_distance`` defaults to 1.5 x ``patch`` (no face or edge
    neighbours). ``image`` (the predicted volume: array, path or ``Volume``) turns on the
    tissue filter. ``noise``, ``noise_round`` and ``noise_decay`` set the decaying score noise
    of the module notes (score strategies only; the table keeps the noiseless scores; None:
    1 for ``clasp``, else 0); ``foreground_share`` is the share of ``stratified`` and
    ``clasp`` picks with predicted PVS (None: 2/3 for ``clasp``, else 1/2). Rows name the
    concrete strategy (``default`` resolved).
    """
    from napari_pvs.io import ATTRS_KEY, open_prediction  # zarr: not at `--help` time

    strategy = resolve_strategy(strategy)
    clasp = strategy == "clasp"
    if noise is None:
        noise = CLASP_NOISE if clasp else 0.0
    if foreground_share is None:
        foreground_share = CLASP_FOREGROUND_SHARE if clasp else 0.5
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0 <= foreground_share <= 1:
        raise ValueError(f"foreground_share must be between 0 and 1, got {foreground_share}")
    temperature = scheduled_noise(noise, noise_round, noise_decay)
    group = open_prediction(prediction) if isinstance(prediction, str | Path) else prediction
    probability = group["probability"]
    shape = tuple(int(s) for s in probability.shape)
    grid = PatchGrid(shape, int(patch), int(stride or patch))
    min_distance = DEFAULT_MIN_DISTANCE * patch if min_distance is None else float(min_distance)

    foreground = grid.reduce(group["segmentation"])
    eligible = _eligible_patches(
        grid, shape, exclude, unlabelled_value, image, min_tissue, exclude_boxes
    )
    rng = np.random.default_rng(seed)
    scores = _patch_scores(strategy, group, grid, foreground, rng)
    if strategy == "fg-random":
        eligible &= foreground > 0
        if not eligible.any():
            raise ValueError(
                "no eligible patch contains predicted PVS, so fg-random has nothing to draw "
                "from; use --strategy entropy or random"
            )
    keys = scores
    if temperature > 0 and strategy in SCORE_STRATEGIES:
        # Gumbel-perturbed log scores: the top-k is a draw proportional to score ** (1 / T).
        noise_rng = np.random.default_rng([seed, int(noise_round), 0x5EED])
        keys = np.log(np.maximum(scores, 1e-12)) + temperature * noise_rng.gumbel(size=grid.n)
    chosen = _choose_patches(
        strategy, keys, eligible, foreground, scores, group, grid, n, min_distance,
        foreground_share,
    )  # fmt: skip

    affine = np.asarray(
        dict(group.attrs).get(ATTRS_KEY, {}).get("affine", np.eye(4)), dtype=np.float64
    )
    return [
        _row(rank, index, grid, scores, group["segmentation"], affine, strategy)
        for rank, index in enumerate(chosen, start=1)
    ]


def _eligible_patches(
    grid: PatchGrid, shape, exclude, unlabelled_value: int, image, min_tissue: float,
    exclude_boxes,
) -> np.ndarray:  # fmt: skip
    """Which grid patches may be queued: not already labelled, enough tissue, outside the
    boxes to exclude."""
    eligible = np.ones(grid.n, dtype=bool)
    if exclude is not None:
        labels = _open_array(exclude)
        if tuple(labels.shape) != shape:
            raise ValueError(
                f"exclusion labels have shape {tuple(labels.shape)} but the prediction has "
                f"{shape}; pass the label store of the same volume"
            )
        labelled = grid.reduce(labels, lambda slab: slab != unlabelled_value)
        eligible &= labelled == 0
    if image is not None:
        eligible &= _tissue_fraction(image, shape, grid) >= min_tissue
        if not eligible.any():
            raise ValueError(
                f"no eligible patch is at least {min_tissue:.0%} tissue; check that the image "
                "is the one that was predicted, or lower min_tissue (CLI: --min-tissue)"
            )
    for box_start, box_stop in exclude_boxes:
        for index in zip(*np.nonzero(eligible), strict=True):
            start, stop = grid.box(index)
            if _overlaps(start, stop, np.asarray(box_start), np.asarray(box_stop)):
                eligible[index] = False
    return eligible


def _patch_scores(
    strategy: str, group, grid: PatchGrid, foreground: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Each grid patch's score under ``strategy`` (mean entropy, mean mutual information, a
    random key, or for ``fg-random`` a Gumbel key in proportion to its predicted PVS)."""
    voxels = grid.voxels()
    if strategy in ("entropy", "stratified", "clasp", "diverse"):
        if "entropy" in group:
            return grid.reduce(group["entropy"]) / voxels
        from napari_pvs.uncertainty import binary_entropy  # torch: only when needed

        return grid.reduce(group["probability"], binary_entropy) / voxels
    if strategy == "bald":
        if "mutual_information" not in group:
            raise ValueError(
                "this prediction has no mutual_information (it was made with a single "
                "deterministic pass); rerun 'napari-pvs predict' with --mc 8 or --tta, or use "
                "--strategy entropy"
            )
        return grid.reduce(group["mutual_information"]) / voxels
    scores = rng.random(grid.n)
    if strategy == "fg-random":
        # Gumbel top-k on log(count): a draw without replacement in proportion to the
        # patch's predicted PVS voxels (the patch of a uniformly drawn PVS voxel)
        scores = np.log(np.maximum(foreground, 1e-12)) + rng.gumbel(size=grid.n)
    return scores


def _choose_patches(
    strategy: str, keys: np.ndarray, eligible: np.ndarray, foreground: np.ndarray,
    scores: np.ndarray, group, grid: PatchGrid, n: int, min_distance: float,
    foreground_share: float,
) -> list[tuple[int, ...]]:  # fmt: skip
    """The queued grid indices: best keys first, spaced apart; stratified by predicted PVS
    for ``stratified``/``clasp``; k-center over patch features for ``diverse``."""

    def by_score(mask: np.ndarray) -> list[tuple[int, ...]]:
        idx = np.argwhere(mask)
        order = np.argsort(-keys[mask], kind="stable")
        return [tuple(int(v) for v in idx[i]) for i in order]

    if strategy in ("stratified", "clasp"):
        strata = [by_score(eligible & (foreground > 0)), by_score(eligible & (foreground == 0))]
        return _select(
            strata, grid, n, min_distance, interleave=True, first_share=foreground_share
        )
    if strategy == "diverse":
        features = patch_features(group, grid, foreground, scores)
        # the spaced-out top candidates (any subset keeps the spacing rules), then k-center
        pool = _select(by_score(eligible), grid, DIVERSE_POOL_FACTOR * n, min_distance)
        return _select_k_center(pool, features, n)
    return _select(by_score(eligible), grid, n, min_distance)


def patch_features(
    group, grid: PatchGrid, foreground: np.ndarray, entropy: np.ndarray
) -> np.ndarray:
    """Per-patch feature vectors for ``diverse``, shape ``(*grid.n, 6)``, each column scaled to
    unit standard deviation over the grid.

    Cheap statistics of the maps the ranking already reads, no model pass: mean entropy, mean
    probability, standard deviation of the probability, share of predicted-PVS voxels, and
    the patch centre's position along the first and last axes (normalised), so two patches
    that look alike but lie far apart still count as different.
    """
    voxels = grid.voxels()
    probability = group["probability"]
    mean = grid.reduce(probability) / voxels
    square = grid.reduce(probability, lambda slab: np.square(slab, dtype=np.float64)) / voxels
    spread = np.sqrt(np.maximum(square - mean * mean, 0.0))
    position = np.indices(grid.n, dtype=np.float64)
    columns = [
        entropy,
        mean,
        spread,
        foreground / voxels,
        position[0] / max(grid.n[0] - 1, 1),
        position[-1] / max(grid.n[-1] - 1, 1),
    ]
    stacked = np.stack(columns, axis=-1)
    scale = stacked.reshape(-1, stacked.shape[-1]).std(axis=0)
    return stacked / np.where(scale > 0, scale, 1.0)


def _select_k_center(
    pool: Sequence[tuple[int, int, int]], features: np.ndarray, n: int
) -> list[tuple[int, int, int]]:
    """Greedy k-center over ``pool`` (most uncertain first): start from the top candidate,
    then take the one farthest in feature space from every patch chosen so far."""
    if not pool:
        return []
    vectors = np.asarray([features[index] for index in pool])
    nearest = np.full(len(pool), np.inf)
    picks = [0]
    while len(picks) < min(n, len(pool)):
        nearest = np.minimum(nearest, np.linalg.norm(vectors - vectors[picks[-1]], axis=1))
        nearest[picks] = -np.inf
        picks.append(int(np.argmax(nearest)))
    return [pool[i] for i in picks]


def _row(rank, index, grid, scores, segmentation, affine, strategy) -> RankedPatch:
    from napari_pvs.metrics import label_clusters

    start, stop = grid.box(index)
    mask = np.asarray(segmentation[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))])
    _, count = label_clusters(mask > 0)
    centre = (start + stop - 1) / 2
    centre_mm = affine[:3, :3] @ centre + affine[:3, 3]
    return RankedPatch(
        rank=rank,
        score=round(float(scores[index]), 6),
        bbox_start=[int(v) for v in start],
        bbox_stop=[int(v) for v in stop],
        centre=[float(v) for v in centre],
        centre_mm=[round(float(v), 3) for v in centre_mm],
        predicted_pvs=int(count),
        predicted_pvs_voxels=int(mask.astype(bool).sum()),
        strategy=strategy,
    )


def _tissue_fraction(image, shape: tuple[int, ...], grid: PatchGrid) -> np.ndarray:
    """Share of tissue voxels per candidate patch, streamed from the (lazy) image."""
    from napari_pvs.intensity import robust_range, tissue_mask

    data = _open_array(image)
    if getattr(data, "ndim", None) is None:  # a Volume: its lazy array
        data = data.data
    if tuple(data.shape) != shape:
        raise ValueError(
            f"the image has shape {tuple(data.shape)} but the prediction has {shape}; pass the "
            "volume that was predicted"
        )
    low, high = robust_range(data)
    return grid.reduce(data, lambda slab: tissue_mask(slab, low, high)) / grid.voxels()


def _open_array(source):
    """A lazy array from a path (zarr array, OME-Zarr image or labels, NIfTI), else as given."""
    if isinstance(source, str | Path):
        from napari_pvs.io import open_volume

        return open_volume(source, check_finite=False).data
    return source


def ranking_paths(prediction: str | Path, strategy: str) -> tuple[Path, Path]:
    """Where :func:`save_ranking` writes: ``<store>.ranking-<strategy>.csv`` and ``.json``."""
    prediction = Path(prediction)
    stem = (
        prediction.name[: -len(".zarr")] if prediction.name.endswith(".zarr") else prediction.name
    )
    base = f"{stem}.ranking-{strategy}"
    return prediction.parent / f"{base}.csv", prediction.parent / f"{base}.json"


def save_ranking(
    table: Sequence[RankedPatch],
    prediction: str | Path,
    *,
    strategy: str | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write the table as CSV and JSON beside the prediction store; return both paths.

    Voxel columns follow the array's axis order (``_0`` is the first axis); ``x_mm``, ``y_mm``,
    ``z_mm`` are world (scanner) coordinates of the centre through the store's affine. Files
    are ``<store>.ranking-<strategy>.csv`` / ``.json`` (``<store>`` without ``.zarr``;
    ``strategy`` defaults to the table's). Both are written atomically; existing ones are
    replaced only with ``overwrite`` (checked for both before either is written).
    """
    prediction = Path(prediction)
    strategy = strategy or (table[0].strategy if table else "empty")
    csv_path, json_path = ranking_paths(prediction, strategy)
    for path in (csv_path, json_path):
        atomic.check_output(path, inputs=[prediction], overwrite=overwrite)
    rows = [asdict(row) for row in table]
    text = json.dumps({"prediction": str(prediction), "patches": rows}, indent=1)
    atomic.write_text(json_path, text, overwrite=overwrite)
    handle = io.StringIO(newline="")
    writer = csv.writer(handle)
    writer.writerow(
        ["rank", "score", "start_0", "start_1", "start_2", "stop_0", "stop_1", "stop_2",
         "centre_0", "centre_1", "centre_2", "x_mm", "y_mm", "z_mm", "predicted_pvs",
         "predicted_pvs_voxels", "strategy"]
    )  # fmt: skip
    for r in table:
        writer.writerow(
            [r.rank, r.score, *r.bbox_start, *r.bbox_stop, *r.centre, *r.centre_mm,
             r.predicted_pvs, r.predicted_pvs_voxels, r.strategy]
        )  # fmt: skip
    atomic.write_text(csv_path, handle.getvalue(), overwrite=overwrite)
    return csv_path, json_path


#: What a ranking score means, per strategy (shown as the score column's tooltip and in help).
SCORE_MEANINGS = {
    "entropy": "mean predictive entropy over the patch's voxels, in bits: 0 = the model is sure "
    "everywhere, 1 = p = 0.5 everywhere; most patches score far below 0.1 because most voxels "
    "are surely background",
    "bald": "mean mutual information (BALD) over the patch's voxels, in bits: how much the "
    "model's samples disagree; 0 = they all agree",
    "stratified": "mean predictive entropy in bits (0 = sure, 1 = p = 0.5 everywhere); patches "
    "with and without predicted PVS are ranked separately and taken in turn",
    "clasp": "mean predictive entropy in bits (0 = sure, 1 = p = 0.5 everywhere); two thirds "
    "of the picks have predicted PVS, drawn with noise that shrinks each round (ClaSP PE)",
    "diverse": "mean predictive entropy in bits (0 = sure, 1 = p = 0.5 everywhere); among the "
    "most uncertain patches each next one is the least like those already picked",
    "fg-random": "a random draw among patches with predicted PVS, more likely the more PVS "
    "voxels they hold (the score orders the draw; it measures nothing)",
    "random": "a random draw among all patches (the score orders the draw; it measures nothing)",
}
SCORE_MEANINGS["default"] = (
    f"the product's queue, now {DEFAULT_STRATEGY}: {SCORE_MEANINGS[DEFAULT_STRATEGY]}"
)


def shortfall_message(
    found: int, asked: int, shape: Sequence[int], patch: int, image_given: bool = True
) -> str | None:
    """Why fewer than ``asked`` patches came back (``None`` when none are missing).

    Patches never overlap, keep their centres 1.5 patch sizes apart, skip labelled voxels and
    (with the image) air, so a volume holds far fewer than ``volume / patch**3`` of them.
    """
    if found >= asked:
        return None
    grid = PatchGrid(shape, int(patch), int(patch))
    positions = int(np.prod(grid.n))
    reasons = "not overlapping, centres at least 1.5 patch sizes apart"
    reasons += ", mostly tissue" if image_given else ""
    reasons += " and without reviewed voxels"
    return (
        f"only {found} of {asked} patches: a {' x '.join(map(str, shape))} volume has "
        f"{positions} positions for a {patch}-voxel patch and only {found} of them qualify "
        f"({reasons}); use a smaller patch size to get more"
    )

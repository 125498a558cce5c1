"""The benchmark's report: per-strategy figures from the rows, the CSV, the PNG curves, a table."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_pvs import atomic
from napari_pvs.benchmark.config import BenchmarkConfig

#: Share of the full-supervision Dice a strategy must reach.
TARGET_SHARE = 0.95
#: Name of the full-supervision reference in the CSV.
FULL = "full-supervision"
#: With a converged reference no strategy's gap closed should exceed this.
GAP_CLOSED_LIMIT = 1.05
#: Bootstrap over seeds of patches-to-95%: draws, seed and two-sided interval.
INTERVAL_RESAMPLES = 2000
INTERVAL_SEED = 0
INTERVAL_LEVEL = 0.90
CSV_FIELDS = (
    "strategy", "seed", "round", "labelled_patches", "train_patches", "validation_patches",
    "pvs_patches", "dice", "cluster_f1", "cluster_precision", "cluster_recall",
    "dice_white_matter", "dice_basal_ganglia", "predicted_pvs", "true_pvs", "version",
    "steps", "budget", "converged", "convergence_movement", "validation_dice", "error_yield",
    "cluster_error_yield", "seconds_rank", "seconds_accept", "seconds_round",
    "seconds_score", "cpu_seconds", "load", "note",
)  # fmt: skip
#: The annotator's time (the cost model) and the candidates strategy's answers.
CSV_FIELDS += ("answers", "annotator_minutes", "answer_precision")
#: The cluster precision at the seed's start recall (threshold swept: benchmark.scoring).
CSV_FIELDS += ("precision_at_start_recall",)


def summarise(rows: Sequence[dict[str, Any]], config: BenchmarkConfig) -> dict[str, Any]:
    """N to 95% and gap closed per strategy (seed-mean curves), plus costs, as a dict."""
    full = [r["dice"] for r in rows if r["strategy"] == FULL]
    full_dice = float(np.mean(full))
    target = TARGET_SHARE * full_dice
    strategies: dict[str, Any] = {}
    first = config.strategies[0].label
    start_dice = float(np.mean([r["dice"] for r in rows if r["strategy"] == first
                                and r["round"] == 0]))  # fmt: skip
    for spec in config.patch_strategies:  # the candidates' answers: answers.summarise_answers
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
        yields = [r for r in own if r["round"] == 1]
        strategies[spec.label] = {
            "patches_to_95": None if reached is None else round(reached),
            "patches_to_95_interval": seed_interval(list(per_seed_n.values())),
            "curve_x": [p["labelled_patches"] for p in curve],
            "error_yield": _mean_or_none(r.get("error_yield") for r in yields),
            "cluster_error_yield": _mean_or_none(r.get("cluster_error_yield") for r in yields),
            "gap_closed": closed,
            "final_dice": curve[-1]["dice"],
            "final_dice_sd": curve[-1]["dice_sd"],
            "final_cluster_f1": curve[-1]["cluster_f1"],
            "patches_to_95_per_seed": per_seed_n,
            "curve": curve,
        }
    # areas over the labelled-patch range every strategy covers (one that ran out of patches
    # to queue ends early), so that they compare like with like
    ends = [r["curve"][-1]["labelled_patches"] for r in strategies.values()]
    starts = [r["curve"][0]["labelled_patches"] for r in strategies.values()]
    for result in strategies.values():
        del result["curve_x"]
        result["auc"] = _area(result["curve"], max(starts), min(ends))
    random_auc = strategies.get("random", {}).get("auc")
    for result in strategies.values():
        result["auc_vs_random"] = (
            result["auc"] / random_auc if random_auc and result["auc"] is not None else None
        )
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
    converged = [r.get("converged") for r in rows if r["strategy"] == FULL]
    return {
        "full_supervision_dice": full_dice,
        "full_supervision_dice_per_seed": full,
        "reference_converged": bool(converged) and all(c is True for c in converged),
        "rounds_converged": [r.get("converged") for r in round_rows].count(True),
        "rounds": len(round_rows),
        "start_dice": start_dice,
        "target_dice": target,
        "strategies": strategies,
        "costs": costs,
    }


def seed_interval(per_seed: Sequence[float | None]) -> list[float | None]:
    """Bootstrap ``INTERVAL_LEVEL`` interval of the seed-mean of per-seed values (seeds drawn
    with replacement; a seed that never reached counts as infinite, shown as None = never)."""
    values = np.asarray([np.inf if v is None else float(v) for v in per_seed], dtype=np.float64)
    if values.size == 0:
        return [None, None]
    draws = np.random.default_rng(INTERVAL_SEED).integers(
        0, values.size, size=(INTERVAL_RESAMPLES, values.size)
    )
    means = np.sort(values[draws].mean(axis=1))  # inf stays inf
    tail = (1 - INTERVAL_LEVEL) / 2
    bounds = [means[int(np.floor(tail * (len(means) - 1)))],
              means[int(np.ceil((1 - tail) * (len(means) - 1)))]]  # fmt: skip
    return [None if not np.isfinite(b) else float(b) for b in bounds]


def _area(curve: Sequence[dict[str, Any]], low: float, high: float) -> float | None:
    """Trapezoid area under the seed-mean Dice against labelled patches from ``low`` to
    ``high`` (linear between the curve's points)."""
    if len(curve) < 2 or high <= low:
        return None
    x = np.asarray([p["labelled_patches"] for p in curve], dtype=np.float64)
    y = np.asarray([p["dice"] for p in curve], dtype=np.float64)
    inside = (x > low) & (x < high)
    grid = np.concatenate([[low], x[inside], [high]])
    values = np.interp(grid, x, y)
    return float(np.sum((grid[1:] - grid[:-1]) * (values[1:] + values[:-1]) / 2))


def _mean_or_none(values) -> float | None:
    present = [float(v) for v in values if v is not None]
    return float(np.mean(present)) if present else None


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
    """The benchmark's last lines: ``reference converged: yes|no`` when known, then per
    strategy N to 95%, the gap closed and the error yield (round 0)."""
    from napari_pvs.error_yield import format_yields

    lines = []
    if "reference_converged" in summary:
        lines.append(f"reference converged: {'yes' if summary['reference_converged'] else 'no'}")
    for label, result in summary["strategies"].items():
        n = result["patches_to_95"]
        lines.append(f"{label}: {'never' if n is None else n} patches to 95%")
        gap = result["gap_closed"]
        lines.append(f"{label}: gap closed {'n/a' if gap is None else f'{gap:.3f}'}")
        if "error_yield" in result:
            lines.append(format_yields(label, result["error_yield"],
                                       result["cluster_error_yield"]))  # fmt: skip
    return lines


def gap_warnings(summary: dict[str, Any]) -> list[str]:
    """Strategies whose gap closed exceeds :data:`GAP_CLOSED_LIMIT` although the reference
    converged: then the reference, not the strategy, is suspect."""
    if not summary.get("reference_converged"):
        return []
    return [
        f"warning: {label} closed {r['gap_closed']:.3f} of the gap (> {GAP_CLOSED_LIMIT}) with "
        "a converged reference: the reference is weaker than this strategy's models"
        for label, r in summary["strategies"].items()
        if r["gap_closed"] is not None and r["gap_closed"] > GAP_CLOSED_LIMIT
    ]


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


def save_figure(figure, path: Path, title: str = "") -> Path:
    """Title, lay out and write a benchmark figure as PNG (temporary name, then renamed)."""
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    with atomic.atomic_output(path, overwrite=True) as tmp:
        figure.savefig(tmp, format="png")
    return path


def plot_learning_curve(summary: dict[str, Any], rows, path: Path, title: str = "") -> Path:
    """Dice and cluster F1 against labelled patches: seed mean, min-max band, references."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

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
    return save_figure(figure, path, title)


def format_table(summary: dict[str, Any]) -> str:
    """A readable table of the summary (printed before the final lines)."""
    lines = [
        f"start Dice {summary['start_dice']:.3f}; full supervision Dice "
        f"{summary['full_supervision_dice']:.3f} (target {summary['target_dice']:.3f})",
        f"{'strategy':<20}{'N to 95%':>9}{'90% interval':>14}{'AUC/random':>11}"
        f"{'gap closed':>11}{'final Dice':>16}{'final F1':>9}{'yield':>7}{'(clusters)':>11}",
    ]

    def shown(value, form: str = ".3f") -> str:
        return "n/a" if value is None else format(value, form)

    for label, r in summary["strategies"].items():
        n = "never" if r["patches_to_95"] is None else str(r["patches_to_95"])
        low, high = r.get("patches_to_95_interval") or [None, None]
        interval = f"[{shown(low, '.1f')}, {'never' if high is None else f'{high:.1f}'}]"
        if low is None:
            interval = "[never]"
        dice = f"{r['final_dice']:.3f} ± {r['final_dice_sd']:.3f}"
        lines.append(
            f"{label:<20}{n:>9}{interval:>14}{shown(r.get('auc_vs_random')):>11}"
            f"{shown(r['gap_closed']):>11}{dice:>16}{r['final_cluster_f1']:>9.3f}"
            f"{shown(r.get('error_yield'), '.2f'):>7}"
            f"{shown(r.get('cluster_error_yield'), '.2f'):>11}"
        )
    if "rounds_converged" in summary:
        lines.append(
            f"rounds converged: {summary['rounds_converged']} of {summary['rounds']}; reference "
            f"converged: {'yes' if summary['reference_converged'] else 'no'}"
        )
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

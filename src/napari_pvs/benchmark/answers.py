"""The benchmark's ``candidates`` strategy: a simulated annotator answers yes or no on the
predicted clusters a project proposes (:meth:`Project.candidates`), through
:meth:`Project.answer`, the call a person's key press makes; and its report: Dice, cluster
precision and recall per number of answers, and every strategy's Dice per annotator-minute
under the cost model (:meth:`BenchmarkConfig.annotator_minutes`).

Pool volume ``i`` of the benchmark is project volume id ``i`` (as for the patch annotator).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_pvs.benchmark.annotator import ANNOTATOR
from napari_pvs.benchmark.cases import Case
from napari_pvs.benchmark.config import BenchmarkConfig
from napari_pvs.benchmark.report import save_figure

#: The simulated annotator says yes when at least this share of a cluster's voxels is PVS.
YES_SHARE = 0.5


def simulated_answer(truth_in_cluster: np.ndarray) -> str:
    """``"yes"`` when at least half of the cluster's voxels are ground-truth PVS, else
    ``"no"`` (``truth_in_cluster``: the ground truth at the cluster's voxels)."""
    truth = np.asarray(truth_in_cluster, dtype=bool).ravel()
    if truth.size == 0:
        raise ValueError("a cluster has at least one voxel; got none")
    return "yes" if int(truth.sum()) >= YES_SHARE * truth.size else "no"


class CandidateAnnotator:
    """Answers the candidates the project would show next, with the complete ground truth."""

    def __init__(self, pool: Sequence[Case]) -> None:
        self.pool = list(pool)

    def answer(self, project, n: int, seed: int, round_index: int) -> list:
        """Answer the ``n`` candidates a reviewer would see next: each volume's open
        candidates of the current version in rank order (refreshed first), taken in turn
        (volume order drawn by seed). Returns the answer records."""
        queues = []
        for vid in range(1, len(self.pool) + 1):
            project.predict(vid)  # the current version's prediction (kept when it exists)
            project.refresh_candidates(vid)
            queues.append(project.candidates(vid, status="open", n=n))
        order = np.random.default_rng([seed, round_index, 78]).permutation(len(queues))
        picked = []
        for position in range(max((len(q) for q in queues), default=0)):
            for index in order:
                if position < len(queues[index]):
                    picked.append(queues[index][position])
        return [self.answer_one(project, candidate) for candidate in picked[:n]]

    def answer_one(self, project, candidate):
        """The simulated yes/no on one candidate, saved with :meth:`Project.answer`."""
        truth = self.pool[candidate.volume_id - 1].truth
        box = tuple(
            slice(a, b) for a, b in zip(candidate.bbox_start, candidate.bbox_stop, strict=True)
        )
        cluster = np.asarray(project.candidate_mask(candidate.id), dtype=bool)
        verdict = simulated_answer(truth[box][cluster])
        return project.answer(candidate.id, verdict, annotator=ANNOTATOR)


# -- the report ---------------------------------------------------------------------------------
def _seed_mean_curve(rows: Sequence[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    """Per round, the seed means of a strategy's rows (answers, minutes and test metrics)."""
    own = [r for r in rows if r["strategy"] == label]
    curve = []
    for round_index in sorted({r["round"] for r in own}):
        at = [r for r in own if r["round"] == round_index]

        def mean(key: str, at=at) -> float | None:
            values = [float(r[key]) for r in at if r.get(key) is not None]
            return float(np.mean(values)) if values else None

        def mean_of_all(key: str, at=at) -> float | None:
            """None unless every seed has a value (a seed whose model never reaches the
            start's recall has none, and the others' mean would flatter it)."""
            return None if any(r.get(key) is None for r in at) else mean(key)

        curve.append(
            {
                "round": round_index,
                "answers": mean("answers"),
                "labelled_patches": mean("labelled_patches"),
                "annotator_minutes": mean("annotator_minutes"),
                "dice": mean("dice"),
                "cluster_precision": mean("cluster_precision"),
                "cluster_recall": mean("cluster_recall"),
                "precision_at_start_recall": mean_of_all("precision_at_start_recall"),
                "seeds": len(at),
            }
        )
    return curve


def summarise_answers(rows: Sequence[dict[str, Any]], config: BenchmarkConfig) -> dict[str, Any]:
    """The candidates strategy's curve per number of answers (seed means), and every
    strategy's Dice against annotator-minutes with the Dice each patch strategy has at the
    minutes the candidates' last round cost (linear between its rounds; None beyond them)."""
    at_start_recall = {
        spec.label: [p["precision_at_start_recall"] for p in _seed_mean_curve(rows, spec.label)]
        for spec in config.strategies
    }
    per_minute = {
        spec.label: [
            {"annotator_minutes": p["annotator_minutes"], "dice": p["dice"]}
            for p in _seed_mean_curve(rows, spec.label)
        ]
        for spec in config.strategies
    }
    result: dict[str, Any] = {
        "cost_model": {
            "seconds_per_patch": config.seconds_per_patch,
            "seconds_per_answer": config.seconds_per_answer,
        },
        "per_minute": per_minute,
        "precision_at_start_recall": at_start_recall,
    }
    asked = [spec.label for spec in config.strategies if spec.asks_candidates]
    if not asked:
        return result
    curve = _seed_mean_curve(rows, asked[0])
    minutes = curve[-1]["annotator_minutes"]
    at_equal = {}
    for spec in config.patch_strategies:
        points = per_minute[spec.label]
        x = [p["annotator_minutes"] for p in points]
        inside = bool(points) and x[0] <= minutes <= x[-1]
        at_equal[spec.label] = (
            float(np.interp(minutes, x, [p["dice"] for p in points])) if inside else None
        )
    result.update(
        {
            "label": asked[0],
            "curve": curve,
            "minutes": minutes,
            "dice": curve[-1]["dice"],
            "patch_dice_at_equal_minutes": at_equal,
        }
    )
    return result


def answer_lines(answers: dict[str, Any]) -> list[str]:
    """``candidates: precision A -> B, recall C -> D after K answers`` (test volumes, cluster
    level, seed means, start -> last round), the precision at the start's recall (start ->
    last round, and every other strategy's last round), and the Dice at equal
    annotator-minutes."""
    if "curve" not in answers:
        return []
    first, last = answers["curve"][0], answers["curve"][-1]

    def shown(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        f"{answers['label']}: precision {shown(first['cluster_precision'])} -> "
        f"{shown(last['cluster_precision'])}, recall {shown(first['cluster_recall'])} -> "
        f"{shown(last['cluster_recall'])} after {round(last['answers'] or 0)} answers"
    ]
    matched = answers.get("precision_at_start_recall", {})
    own = matched.get(answers["label"]) or []
    if len(own) == len(answers["curve"]):  # (benchmark rows from before the sweep have none)
        others = "".join(
            f"; {label} {shown(values[-1])} after its last round"
            for label, values in matched.items()
            if label != answers["label"] and values
        )
        lines.append(
            f"{answers['label']}: at the start's recall (threshold swept on the test volumes): "
            f"precision {shown(own[0])} -> {shown(own[-1])} after "
            f"{round(last['answers'] or 0)} answers{others}"
        )
    compared = {k: v for k, v in answers["patch_dice_at_equal_minutes"].items() if v is not None}
    best = max(compared, key=lambda k: compared[k]) if compared else None
    lines.append(
        f"{answers['label']}: Dice {shown(answers['dice'])} at {answers['minutes']:.1f} "
        "annotator-minutes; best patch strategy there: "
        + ("n/a" if best is None else f"{best} {compared[best]:.3f}")
    )
    return lines


def format_answers(answers: dict[str, Any]) -> str:
    """The candidates' curve and every strategy's Dice per annotator-minute, as a table."""
    cost = answers["cost_model"]
    lines = [
        f"cost model: {cost['seconds_per_patch']:g} s per reviewed patch, "
        f"{cost['seconds_per_answer']:g} s per yes/no answer"
    ]
    if "curve" in answers:
        lines.append(
            f"{'answers':>8}{'minutes':>9}{'Dice':>8}{'precision':>11}{'recall':>8}"
            f"{'at start recall':>17}  ({answers['label']}, test volumes, cluster level)"
        )
        for p in answers["curve"]:
            lines.append(
                f"{round(p['answers'] or 0):>8}{p['annotator_minutes']:>9.1f}{p['dice']:>8.3f}"
                f"{_number(p['cluster_precision']):>11}{_number(p['cluster_recall']):>8}"
                f"{_number(p.get('precision_at_start_recall')):>17}"
            )
    lines.append("Dice per annotator-minute (seed means, start -> last round):")
    for label, points in answers["per_minute"].items():
        pairs = ", ".join(f"{p['annotator_minutes']:.1f} min {p['dice']:.3f}" for p in points)
        lines.append(f"  {label}: {pairs}")
    return "\n".join(lines)


def plot_per_minute(answers: dict[str, Any], path: Path, title: str = "") -> Path:
    """Test Dice and the candidates' cluster precision and recall against annotator-minutes
    (seed means; the cost model in the axis label) as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    cost = answers["cost_model"]
    figure = Figure(figsize=(11, 4.4), dpi=110)
    left, right = figure.subplots(1, 2)
    for label, points in answers["per_minute"].items():
        left.plot([p["annotator_minutes"] for p in points], [p["dice"] for p in points],
                  marker="o", ms=3, label=label)  # fmt: skip
    if "curve" in answers:
        x = [p["answers"] for p in answers["curve"]]
        for key in ("cluster_precision", "cluster_recall", "dice"):
            right.plot(x, [p[key] for p in answers["curve"]], marker="o", ms=3,
                       label=key.replace("cluster_", "cluster "))  # fmt: skip
        right.set_xlabel(f"answers ({answers['label']})")
        right.legend(fontsize=7, loc="lower right")
    left.set_xlabel(
        f"annotator-minutes ({cost['seconds_per_patch']:g} s a patch, "
        f"{cost['seconds_per_answer']:g} s an answer)"
    )
    left.set_ylabel("test Dice")
    left.legend(fontsize=7, loc="lower right")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return save_figure(figure, path, title)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"

"""The two tables of patches: the Segment panel's ranking and the Review step's queue.

Each is a :func:`~napari_pvs._widgets._common.compact_table` with its columns and header tips;
a row's tooltip says what its score means (:data:`napari_pvs.ranking.SCORE_MEANINGS`) and where
the patch is. The queue's rows are coloured by status and its selection follows the open patch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from qtpy.QtGui import QColor
from qtpy.QtWidgets import QTableWidget

from napari_pvs._widgets._common import compact_table, fill_table
from napari_pvs._widgets.review_queue import ReviewQueue
from napari_pvs.ranking import SCORE_MEANINGS, RankedPatch

STATUS_COLOURS = {"reviewed": QColor(60, 140, 80, 110), "skipped": QColor(120, 120, 120, 90)}


def ranking_table() -> QTableWidget:
    """The ranked patches of a prediction store: rank, score, centre (voxels), predicted PVS."""
    return compact_table(
        ["#", "score", "centre (voxel)", "PVS"],
        [
            "rank",
            "percentile of the patch's score in this ranking (100: the most informative); "
            "hover a row for the raw score and its meaning",
            "patch centre in voxels (axis order of the volume); hover for mm",
            "predicted PVS in the patch",
        ],
    )


def show_ranking(table: QTableWidget, ranking: Sequence[RankedPatch]) -> None:
    """One row per ranked patch; the tooltip gives the score's meaning and the centre in mm."""
    percentiles = score_percentiles([patch.score for patch in ranking])
    rows = [
        [
            patch.rank,
            f"{percentile:.0f}",
            ", ".join(f"{c:g}" for c in patch.centre),
            patch.predicted_pvs,
        ]
        for patch, percentile in zip(ranking, percentiles, strict=True)
    ]
    tips = [
        f"{percentile:.0f}th percentile; {p.strategy} score {p.score:.6g}: "
        f"{SCORE_MEANINGS[p.strategy]}\ncentre {', '.join(f'{c:.1f}' for c in p.centre_mm)} mm"
        for p, percentile in zip(ranking, percentiles, strict=True)
    ]
    fill_table(table, rows, tips)


def score_percentiles(scores: Sequence[float]) -> list[float]:
    """Each score as a 0-100 percentile of ``scores`` (the share of them it is at or above;
    100 for the highest), which reads without knowing the score's unit."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    if ordered.size == 0:
        return []
    at_or_below = np.searchsorted(ordered, np.asarray(scores, dtype=np.float64), side="right")
    return [float(v) for v in 100.0 * at_or_below / ordered.size]


def queue_table() -> QTableWidget:
    """A volume's review queue: rank, score, predicted PVS, status."""
    table = compact_table(
        ["#", "score", "PVS", "status"],
        [
            "rank in the queue",
            "percentile of the patch's score in this queue (100: the most informative); "
            "hover a row for the raw score and its meaning",
            "PVS the model predicts in the patch",
            "new, reviewed (accepted) or skipped",
        ],
        fit=(0, 2),
    )
    table.setMinimumHeight(180)
    return table


def show_queue(table: QTableWidget, queue: ReviewQueue) -> None:
    """The queue's rows, coloured by status, the selected patch's row selected (silently)."""
    rows, tips = [], []
    percentiles = score_percentiles([patch.score for patch in queue.patches])
    for patch, percentile in zip(queue.patches, percentiles, strict=True):
        rows.append([patch.rank, f"{percentile:.0f}", patch.predicted_pvs, patch.status])
        meaning = SCORE_MEANINGS.get(patch.strategy, "")
        tips.append(
            f"{percentile:.0f}th percentile of this queue; {patch.strategy} score "
            f"{patch.score:.6g}: {meaning}"
            f"\nvoxels {list(patch.start)}..{list(patch.stop)}, model v{patch.model_version}"
        )
    fill_table(table, rows, tips)
    for r, patch in enumerate(queue.patches):
        colour = STATUS_COLOURS.get(patch.status)
        if colour is not None:
            for c in range(table.columnCount()):
                table.item(r, c).setBackground(colour)
    table.blockSignals(True)
    if queue.index >= 0:
        table.selectRow(queue.index)
    else:
        table.clearSelection()
    table.blockSignals(False)

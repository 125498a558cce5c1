"""The two tables of patches: the Segment panel's ranking and the Review step's queue.

Each is a :func:`~napari_pvs._widgets._common.compact_table` with its columns and header tips;
a row's tooltip says what its score means (:data:`napari_pvs.ranking.SCORE_MEANINGS`) and where
the patch is. The queue's rows are coloured by status and its selection follows the open patch.
"""

from __future__ import annotations

from collections.abc import Sequence

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
            "the strategy's score (hover a row for its meaning)",
            "patch centre in voxels (axis order of the volume); hover for mm",
            "predicted PVS in the patch",
        ],
    )


def show_ranking(table: QTableWidget, ranking: Sequence[RankedPatch]) -> None:
    """One row per ranked patch; the tooltip gives the score's meaning and the centre in mm."""
    rows = [
        [
            patch.rank,
            f"{patch.score:.3g}",
            ", ".join(f"{c:g}" for c in patch.centre),
            patch.predicted_pvs,
        ]
        for patch in ranking
    ]
    tips = [
        f"{SCORE_MEANINGS[p.strategy]}\ncentre {', '.join(f'{c:.1f}' for c in p.centre_mm)} mm"
        for p in ranking
    ]
    fill_table(table, rows, tips)


def queue_table() -> QTableWidget:
    """A volume's review queue: rank, score, predicted PVS, status."""
    table = compact_table(
        ["#", "score", "PVS", "status"],
        [
            "rank in the queue",
            "how much the model would gain from this patch (hover a row for the meaning)",
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
    for patch in queue.patches:
        rows.append([patch.rank, f"{patch.score:.3g}", patch.predicted_pvs, patch.status])
        meaning = SCORE_MEANINGS.get(patch.strategy, "")
        tips.append(
            f"{patch.strategy} score {patch.score:.6g}: {meaning}"
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

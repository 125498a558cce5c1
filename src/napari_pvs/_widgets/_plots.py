"""Small live matplotlib plots in the napari theme (the Train and Report steps).

One figure per plot, one ``Line2D`` per series, updated in place (``set_data``, ``relim``,
``draw_idle``) rather than cleared and redrawn, so a plot fed a few times a second costs
little on the GUI thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from napari.utils.theme import get_theme
from qtpy.QtCore import QTimer

if TYPE_CHECKING:
    import napari

SERIES_COLOURS = ("#e6a23c", "#5dade2", "#58d68d", "#ec7063")
#: At most one redraw per this many ms: a draw costs 50-100 ms of GUI time on 2 busy cores.
REDRAW_MS = 1000


class LivePlot(FigureCanvasQTAgg):
    """Stacked axes sharing x; ``series`` names one line per axis, in order."""

    def __init__(
        self,
        viewer: napari.viewer.Viewer,
        series: Sequence[tuple[str, str]],
        xlabel: str,
        height: float = 2.6,
    ) -> None:
        theme = get_theme(viewer.theme)
        text, background = theme.text.as_hex(), theme.background.as_hex()
        # fixed margins: a constrained layout re-measures every tick label on each draw
        # (hundreds of ms on 2 cores), which the heartbeat would feel
        figure = Figure(figsize=(3.2, height), dpi=100, facecolor=background)
        # margins in inches (the tick labels and axis titles), whatever the height
        figure.subplots_adjust(left=0.6 / 3.2, right=0.96, top=1 - 0.08 / height,
                               bottom=0.42 / height, hspace=0.15)  # fmt: skip
        super().__init__(figure)
        self.axes = figure.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
        self.lines = {}
        for (name, ylabel), axis, colour in zip(series, self.axes, SERIES_COLOURS, strict=False):
            axis.set_facecolor(background)
            axis.set_ylabel(ylabel, color=text, fontsize=8)
            axis.tick_params(colors=text, labelsize=7)
            axis.yaxis.set_major_locator(MaxNLocator(4))  # few ticks: text laid out on each draw
            axis.xaxis.set_major_locator(MaxNLocator(5, integer=True))  # steps, rounds: whole
            for spine in axis.spines.values():
                spine.set_color(text)
            (self.lines[name],) = axis.plot([], [], color=colour, marker=".", linewidth=1.2)
        self.axes[-1].set_xlabel(xlabel, color=text, fontsize=8)
        self.setMinimumHeight(int(height * 70))
        self._redraw = QTimer(self)
        self._redraw.setSingleShot(True)
        self._redraw.setInterval(REDRAW_MS)
        self._redraw.timeout.connect(self.draw_idle)

    def set_series(self, name: str, x: Sequence[float], y: Sequence[float]) -> None:
        line = self.lines[name]
        line.set_data(list(x), list(y))
        axis = line.axes
        axis.relim()
        axis.autoscale_view()
        if not self._redraw.isActive():  # coalesce: one draw per REDRAW_MS at most
            self._redraw.start()

    def flush(self) -> None:
        """Draw what is pending at the next event-loop turn (a round's last point)."""
        self._redraw.stop()
        self.draw_idle()

    def clear(self) -> None:
        for name in self.lines:
            self.set_series(name, [], [])

    def series(self, name: str) -> tuple[list[float], list[float]]:
        x, y = self.lines[name].get_data()
        return list(x), list(y)

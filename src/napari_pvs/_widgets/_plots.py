"""Small live matplotlib plots in the napari theme (the Train and Report steps).

One ``FigureCanvasQTAgg`` per plot and one ``Line2D`` per series, updated in place with
``set_data``. A full draw (axes, ticks, labels) costs 50-150 ms of GUI time on 2 busy cores, so
it happens only when the axis limits must grow (they grow in generous steps) or the canvas
resizes; every other update restores the saved background and blits the lines (about a
millisecond), the usual matplotlib animation technique. A plot whose step is not shown does
no full draw until it is shown (a prediction or a round refreshes the Report's curve while the
user is in another step). All values plotted here are >= 0 (steps, rounds, losses, Dice), so
every axis starts at 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from napari.utils.theme import get_theme

if TYPE_CHECKING:
    import napari

SERIES_COLOURS = ("#e6a23c", "#5dade2", "#58d68d", "#ec7063")


def _room(value: float) -> float:
    """A round upper limit comfortably above ``value`` (1, 2, 5 x 10^k), so limits rarely move."""
    if value <= 0:
        return 1.0
    exponent = 10 ** math.floor(math.log10(value * 1.2))
    return next(m * exponent for m in (1, 2, 5, 10) if m * exponent >= value * 1.2)


class LivePlot(FigureCanvasQTAgg):
    """Stacked axes sharing x; ``series`` names one line per axis, in order; ``ylims`` fixes
    an axis's range (e.g. Dice in [0, 1])."""

    def __init__(
        self,
        viewer: napari.viewer.Viewer,
        series: Sequence[tuple[str, str]],
        xlabel: str,
        height: float = 2.6,
        ylims: dict[str, tuple[float, float]] | None = None,
    ) -> None:
        theme = get_theme(viewer.theme)
        text, background = theme.text.as_hex(), theme.background.as_hex()
        figure = Figure(figsize=(3.2, height), dpi=100, facecolor=background)
        # margins in inches (the tick labels and axis titles), whatever the height
        figure.subplots_adjust(left=0.6 / 3.2, right=0.96, top=1 - 0.08 / height,
                               bottom=0.42 / height, hspace=0.15)  # fmt: skip
        super().__init__(figure)
        self.axes = figure.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
        self.lines = {}
        self.fixed = dict(ylims or {})
        for (name, ylabel), axis, colour in zip(series, self.axes, SERIES_COLOURS, strict=False):
            axis.set_facecolor(background)
            axis.set_ylabel(ylabel, color=text, fontsize=8)
            axis.tick_params(colors=text, labelsize=7)
            axis.yaxis.set_major_locator(MaxNLocator(4))
            axis.xaxis.set_major_locator(MaxNLocator(5, integer=True))
            for spine in axis.spines.values():
                spine.set_color(text)
            (line,) = axis.plot([], [], color=colour, marker=".", linewidth=1.2, animated=True)
            self.lines[name] = line
            axis.set_xlim(0, 1)
            axis.set_ylim(*self.fixed.get(name, (0, 1)))
        self.axes[-1].set_xlabel(xlabel, color=text, fontsize=8)
        self.setMinimumHeight(int(height * 70))
        self._background = None
        self._draw_when_shown = False
        self.full_draws = 0  # how often the axes were redrawn (the costly path)
        self.mpl_connect("draw_event", self._on_draw)

    def draw_idle(self) -> None:
        """A full draw at the next event-loop turn, or when the plot is next shown."""
        if not self.isVisible():
            self._draw_when_shown = True
            return
        super().draw_idle()

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if self._draw_when_shown:
            self._draw_when_shown = False
            self._background = None
            super().draw_idle()

    def _on_draw(self, event) -> None:
        """After a full draw: keep the background, draw the (animated) lines over it."""
        self.full_draws += 1
        self._background = self.copy_from_bbox(self.figure.bbox)
        for line in self.lines.values():
            line.axes.draw_artist(line)

    def _blit(self) -> None:
        self.restore_region(self._background)
        for line in self.lines.values():
            line.axes.draw_artist(line)
        self.blit(self.figure.bbox)

    def set_xmax(self, xmax: float) -> None:
        """Set the shared x range up front (a round's step count), avoiding redraws later."""
        self.axes[0].set_xlim(0, max(float(xmax), 1.0))
        self._background = None
        self.draw_idle()

    def set_series(self, name: str, x: Sequence[float], y: Sequence[float]) -> None:
        line = self.lines[name]
        line.set_data(list(x), list(y))
        axis = line.axes
        grow = False
        if len(x) and max(x) > axis.get_xlim()[1]:
            axis.set_xlim(0, _room(max(x)))
            grow = True
        if name not in self.fixed and len(y) and max(y) > axis.get_ylim()[1]:
            axis.set_ylim(0, _room(max(y)))
            grow = True
        if grow or self._background is None or not self.isVisible():
            self._background = None
            self.draw_idle()  # axes change: one full draw; _on_draw puts the lines back
        else:
            self._blit()

    def flush(self) -> None:
        """Draw everything at the next event-loop turn (a screenshot, a finished round)."""
        self._background = None
        self.draw_idle()

    def clear(self) -> None:
        for line in self.lines.values():
            line.set_data([], [])
        for axis in self.axes:
            axis.set_xlim(0, 1)
        for name, line in self.lines.items():
            if name not in self.fixed:
                line.axes.set_ylim(0, 1)
        self.flush()

    def series(self, name: str) -> tuple[list[float], list[float]]:
        x, y = self.lines[name].get_data()
        return list(x), list(y)

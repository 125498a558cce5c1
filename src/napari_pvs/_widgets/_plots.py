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
from napari.utils.theme import get_theme

if TYPE_CHECKING:
    import napari

SERIES_COLOURS = ("#e6a23c", "#5dade2", "#58d68d", "#ec7063")


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
        figure = Figure(figsize=(3.2, height), dpi=100, facecolor=background, layout="constrained")
        super().__init__(figure)
        self.axes = figure.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
        self.lines = {}
        for (name, ylabel), axis, colour in zip(series, self.axes, SERIES_COLOURS, strict=False):
            axis.set_facecolor(background)
            axis.set_ylabel(ylabel, color=text, fontsize=8)
            axis.tick_params(colors=text, labelsize=7)
            for spine in axis.spines.values():
                spine.set_color(text)
            (self.lines[name],) = axis.plot([], [], color=colour, marker=".", linewidth=1.2)
        self.axes[-1].set_xlabel(xlabel, color=text, fontsize=8)
        self.setMinimumHeight(int(height * 70))

    def set_series(self, name: str, x: Sequence[float], y: Sequence[float]) -> None:
        line = self.lines[name]
        line.set_data(list(x), list(y))
        axis = line.axes
        axis.relim()
        axis.autoscale_view()
        self.draw_idle()

    def clear(self) -> None:
        for name in self.lines:
            self.set_series(name, [], [])

    def series(self, name: str) -> tuple[list[float], list[float]]:
        x, y = self.lines[name].get_data()
        return list(x), list(y)

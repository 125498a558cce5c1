"""The Train and Report steps' live plots: a plot nobody sees costs the GUI thread nothing."""

from __future__ import annotations

import pytest

from napari_pvs._widgets._plots import LivePlot

pytestmark = pytest.mark.gui


def test_a_hidden_plot_draws_once_when_shown_and_then_as_its_axes_grow(make_napari_viewer, qtbot):
    """A full draw is 50-150 ms of GUI thread: while hidden (another step is shown) the plot
    keeps its data and draws nothing; shown, it draws once; an axis growing draws again."""
    plot = LivePlot(make_napari_viewer(), [("loss", "loss")], "step")
    qtbot.addWidget(plot)
    for k in range(1, 6):  # every call grows the axes: a full draw each, were it shown
        plot.set_series("loss", list(range(k)), [10.0**k] * k)
    qtbot.wait(200)
    assert plot.full_draws == 0
    plot.show()
    qtbot.waitUntil(lambda: plot.full_draws == 1, timeout=5000)
    qtbot.wait(200)
    assert plot.full_draws == 1
    assert plot.series("loss") == (list(range(5)), [1e5] * 5)
    assert plot.axes[0].get_ylim()[1] >= 1e5  # the drawn axes hold the data set while hidden
    plot.set_series("loss", list(range(6)), [1e7] * 6)
    qtbot.waitUntil(lambda: plot.full_draws == 2, timeout=5000)

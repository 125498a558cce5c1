"""The front door: one dock widget holding the annotation loop as steps.

``napari -w napari-pvs`` opens it (it is first in the manifest). Each step (Project, Segment,
Review, Train, Report) is a page in its own scroll area, so the dock stays narrow (the canvas
keeps most of the window) and everything stays reachable on a small screen. The steps share
one :class:`~napari_pvs._widgets.state.WorkflowState` and never reach into each other.

napari does not call a dock widget's ``closeEvent``; :meth:`PVSWorkflow.teardown` runs when
the dock is removed (the widget loses its parent) or the viewer's window closes: it cancels
jobs and a running round, and releases the project's lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtpy.QtCore import QEvent, QObject, QSize
from qtpy.QtWidgets import QTabWidget, QVBoxLayout, QWidget

from napari_pvs._widgets._common import Ask, scroll_page
from napari_pvs._widgets.project_step import ProjectStep
from napari_pvs._widgets.report import ReportStep
from napari_pvs._widgets.review import ReviewStep
from napari_pvs._widgets.segment import SegmentPanel
from napari_pvs._widgets.state import WorkflowState
from napari_pvs._widgets.train import TrainStep

if TYPE_CHECKING:
    import napari

#: The dock's width: wide enough for the tables, narrow enough that at 1920 px the canvas
#: keeps well over 60% of the window beside napari's own layer list.
DOCK_WIDTH = 340
#: The narrowest the steps can be laid out in (the widest step's minimum plus a scroll bar).
MIN_WIDTH = 310
STEP_NAMES = ("Project", "Segment", "Review", "Train", "Report")


class PVSWorkflow(QWidget):
    """Project → Segment → Review → Train → Report, as tabs over one shared state."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, ask: Ask | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = WorkflowState(napari_viewer, ask=ask, parent=self)
        self.project_step = ProjectStep(self.state)
        self.segment_step = SegmentPanel(napari_viewer, self.state, standalone=False)
        self.review_step = ReviewStep(self.state)
        self.train_step = TrainStep(self.state)
        self.report_step = ReportStep(self.state)
        self.steps = (self.project_step, self.segment_step, self.review_step, self.train_step,
                      self.report_step)  # fmt: skip
        self.tabs = QTabWidget()
        self.tabs.setUsesScrollButtons(True)
        self.tabs.setDocumentMode(True)
        for name, step in zip(STEP_NAMES, self.steps, strict=True):
            self.tabs.addTab(scroll_page(step), name)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.tabs)
        self.setMinimumWidth(MIN_WIDTH)
        self.setMaximumWidth(int(DOCK_WIDTH * 1.6))
        self._torn_down = False
        self._was_docked = False
        self._watched: QObject | None = None

    def sizeHint(self) -> QSize:
        """Ask the dock for its narrow width; the pages scroll, they do not widen it."""
        return QSize(DOCK_WIDTH, super().sizeHint().height())

    def show_step(self, name: str) -> None:
        self.tabs.setCurrentIndex(STEP_NAMES.index(name))

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if event.type() == QEvent.Type.Close:
            self.teardown()
        return False

    def event(self, event: QEvent) -> bool:
        kind = event.type()
        if kind == QEvent.Type.ParentChange and self.parent() is None and self._was_docked:
            self.teardown()  # napari's remove_dock_widget takes the widget out this way
        elif kind in (QEvent.Type.ParentChange, QEvent.Type.Show) and self.parent() is not None:
            self._was_docked = True
            top = self.window()  # the viewer's main window once docked: watch it close
            if top is not self and top is not self._watched:
                if self._watched is not None:
                    self._watched.removeEventFilter(self)
                top.installEventFilter(self)
                self._watched = top
        return super().event(event)

    def teardown(self) -> None:
        """Stop what runs and release the project (idempotent)."""
        if self._torn_down:
            return
        self._torn_down = True
        if self._watched is not None:  # no reference to the viewer's window outlives it
            self._watched.removeEventFilter(self)
            self._watched = None
        self.train_step.teardown()
        self.review_step.teardown()
        volumes = self.project_step.volumes_box
        for job in (self.segment_step.job, volumes.count_job, volumes.show_job,
                    self.report_step.job):  # fmt: skip
            job.cancel()
        self.segment_step.staged.stop()
        self.state.close()

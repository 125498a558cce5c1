"""Small Qt pieces every panel and workflow step shares (one place each).

- :func:`notify`: the panel's own status line, and a napari notification for warnings and
  errors;
- :data:`Ask` / :func:`ask_with_dialog`: the one way a widget asks the user to choose; the
  workflow state holds the function, so tests swap in a policy instead of clicking dialogs;
- :func:`scroll_page`, :func:`collapsed`, :func:`compact_table`: the layout pieces that keep
  the dock narrow (scroll areas, advanced options collapsed, tables that fit their columns).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from napari.utils.notifications import show_error, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFrame,
    QHeaderView,
    QLabel,
    QMessageBox,
    QScrollArea,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from napari_pvs.ranking import SCORE_MEANINGS, STRATEGIES

#: ``ask(parent, title, question, choices) -> the chosen choice``; the last choice is the one
#: that changes nothing (Escape / closing the dialog picks it).
Ask = Callable[[QWidget | None, str, str, Sequence[str]], str]


def ask_with_dialog(
    parent: QWidget | None, title: str, question: str, choices: Sequence[str]
) -> str:
    """A modal question with one button per choice; Escape answers the last choice."""
    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Question)
    box.setWindowTitle(title)
    box.setText(question)
    buttons = [box.addButton(text, QMessageBox.ButtonRole.ActionRole) for text in choices]
    box.setEscapeButton(buttons[-1])
    box.setDefaultButton(buttons[-1])
    box.exec()
    clicked = box.clickedButton()
    return choices[buttons.index(clicked)] if clicked in buttons else choices[-1]


def notify(status: QLabel | None, message: str, level: str = "info") -> None:
    """Show ``message`` in the panel's status line; a warning or an error also as a napari
    notification, which the user must see wherever they look.

    Info (an accept saved, a step done) goes to the status line and the ``napari_pvs`` log
    only: a napari toast per routine action piled up over the canvas, and each one's fade-in
    animation repainted the canvas under it (about 40 ms of GUI thread per toast under
    software OpenGL, measured with a heartbeat).
    """
    if status is not None:
        status.setText(message)
    if level in ("error", "warning"):
        (show_error if level == "error" else show_warning)(message)
    else:
        logging.getLogger("napari_pvs").info(message)


def status_label() -> QLabel:
    """A word-wrapped status line (the last message of a panel, selectable for copying)."""
    label = QLabel("")
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return label


def scroll_page(content: QWidget) -> QScrollArea:
    """``content`` in a vertical scroll area that never scrolls sideways (the dock stays narrow)."""
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setWidget(content)
    return area


def collapsed(title: str, content: QWidget) -> QCollapsible:
    """An "Advanced" section, closed until asked for."""
    section = QCollapsible(title)
    section.setDuration(0)
    section.addWidget(content)
    section.collapse(animate=False)
    return section


def compact_table(
    headers: Sequence[str],
    tooltips: Sequence[str] | None = None,
    fit: Sequence[int] = (),
) -> QTableWidget:
    """A read-only, single-row-selection table whose columns share the dock's width; the
    ``fit`` columns (short numbers) take only what their contents need."""
    table = QTableWidget(0, len(headers))
    table.setHorizontalHeaderLabels(list(headers))
    if tooltips:
        for column, tip in enumerate(tooltips):
            if tip:
                table.horizontalHeaderItem(column).setToolTip(tip)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.verticalHeader().setVisible(False)
    table.setWordWrap(False)
    header = table.horizontalHeader()
    header.setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
    for column in fit:
        header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
    header.setMinimumSectionSize(28)
    table.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
    table.setMinimumHeight(140)
    return table


def fill_table(
    table: QTableWidget, rows: Sequence[Sequence[object]], tips: Sequence[str | None] = ()
) -> None:
    """Replace the table's rows (cells as text; ``tips[row]`` as that row's tooltip)."""
    table.blockSignals(True)
    table.clearContents()
    table.setRowCount(len(rows))
    for r, cells in enumerate(rows):
        for c, value in enumerate(cells):
            item = QTableWidgetItem("" if value is None else str(value))
            if r < len(tips) and tips[r]:
                item.setToolTip(tips[r])
            table.setItem(r, c, item)
    table.blockSignals(False)


def page(*widgets: QWidget, stretch: bool = True) -> QWidget:
    """A column of sections (what one step's scroll area holds)."""
    content = QWidget()
    layout = QVBoxLayout(content)
    layout.setContentsMargins(4, 4, 4, 4)
    for widget in widgets:
        layout.addWidget(widget)
    if stretch:
        layout.addStretch(1)
    return content


def strategy_combo(tooltip: str) -> QComboBox:
    """The ranking strategies, each item's tooltip saying what its score means."""
    combo = QComboBox()
    combo.addItems(STRATEGIES)
    for index, name in enumerate(STRATEGIES):
        combo.setItemData(index, SCORE_MEANINGS[name], Qt.ItemDataRole.ToolTipRole)
    combo.setToolTip(tooltip)
    return combo


def set_combo_items(combo: QComboBox, names: Sequence[str]) -> None:
    """Refill ``combo`` without emitting signals, keeping the current choice when it remains."""
    current = combo.currentText()
    combo.blockSignals(True)
    combo.clear()
    combo.addItems(list(names))
    if current in names:
        combo.setCurrentText(current)
    combo.blockSignals(False)


def fill_volume_combo(combo: QComboBox, project) -> None:
    """Refill ``combo`` with the project's volumes (name shown, id as data) without emitting
    signals, keeping the chosen volume when it remains (else the first)."""
    current = combo.currentData()
    combo.blockSignals(True)
    combo.clear()
    for volume in project.volumes() if project is not None else []:
        combo.addItem(volume.name, volume.id)
    index = combo.findData(current)
    combo.setCurrentIndex(index if index >= 0 else 0)
    combo.blockSignals(False)

"""The Project step's settings box: strategy, queue size, patch edge, device and brush size,
kept in the project (``state.settings`` / ``state.update_settings``)."""

from __future__ import annotations

from collections.abc import Callable

from qtpy.QtWidgets import QComboBox, QFormLayout, QGroupBox, QSpinBox

from napari_pvs._widgets._common import strategy_combo
from napari_pvs._widgets.state import WorkflowState

DEVICE_CHOICES = ("auto", "cpu", "cuda")


class SettingsBox(QGroupBox):
    """The open project's settings; each change is stored at once."""

    def __init__(self, state: WorkflowState, report: Callable[..., None]) -> None:
        super().__init__("Settings (kept in the project)")
        self.state = state
        self._report = report
        form = QFormLayout(self)
        self.strategy_combo = strategy_combo("How the Review queue picks patches")
        form.addRow("Strategy", self.strategy_combo)
        self.n_spin = QSpinBox()
        self.n_spin.setRange(1, 500)
        self.patch_spin = QSpinBox()
        self.patch_spin.setRange(8, 256)
        self.patch_spin.setToolTip("Edge of a review patch, in voxels")
        self.n_spin.setToolTip("Patches per review queue")
        self.n_spin.setSuffix(" patches")
        self.patch_spin.setSuffix(" vx")
        form.addRow("Queue", self.n_spin)
        form.addRow("Patch edge", self.patch_spin)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICE_CHOICES)
        form.addRow("Device", self.device_combo)
        self.brush_spin = QSpinBox()
        self.brush_spin.setRange(1, 40)
        self.brush_spin.setSuffix(" vx")
        self.brush_spin.setToolTip("Brush of the Review step's patch layer (PVS are 1-3 voxels)")
        form.addRow("Brush", self.brush_spin)
        self.strategy_combo.currentTextChanged.connect(self._save)
        self.device_combo.currentTextChanged.connect(self._save)
        for spin in (self.n_spin, self.patch_spin, self.brush_spin):
            spin.valueChanged.connect(self._save)

    def apply(self) -> None:
        """Show the project's settings (without storing them again)."""
        settings = self.state.settings()
        widgets = (self.strategy_combo, self.device_combo, self.n_spin, self.patch_spin,
                   self.brush_spin)  # fmt: skip
        for widget in widgets:
            widget.blockSignals(True)
        self.strategy_combo.setCurrentText(str(settings["strategy"]))
        self.device_combo.setCurrentText(str(settings["device"]))
        self.n_spin.setValue(int(settings["n"]))
        self.patch_spin.setValue(int(settings["patch"]))
        self.brush_spin.setValue(int(settings["brush_size"]))
        for widget in widgets:
            widget.blockSignals(False)

    def _save(self, *args) -> None:
        if self.state.project is None:
            return
        try:
            self.state.update_settings(
                strategy=self.strategy_combo.currentText(),
                device=self.device_combo.currentText(),
                n=self.n_spin.value(),
                patch=self.patch_spin.value(),
                brush_size=self.brush_spin.value(),
            )
        except ValueError as exc:
            self._report(str(exc), "error")

"""Qt dock widgets, one module per panel (napari-only; the core never imports this)."""

from napari_pvs._widgets.segment import SegmentPanel
from napari_pvs._widgets.volume import VolumePanel

__all__ = ["SegmentPanel", "VolumePanel"]

"""Qt dock widgets (napari-only; the core never imports this).

``PVSWorkflow`` is the front door (the annotation loop as steps); ``VolumePanel`` and
``SegmentPanel`` stay available on their own from the Plugins menu.
"""

from napari_pvs._widgets.main import PVSWorkflow
from napari_pvs._widgets.segment import SegmentPanel
from napari_pvs._widgets.volume import VolumePanel

__all__ = ["PVSWorkflow", "SegmentPanel", "VolumePanel"]

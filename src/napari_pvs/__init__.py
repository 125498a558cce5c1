"""napari-pvs: segment and annotate perivascular spaces (PVS) in brain MRI.

The core (io, phantom, metrics, models, inference, uncertainty, training, project) never
imports Qt or napari; the widgets in ``_widgets`` and the CLI are thin adapters over it.
"""

__version__ = "0.1.0"

"""Suite-wide test settings.

OpenMP threads that busy-wait make torch 10-20x slower when the 2 CI cores are shared with
another process (a dask worker, napari's event loop); passive waiting costs nothing when idle.
It must be set before torch is first imported, which is why it lives here.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

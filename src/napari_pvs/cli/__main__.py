"""`python -m napari_pvs.cli`: the `napari-pvs` command (also `torchrun -m napari_pvs.cli`)."""

import sys

from napari_pvs.cli import main

sys.exit(main())

"""``python -m napari_pvs.rounds PROJECT ...`` (also under ``torchrun ... -m``): one round."""

import sys

from napari_pvs.rounds.command import main

sys.exit(main())

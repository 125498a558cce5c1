"""The annotation project (see ``project.py``)."""

from napari_pvs.project.project import *  # noqa: F403
from napari_pvs.project.project import _statements  # noqa: F401

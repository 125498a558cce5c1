"""The workflow's one explicit state object, passed to every step (no singletons).

It holds the viewer, the open :class:`napari_pvs.project.Project` (or none), the question
policy (:data:`napari_pvs._widgets._common.Ask`) and the per-project settings, and it is the
one place steps tell each other what changed (signals), so a step never reaches into another.
A standalone panel (from the Plugins menu) gets its own state with no project.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari.layers import Image, Layer
from qtpy.QtCore import QObject, Signal

from napari_pvs._widgets._common import Ask, ask_with_dialog
from napari_pvs._widgets._jobs import keep_activity_indicator_still
from napari_pvs._widgets._layers import layer_source, start_at_affordable_level

if TYPE_CHECKING:
    import napari

    from napari_pvs.project import Project, VolumeRecord

#: Metadata key naming the project volume id a layer shows.
VOLUME_KEY = "project_volume"


def _same_path(a: str | Path | None, b: str | Path | None) -> bool:
    if not a or not b:
        return False
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


class WorkflowState(QObject):
    """The viewer, the open project and what the steps need to agree on."""

    project_changed = Signal()
    volumes_changed = Signal()
    #: a volume's prediction changed (volume id)
    predictions_changed = Signal(int)
    #: a volume's review queue changed (volume id)
    queue_changed = Signal(int)
    #: a volume's candidate answers are saved (volume id; sent once no answer waits any more)
    answers_changed = Signal(int)
    #: model versions changed (a round finished, a roll back)
    versions_changed = Signal()
    settings_changed = Signal()

    def __init__(
        self, viewer: napari.viewer.Viewer, ask: Ask | None = None, parent: QObject | None = None
    ) -> None:
        super().__init__(parent)
        self.viewer = viewer
        keep_activity_indicator_still(viewer)
        self.ask: Ask = ask or ask_with_dialog
        self.project: Project | None = None
        #: PVS counts already computed, by (volume id, model version): Segment fills it, the
        #: Project step shows it
        self.pvs_counts: dict[tuple[int, int], int | None] = {}
        #: volumes a step is predicting right now (id -> what), so two steps never write one
        #: prediction store at once
        self.busy: dict[int, str] = {}
        #: the open project's settings as last read or written here (this window holds the
        #: project's write lock, so nothing else changes them): steps read them on the GUI
        #: thread, where a ledger query waited up to 160 ms behind a worker's write
        self._settings: dict[str, Any] | None = None

    # ---------------------------------------------------------------- project
    def set_project(self, project: Project | None) -> None:
        """Make ``project`` the open one (closing the previous) and tell every step."""
        if self.project is not None and self.project is not project:
            self.project.close()
        self.project = project
        self._settings = None
        self.pvs_counts = {}
        self.project_changed.emit()
        self.volumes_changed.emit()
        self.versions_changed.emit()
        self.settings_changed.emit()

    def claim(self, vid: int, what: str) -> str | None:
        """Mark volume ``vid`` as being predicted by ``what``; returns who holds it, if taken."""
        holder = self.busy.get(vid)
        if holder is not None:
            return holder
        self.busy[vid] = what
        return None

    def release(self, vid: int | None) -> None:
        if vid is not None:
            self.busy.pop(vid, None)

    def close(self) -> None:
        """Release the project (its write lock) when the workflow goes away."""
        if self.project is not None:
            self.project.close()
            self.project = None
            self._settings = None

    def require_project(self) -> Project:
        if self.project is None:
            raise ValueError("no project is open; create or open one in the Project step")
        return self.project

    # ---------------------------------------------------------------- settings
    def settings(self) -> dict[str, Any]:
        """The project's settings over the defaults (the defaults with no project)."""
        if self.project is not None:
            if self._settings is None:
                self._settings = self.project.settings()  # the project's, over its defaults
            return dict(self._settings)
        from napari_pvs.project import DEFAULT_SETTINGS

        return dict(DEFAULT_SETTINGS)

    def update_settings(self, **values: Any) -> None:
        if self.project is not None:
            current = self.settings()
            changed = {k: v for k, v in values.items() if current.get(k) != v}
            if changed:
                self._settings = None  # read back as stored (validated, normalised)
                self.project.update_settings(**changed)
                self.settings_changed.emit()

    # ---------------------------------------------------------------- volumes <-> layers
    def volume_for_layer(self, layer: Layer | None) -> VolumeRecord | None:
        """The project volume an image layer shows (by id in its metadata, else its file)."""
        if self.project is None or not isinstance(layer, Image):
            return None
        volumes = self.project.volumes()
        vid = layer.metadata.get(VOLUME_KEY)
        by_id = next((v for v in volumes if v.id == vid), None)
        if by_id is not None:
            return by_id
        source = layer_source(layer)
        return next((v for v in volumes if _same_path(v.path, source)), None)

    def layer_for_volume(self, volume: VolumeRecord) -> Image | None:
        """The open image layer showing ``volume``, if any."""
        for layer in self.viewer.layers:
            if isinstance(layer, Image) and self.volume_for_layer(layer) == volume:
                return layer
        return None

    def show_volume(self, volume: VolumeRecord) -> Image:
        """The volume's image layer, opened with the napari-pvs reader when it is not open
        (read on the calling thread: for scripts; the Project step reads in its worker with
        :meth:`read_volume_layers` and adds with :meth:`add_volume_layers`)."""
        layer = self.layer_for_volume(volume)
        if layer is None:
            layer = self.add_volume_layers(volume, self.read_volume_layers(volume))
        layer.metadata[VOLUME_KEY] = volume.id
        return layer

    @staticmethod
    def read_volume_layers(volume: VolumeRecord) -> list:
        """The volume's layer data (no Qt: a worker may call it): the store's metadata and
        the contrast limits' sample are read here."""
        from napari_pvs import io
        from napari_pvs._reader import volume_layer_data

        try:
            return volume_layer_data(io.open_volume(volume.path), name=volume.name)
        except (ValueError, FileNotFoundError) as exc:
            raise FileNotFoundError(
                f"{exc} (was the volume moved? add it again from its new place)"
            ) from exc

    def add_volume_layers(self, volume: VolumeRecord, data: list, show: bool = True) -> Image:
        """Add the layers :meth:`read_volume_layers` read (the image, its label images
        hidden); a large volume is shown first at the level
        :func:`start_at_affordable_level` picks. Returns the image layer, hidden unless
        ``show``."""
        # added hidden (not sliced), so the first plane read is the affordable level's
        layers = [
            self.viewer.add_layer(Layer.create(values, {**kwargs, "visible": False}, kind))
            for values, kwargs, kind in data
        ]
        layer = layers[0]
        layer.metadata[VOLUME_KEY] = volume.id
        start_at_affordable_level(self.viewer, layer)
        layer.visible = show
        return layer

"""Project settings: defaults merged with what the user stored in the ledger's ``meta``."""

from __future__ import annotations

import json
from typing import Any

from napari_pvs.project.ledger import Ledger

#: Project settings with their defaults (``settings()`` merges stored values over these).
DEFAULT_SETTINGS: dict[str, Any] = {
    "strategy": "default",  # queue strategy (napari_pvs.ranking.STRATEGIES)
    "n": 20,  # patches per queue
    "patch": 32,  # patch edge in voxels
    # project predictions follow napari-pvs predict's defaults (models.PREDICTION_DEFAULTS):
    "predict_tta": None,  # test-time mirrorings; None: the model's calibrated rule
    "predict_mc": 0,  # MC-dropout samples (0: uncertainty from the mirrorings alone)
    "device": "auto",
    "brush_size": 1,  # the napari Review step's brush, in voxels
    "stop_patience": 2,  # rounds without validation gain before the stopping hint
}


class Settings:
    """The ``setting.*`` keys of the ledger's ``meta`` table."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def settings(self) -> dict[str, Any]:
        stored = self._ledger.meta_with_prefix("setting.")
        return {**DEFAULT_SETTINGS, **stored}

    def update_settings(self, **values: Any) -> dict[str, Any]:
        """Persist settings (known ones are checked; others are kept for the GUI as given)."""
        from napari_pvs import limits
        from napari_pvs.models import FLIP_COUNTS
        from napari_pvs.ranking import STRATEGIES

        checks = {
            "strategy": lambda v: v in STRATEGIES,
            "n": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
            "patch": lambda v: (
                isinstance(v, int) and not isinstance(v, bool) and v >= limits.MIN_PATCH
            ),
            "predict_tta": lambda v: v is None or v in FLIP_COUNTS,
            "predict_mc": lambda v: isinstance(v, int) and v >= 0,
            "device": lambda v: isinstance(v, str) and bool(v),
            "brush_size": lambda v: isinstance(v, int) and v >= 1,
            "stop_patience": lambda v: isinstance(v, int) and v >= 1,
        }
        for key, value in values.items():
            if key == "strategy":
                limits.check_strategy(value, "setting strategy")
            if key in checks and not checks[key](value):
                raise ValueError(f"setting {key}={value!r} is not valid")
            json.dumps(value)
        with self._ledger.transaction() as db:
            for key, value in values.items():
                self._ledger.set_meta(db, f"setting.{key}", value)
            self._ledger.event("settings", values, db)
        return self.settings()

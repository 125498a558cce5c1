"""The core never imports Qt or napari (napari's own model/view rule, checked like its
import-linter contract): every module outside the napari adapters is imported in a fresh
interpreter and the GUI packages must stay out of ``sys.modules``."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import napari_pvs

# The napari adapters: the only modules allowed to pull in Qt or napari.
ADAPTERS = ("napari_pvs._widgets", "napari_pvs._reader", "napari_pvs._writer",
            "napari_pvs._sample_data")
GUI_PACKAGES = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui",
                "superqt", "vispy")


def core_modules() -> list[str]:
    names = [
        info.name
        for info in pkgutil.walk_packages(napari_pvs.__path__, prefix="napari_pvs.")
        if not info.name.startswith(ADAPTERS) and not info.name.endswith(".__main__")
    ]
    return sorted(names)


def test_core_modules_exist_to_check():
    names = core_modules()
    for expected in ("napari_pvs.io", "napari_pvs.inference", "napari_pvs.training",
                     "napari_pvs.cli", "napari_pvs.models.checkpoint"):
        assert expected in names


def test_core_imports_neither_qt_nor_napari():
    code = (
        "import importlib, json, sys\n"
        f"for name in {core_modules()!r}: importlib.import_module(name)\n"
        f"gui = {GUI_PACKAGES!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in gui)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    leaked = json.loads(result.stdout.strip().splitlines()[-1])
    assert leaked == [], f"core modules imported GUI packages: {leaked}"

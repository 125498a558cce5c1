"""The core never imports Qt or napari (napari's own model/view rule, checked like its
import-linter contract): every module outside the napari adapters is imported in a fresh
interpreter and the GUI packages must stay out of ``sys.modules``. And the package's floors
hold: no import points to a higher floor, and top-level modules import one another without a
circle (read from the source with ``ast``)."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

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


# ------------------------------------------------------------------------ floors (no arrow up)

#: The floors of the package, lowest first: a module may import from its own floor (without a
#: circle between top-level modules) or from a lower one, never from a higher one. A new
#: top-level module or package gets a floor here (docs/architecture.md draws the same picture).
FLOORS = {
    "base": ("__init__", "atomic", "progress", "memory", "intensity"),
    "data": ("display", "io", "modality", "phantom", "metrics", "validation", "error_yield"),
    "models": ("models",),
    "compute": ("uncertainty", "inference", "ranking", "candidates", "training", "limits"),
    "workflow": ("project", "rounds", "cohort", "benchmark"),
    "adapters": ("cli", "_widgets", "_reader", "_writer", "_sample_data"),
}
FLOOR_OF = {unit: level for level, units in enumerate(FLOORS.values()) for unit in units}
SRC_ROOT = Path(napari_pvs.__file__).resolve().parent


def top_level_unit(path: Path) -> str:
    """``io/readers.py`` -> ``io``; ``atomic.py`` -> ``atomic``; ``__init__.py`` -> ``__init__``."""
    return path.relative_to(SRC_ROOT).with_suffix("").parts[0]


def imported_units(path: Path) -> set[str]:
    """The top-level napari_pvs units a file imports (absolute imports; relative ones stay
    inside their own unit)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            parts = node.module.split(".")
            if parts[0] != "napari_pvs":
                continue
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from napari_pvs import io, atomic, __version__
                found.update(a.name for a in node.names if (SRC_ROOT / a.name).exists()
                             or (SRC_ROOT / f"{a.name}.py").exists())
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("napari_pvs."))
    return found


def unit_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in SRC_ROOT.rglob("*.py"):
        unit = top_level_unit(path)
        edges.setdefault(unit, set()).update(imported_units(path) - {unit})
    return edges


def test_every_module_has_a_floor():
    assert sorted(set(unit_edges()) - set(FLOOR_OF)) == []


def test_no_module_imports_from_a_higher_floor():
    names = list(FLOORS)
    upward = [
        f"{unit} ({names[FLOOR_OF[unit]]}) imports {other} ({names[FLOOR_OF[other]]})"
        for unit, others in unit_edges().items()
        for other in others
        if FLOOR_OF.get(other, -1) > FLOOR_OF.get(unit, len(names))
    ]
    assert upward == []


def test_no_import_circle_between_top_level_modules():
    edges = unit_edges()
    state: dict[str, str] = {}

    def visit(unit: str, path: list[str]) -> list[str] | None:
        state[unit] = "open"
        for other in sorted(edges.get(unit, ())):
            if state.get(other) == "open":
                return [*path, unit, other]
            if other not in state and (circle := visit(other, [*path, unit])):
                return circle
        state[unit] = "done"
        return None

    for unit in sorted(edges):
        if unit not in state and (circle := visit(unit, [])):
            raise AssertionError(" -> ".join(circle))

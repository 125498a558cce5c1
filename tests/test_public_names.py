"""Every public name the README, the docs and the examples use exists where they say.

The layout may change (issue 16 split modules into packages); what users and the docs import
must not. Two forms are checked: ``from napari_pvs... import a, b`` statements, and backticked
dotted names such as `io.open_volume` or `napari_pvs.models.checkpoint.import_state_dict`.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))

#: Top-level names under ``napari_pvs`` that the documents refer to as modules or packages.
PACKAGES = {
    "atomic", "benchmark", "candidates", "cli", "cohort", "display", "error_yield", "inference",
    "intensity", "io", "memory", "metrics", "models", "phantom", "progress", "project", "ranking",
    "rounds", "training", "uncertainty", "validation",
}
#: Dotted words in the documents that are not Python names (metadata keys, file names).
NOT_NAMES = {"training.modalities"}

IMPORT = re.compile(r"^\s*from (napari_pvs[\w.]*) import \(?([\w, \n]+?)\)?\s*$", re.MULTILINE)
DOTTED = re.compile(r"`(?:napari_pvs\.)?((?:[a-z_]+)(?:\.[A-Za-z_][A-Za-z_0-9]*)+)")


def import_statements() -> list[tuple[str, str, str]]:
    found = []
    for path in DOCUMENTS + EXAMPLES:
        for module, names in IMPORT.findall(path.read_text()):
            for name in (n.strip() for n in names.replace("\n", ",").split(",")):
                if name:
                    found.append((path.name, module, name))
    return sorted(set(found))


def dotted_names() -> list[tuple[str, str]]:
    found = set()
    for path in DOCUMENTS:
        for name in DOTTED.findall(path.read_text()):
            head = name.split(".")[0]
            if head in PACKAGES and name not in NOT_NAMES and not name.endswith(".py"):
                found.add((path.name, name))
    return sorted(found)


def resolve(dotted: str):
    """``io.open_volume`` -> the object; ``project.accept`` falls back to ``Project.accept``
    (the documents name the open project's methods by the lower-case instance)."""
    parts = dotted.split(".")
    obj = importlib.import_module(f"napari_pvs.{parts[0]}")
    for index, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        if hasattr(obj, "__path__"):
            try:
                obj = importlib.import_module(f"{obj.__name__}.{part}")
                continue
            except ModuleNotFoundError:
                pass
        if index == 1 and parts[0] == "project":
            obj = getattr(obj.Project, part)
            continue
        raise AttributeError(f"{'.'.join(parts[:index])} has no {part!r}")
    return obj


def test_the_documents_name_public_things_to_check():
    assert len(import_statements()) >= 5
    assert len(dotted_names()) >= 50


@pytest.mark.parametrize(("document", "module", "name"), import_statements())
def test_documented_imports_work(document, module, name):
    assert hasattr(importlib.import_module(module), name), f"{document}: {module}.{name}"


def test_documented_dotted_names_exist():
    missing = []
    for document, name in dotted_names():
        try:
            resolve(name)
        except (AttributeError, ImportError) as exc:
            missing.append(f"{document}: `{name}` ({exc})")
    assert not missing, "\n".join(missing)

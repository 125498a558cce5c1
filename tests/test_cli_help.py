"""`napari-pvs --help` imports no torch, zarr, dask or scipy; every option shows its default."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from napari_pvs.cli import build_parser

HEAVY = ("torch", "monai", "dask", "zarr", "scipy", "napari", "qtpy")


@pytest.mark.parametrize("command", [[], ["round"], ["frangi"], ["rank"], ["project", "accept"]])
def test_help_in_a_fresh_interpreter_imports_nothing_heavy(command):
    code = (
        "import json, sys\n"
        "from napari_pvs.cli import main\n"
        "try:\n"
        f"    main({[*command, '--help']!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "usage: napari-pvs" in done.stdout
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def _options(parser: argparse.ArgumentParser, name: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from _options(subparser, f"{name} {sub}")
        else:
            yield name, parser, action


def test_every_option_with_a_default_shows_it_in_help():
    missing = []
    for name, parser, action in _options(build_parser(), "napari-pvs"):
        default = action.default
        if (
            not action.option_strings
            or default in (None, argparse.SUPPRESS, "")
            or isinstance(default, bool)
            or (isinstance(default, list | tuple | dict) and not default)
        ):
            continue
        text = parser.format_help()
        start = text.index("\n  " + ", ".join(action.option_strings))  # its entry, not usage
        block = text[start : start + 400].split("\n  -")[1]
        if "default" not in block.lower() and str(default) not in block.replace(" ", ""):
            missing.append(f"{name} {action.option_strings[-1]}")
    assert missing == []


def test_defaults_are_shown_as_typed():
    phantom = build_parser()._subparsers._group_actions[0].choices["phantom"]
    text = " ".join(phantom.format_help().split())
    assert "--shape Z Y X (default: 64 80 64)" in text
    assert "(default: procedural)" in text

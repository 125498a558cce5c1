"""The ``napari-pvs`` command line: a thin adapter over the core, for scripts and clusters.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its arguments and
sets ``func`` to a handler. Handlers parse paths and options, call core functions and print;
they hold no logic of their own. Errors the user can fix are raised as :class:`UserError`
(or ``ValueError``/``FileNotFoundError`` from the core) and printed as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from napari_pvs import __version__


class UserError(Exception):
    """A problem with the command's input that the user can fix; printed without a traceback."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-pvs",
        description="Perivascular space (PVS) segmentation and annotation, headless.",
    )
    parser.add_argument("--version", action="version", version=f"napari-pvs {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


# Subcommands register here, in the order `napari-pvs --help` lists them.
_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"napari-pvs {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"napari-pvs {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

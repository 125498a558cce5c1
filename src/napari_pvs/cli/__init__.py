"""The ``napari-pvs`` command line: a thin adapter over the core, for scripts and clusters.

One module per command group. Each subcommand is one ``add_<name>(subparsers)`` function that
declares its arguments and sets ``func`` to a handler. Handlers parse paths and options, call
core functions and print; they hold no logic of their own. Errors the user can fix are raised
as :class:`UserError` (or ``ValueError``/``FileNotFoundError``/``FileExistsError``/
``PermissionError`` from the core) and printed as one line, exit code 2; so are a damaged
input (:func:`napari_pvs.io.damaged_file_error`, the same mapping the napari reader uses) and a
write the disk refused (full, read-only: :func:`napari_pvs.atomic.os_error_message`). Warnings
of napari-pvs (e.g. labels without any PVS) print as ``napari-pvs CMD: warning: ...``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from collections.abc import Callable, Sequence

from napari_pvs import __version__
from napari_pvs.atomic import Locked, OutputError
from napari_pvs.cli._common import UserError
from napari_pvs.cli.benchmark import add_benchmark
from napari_pvs.cli.gui import add_gui
from napari_pvs.cli.predict import add_predict, add_rank
from napari_pvs.cli.project import add_project
from napari_pvs.cli.rounds import add_round
from napari_pvs.cli.train import add_train
from napari_pvs.cli.volumes import add_convert, add_evaluate, add_frangi, add_phantom

__all__ = ["UserError", "main"]

# Subcommands register here, in the order `napari-pvs --help` lists them.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_convert,
    add_gui,
    add_train,
    add_phantom,
    add_evaluate,
    add_frangi,
    add_predict,
    add_rank,
    add_project,
    add_round,
    add_benchmark,
]


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Ends every option's help with its default, unless the help already says it.

    One rule for every command, so no ``add_<name>`` has to remember ``%(default)s``; empty
    defaults (None, False, "", []) say nothing and are left out.
    """

    def _format_action(self, action: argparse.Action) -> str:
        note = _default_note(action)
        if note and not (action.help or "").strip():  # argparse skips an option without help
            action = copy.copy(action)
            action.help = note
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        note = _default_note(action)
        if not note or note in text:
            return text
        return f"{text} {note}"


def _default_note(action: argparse.Action) -> str:
    """``(default: X)`` for an option whose help does not already name its default, else ""."""
    default = action.default
    text = action.help or ""
    if (
        not action.option_strings
        or text == argparse.SUPPRESS
        or default is argparse.SUPPRESS
        or default is None
        or isinstance(default, bool)
        or (isinstance(default, str | list | tuple | dict) and not default)
        or "default" in text.lower()
        or f"({_shown(default)})" in text
    ):
        return ""
    return "(default: " + _shown(default).replace("%", "%%") + ")"  # the help is %-formatted


def _shown(default: object) -> str:
    """A default as the user would type it: lists space-separated, no quotes."""
    if isinstance(default, list | tuple):
        return " ".join(str(v) for v in default)
    return str(default)


class Parser(argparse.ArgumentParser):
    """The CLI's parser: every (sub)command's ``--help`` shows its defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="napari-pvs",
        description="Perivascular space (PVS) segmentation and annotation, headless.",
    )
    parser.add_argument("--version", action="version", version=f"napari-pvs {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


#: Errors whose message is already the one sentence the user needs.
USER_ERRORS = (
    UserError,
    ValueError,
    Locked,
    OutputError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def error_sentence(exc: BaseException) -> str | None:
    """The one-line message for an error the user can act on, or None for a real bug."""
    if isinstance(exc, USER_ERRORS):
        return str(exc)
    from napari_pvs import atomic, io

    damaged = io.damaged_file_error(None, exc)
    if damaged is not None:
        return str(damaged)
    return atomic.os_error_message(exc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, UserWarning) and category.__module__.startswith("napari_pvs"):
            print(f"napari-pvs {command}: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    original = warnings.showwarning
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            result = args.func(args)
    except KeyboardInterrupt:
        print(f"napari-pvs {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        sentence = error_sentence(exc)
        if sentence is None:
            raise
        print(f"napari-pvs {command}: error: {sentence}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

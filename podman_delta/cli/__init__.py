"""The ``podman-delta`` command line: one thin module per command.

Each command module defines ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed arguments and returning an exit code. Errors are
raised as :class:`podman_delta.errors.DeltaError`; only :func:`main` turns them into one-line
messages and exit codes.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from podman_delta import __version__
from podman_delta.errors import DeltaError

#: Command modules, in the order ``--help`` lists them.
COMMANDS = ("pull", "prefetch", "publish", "create", "apply", "diff", "patch", "changes")

EXIT_CODES_HELP = """\
exit codes:
  0  success
  1  general error
  2  usage error
  3  malformed delta (truncated, bad magic, unknown op, bound exceeded)
  4  a source file is missing, unsafe or too short
  5  digest mismatch (output removed)
  6  delta not smaller than the compressed layer (ship the layer instead)
  7  registry error
  8  containers-storage error
  130 interrupted
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's raw-description formatter, sized without importing shutil.

    argparse builds a formatter for every ``add_argument`` and imports shutil (and with it bz2,
    lzma and zlib, ~2 ms) just to read the terminal width: start-up time of every ``patch``.
    """

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        if width is None:
            width = _terminal_columns() - 2  # as argparse does
        super().__init__(prog, indent_increment, max_help_position, width)


def _terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``: $COLUMNS, else the terminal's, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser with every available command (or just ``only``)."""
    parser = argparse.ArgumentParser(
        prog="podman-delta",
        description="Delta pulls for Podman: fetch only what changed between image versions.",
        epilog=EXIT_CODES_HELP,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="logging verbosity on stderr (default: warning)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        if only is not None and name != only:
            continue
        try:
            module = importlib.import_module(f"podman_delta.cli.{name}")
        except ModuleNotFoundError as exc:  # a command not built yet in this checkout
            if exc.name != f"podman_delta.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def _named_command(argv: list[str]) -> str | None:
    """The command ``argv`` runs, when plain to see: then only its module is imported.

    Importing every command (requests, the registry client, ...) costs ~0.3 s of CPU, as much
    as patching a small layer; ``patch`` needs none of it.
    """
    args = iter(argv)
    for arg in args:
        if arg == "--log-level":
            next(args, None)
        elif not arg.startswith("--log-level="):
            return arg if arg in COMMANDS else None
    return None


def _setup_logging(level: str) -> None:
    """Send log records to stderr, prefixed; without importing logging when nothing logs.

    The command's modules are imported by now. If none of them imported logging (``patch``
    does not: logging costs ~5 ms of a start-up that Go's tar-patch does not have), nothing can
    log, and at the default level there is nothing to set up.
    """
    if level == "warning" and "logging" not in sys.modules:
        return
    import logging

    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="podman-delta: %(levelname)s: %(message)s",
    )


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    parser = build_parser(_named_command(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except DeltaError as exc:
        print(f"podman-delta: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("podman-delta: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except OSError as exc:
        print(f"podman-delta: error: {exc}", file=sys.stderr)
        return 1

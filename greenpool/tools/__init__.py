"""Operational commands of ``python -m greenpool``: checks and sizing for a deployment.

- `greenpool.tools.doctor`: ``python -m greenpool doctor``, what is wrong with the process a
  user runs (gevent patching and import order, the Celery app's pools, the servers).
- `greenpool.tools.plan`: ``python -m greenpool plan``, pool sizes for a fleet of workers
  against a server's ``max_connections`` (with or without PgBouncer).
- `greenpool.tools.soak`: ``python -m greenpool soak``, load and chaos for N minutes, then
  checks that nothing leaked.

Each module's ``add_arguments()`` and ``run()`` are what `greenpool.__main__.COMMANDS` calls.
Bad input on the command line is one line on stderr naming the option, exit status 2
(`one_line_errors`).
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

__all__ = ["USAGE_ERROR", "UsageError", "one_line_errors", "usage_error"]

#: Exit status for bad input (argparse's own).
USAGE_ERROR = 2


class UsageError(Exception):
    """Bad input on the command line; its message names the option."""


def one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Make `parser` report bad input as one line naming the option, without the usage text."""

    def error(message: str) -> NoReturn:
        usage_error(parser.prog, message)

    # An instance attribute shadows ArgumentParser.error, which argparse calls for bad input.
    setattr(parser, "error", error)  # noqa: B010 - assigning to a method, on purpose


def usage_error(prog: str, message: str) -> NoReturn:
    """Print ``prog: error: message`` on one line of stderr and exit with `USAGE_ERROR`."""
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(USAGE_ERROR)

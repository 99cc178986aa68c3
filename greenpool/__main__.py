"""Command line interface: ``python -m greenpool <command> [options]``.

Commands:

``bench``
    Compare greenpool with psycopg_pool, Peewee's playhouse pool and no-pool
    baselines under gevent, on PostgreSQL and (if one answers) MySQL/MariaDB
    (see `greenpool.bench`).

``doctor``
    Check the process, the Celery app and the servers: gevent patching and
    import order, pool sizes against ``max_connections``, PgBouncer (see
    `greenpool.tools.doctor`).

``plan``
    Size the pools of a fleet of workers against a server, direct or behind
    PgBouncer (see `greenpool.tools.plan`).

``soak``
    Load and chaos for N minutes, then check that nothing leaked: file
    descriptors, memory, greenlets, server connections, the pools' accounts
    (see `greenpool.tools.soak`).

A command is a `Command` entry in `COMMANDS`: a name, a help line, a function
adding its options to an argparse sub-parser, and a handler. The handler
imports what the command needs itself, so that each command controls what is
imported when (``bench`` must monkey-patch before psycopg is imported).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .tools import doctor, plan

# Modules that bind threading/socket/select objects when imported: they must be
# imported after `gevent.monkey.patch_all()` to be gevent-aware. greenpool's own
# pool decides at call time (greenpool._compat), so it is not listed.
_PATCH_SENSITIVE = ("psycopg", "psycopg_pool", "peewee", "playhouse", "pymysql")

# Set in the environment of the re-executed process, so it never re-executes.
_REEXEC_GUARD = "GREENPOOL_BENCH_REEXECUTED"


@dataclass(frozen=True)
class Command:
    """A ``python -m greenpool`` sub-command."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Invocation], int]


@dataclass(frozen=True)
class Invocation:
    """How the CLI was called, for commands that need to re-execute it."""

    argv: list[str]
    #: False when `main()` was given argv by other Python code: then the
    #: process is not ours to replace.
    may_reexec: bool


# ---------------------------------------------------------------- bench


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    # Scenario and contender names are not listed here: they live in
    # greenpool.bench, which may only be imported after the monkey-patch.
    # The benchmark checks them (and --list shows them).
    parser.add_argument(
        "--dsn",
        help="libpq connection string of the PostgreSQL server to use "
        "(default: $GREENPOOL_DSN, else a throw-away embedded server)",
    )
    parser.add_argument(
        "--mysql",
        metavar="URL",
        help="mysql://user:password@host:port/database of the MySQL/MariaDB server for the "
        "mysql-* scenarios (default: $GREENPOOL_MYSQL, else mysql://root@127.0.0.1:3306/test "
        "if it answers: without a server there those scenarios are skipped; a URL given "
        "that doesn't answer is an error)",
    )
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="Celery broker URL for the celery scenario's workers, e.g. redis://127.0.0.1:6379/0 "
        "(default: $CELERY_BROKER_URL, else a throw-away filesystem broker: no server needed)",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        metavar="NAME",
        help="run only this scenario, at the run's size (repeatable; default: steady, overhead and "
        "a shorter storm; all with --quick or --full; see --list)",
    )
    parser.add_argument(
        "--contender",
        action="append",
        metavar="NAME",
        help="run only this contender (repeatable; default: all; see --list)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds per scenario, contenders alternating (default: 2, 1 for a storm; 3 with --full; 1 with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one round of scaled-down scenarios, all of them (a smoke test, a few minutes)",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="every scenario and contender at full size, 3 rounds (about twenty-five minutes; "
        "the default run takes about two minutes)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        help="seconds one contender may take for one run (open, warm-up, "
        "timed phase), on top of a fixed-duration scenario's duration "
        "(default: 180)",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="also write every figure to PATH as JSON, with the date, machine and versions",
    )
    parser.add_argument(
        "--plot",
        metavar="PATH",
        help="also draw each contender's ratio to the bound, per scenario, as a PNG bar chart "
        "(needs matplotlib: pip install -e '.[plot]'); with --markdown, from that file",
    )
    parser.add_argument(
        "--markdown",
        metavar="JSON_PATH",
        help="run nothing: print the results saved by --json as a dated Markdown table "
        "(date, machine, versions, then q/s, p99 and ratio per scenario and contender)",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and contenders, and exit")


def _run_bench(args: argparse.Namespace, invocation: Invocation) -> int:
    _patch_gevent_first(invocation)
    # Only now: greenpool.bench imports gevent, psycopg and the pools.
    from greenpool import bench

    return bench.main(args)


def _patch_gevent_first(invocation: Invocation) -> None:
    """Make sure `gevent.monkey.patch_all()` ran before the drivers were imported.

    ``python -m greenpool`` imports ``greenpool/__init__.py`` before this module
    runs, and that may import psycopg or psycopg_pool (which bind unpatched
    threading/select objects at import). If so, re-execute the same command
    under ``python -m gevent.monkey``, which patches before importing anything.
    """
    from gevent import monkey

    if monkey.is_module_patched("socket"):
        return  # already patched first, e.g. by `python -m gevent.monkey`
    early = [name for name in _PATCH_SENSITIVE if name in sys.modules]
    if early and invocation.may_reexec and not os.environ.get(_REEXEC_GUARD):
        print(
            f"note: {', '.join(early)} imported before gevent monkey-patching; "
            "re-running under `python -m gevent.monkey` so the patch comes first",
            file=sys.stderr,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os.environ[_REEXEC_GUARD] = "1"
        os.execv(
            sys.executable,
            [sys.executable, "-m", "gevent.monkey", "--module", "greenpool", *invocation.argv],
        )
    monkey.patch_all()
    if early:
        print(
            f"warning: {', '.join(early)} were imported before gevent monkey-patching;"
            " their contenders may block the event loop",
            file=sys.stderr,
        )


# ---------------------------------------------------------------- soak


def _soak_arguments(parser: argparse.ArgumentParser) -> None:
    # The module imports nothing patch-sensitive at the top: safe before the patch.
    from greenpool.tools import soak

    soak.add_arguments(parser)


def _run_soak(args: argparse.Namespace, invocation: Invocation) -> int:
    _patch_gevent_first(invocation)
    from greenpool.tools import soak

    return soak.main(args)


# ---------------------------------------------------------------- CLI

COMMANDS: tuple[Command, ...] = (
    Command(
        name="bench",
        help="benchmark greenpool against psycopg_pool, playhouse.pool and no-pool baselines under gevent",
        add_arguments=_bench_arguments,
        run=_run_bench,
    ),
    Command(
        name="doctor",
        help="check gevent patching and import order, a Celery app's pools, and the servers they use",
        add_arguments=doctor.add_arguments,
        run=doctor.run,
    ),
    Command(
        name="plan",
        help="size the pools of a fleet of workers against a server's max_connections (or PgBouncer)",
        add_arguments=plan.add_arguments,
        run=plan.run,
    ),
    Command(
        name="soak",
        help="load and chaos for N minutes, then check that nothing leaked (fds, memory, greenlets, connections)",
        add_arguments=_soak_arguments,
        run=_run_soak,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with one sub-parser per `COMMANDS` entry."""
    parser = argparse.ArgumentParser(
        prog="python -m greenpool",
        description="greenpool command line tools",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sub_parser = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub_parser)
        sub_parser.set_defaults(_command=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit status.

    With `argv` None the arguments come from `sys.argv` and a command may
    re-execute the process; with an explicit `argv` (a caller in Python) it
    never does.
    """
    invocation = Invocation(
        argv=list(sys.argv[1:] if argv is None else argv),
        may_reexec=argv is None,
    )
    args = build_parser().parse_args(invocation.argv)
    command: Command = args._command
    return command.run(args, invocation)


if __name__ == "__main__":
    sys.exit(main())

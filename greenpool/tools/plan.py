"""Pool sizes for a fleet of Celery workers: ``python -m greenpool plan`` (see docs/sizing.md).

The formula (`plan_pools()`), for W worker processes of concurrency C against a server
accepting M connections, R of them kept for others:

- processes with pools of their own: ``P = W`` (gevent, threads), ``P = W x C`` (prefork:
  each child has its own pools);
- connections one process can use at once: ``D = C`` (gevent, threads), ``D = 1`` (prefork);
- connections the workers may use: ``A = M - R``; R covers ``superuser_reserved_connections``
  (and PostgreSQL 16's ``reserved_connections``) and every other client (migrations, cron,
  consoles, monitoring); default ``max(3, ceil(M / 10))``.

Direct to the server, each process's ``max_size = min(D, A // P)``: the fleet opens at most
``P x max_size <= A``. When ``A // P`` is 0 even one connection per process is too many: the
plan fails (put PgBouncer in between, or run fewer processes).

Behind PgBouncer in transaction mode, client connections are cheap and server connections are
shared at transaction boundaries: ``max_size = D``, PgBouncer's ``max_client_conn = P x D + R``
(room for the same other clients) and ``default_pool_size = min(A, W x C)`` (the server never
needs more than the tasks running at once).

With ``max_size`` given, the plan checks it instead: ``P x max_size`` must stay within A
(direct) or is what ``max_client_conn`` must hold (PgBouncer).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from . import UsageError, one_line_errors, usage_error

__all__ = [
    "TASK_POOLS",
    "Plan",
    "add_arguments",
    "connections_at_once",
    "default_reserved",
    "plan_pools",
    "planned_connections",
    "processes_per_worker",
    "run",
]

#: The task pools `plan_pools()` knows (Celery's `-P`).
TASK_POOLS = ("gevent", "prefork", "threads")

_PROG = "python -m greenpool plan"


def processes_per_worker(task_pool: str, concurrency: int) -> int:
    """Processes with pools of their own in one worker: its `concurrency` children under prefork, else 1."""
    return concurrency if task_pool in ("prefork", "processes") else 1


def connections_at_once(task_pool: str, concurrency: int) -> int:
    """Connections of a pool one process can use at once: 1 per prefork child (and solo), else `concurrency`."""
    return 1 if task_pool in ("prefork", "processes", "solo") else concurrency


def planned_connections(task_pool: str, concurrency: int, max_sizes: list[int]) -> int:
    """Connections one worker's pools may open: `concurrency` x the sum of `max_sizes` under prefork, else the sum."""
    return processes_per_worker(task_pool, concurrency) * sum(max_sizes)


def default_reserved(server_max_connections: int) -> int:
    """Connections kept for others when not told: a tenth of the server's, at least 3 (PostgreSQL's superusers')."""
    return max(3, math.ceil(server_max_connections / 10))


@dataclass(frozen=True)
class Plan:
    """The sizes `plan_pools()` found, and what is wrong with them."""

    workers: int
    concurrency: int
    task_pool: str
    server_max_connections: int
    reserved: int
    pgbouncer: bool
    #: Processes with pools of their own, over all workers.
    processes: int
    #: Connections one process can use at once.
    at_once: int
    #: Connections the workers may use on the server: max_connections minus reserved.
    available: int
    #: Each process's pool `max_size` (Peewee: `max_connections`).
    max_size: int
    #: Connections all processes may open: to the server, or to PgBouncer.
    client_connections: int
    #: Connections the fleet may take on the server.
    server_connections: int
    #: PgBouncer's settings (None without PgBouncer).
    default_pool_size: int | None = None
    max_client_conn: int | None = None
    #: Totals exceeding the server: the plan doesn't work.
    problems: list[str] = field(default_factory=list)
    #: Worth knowing, but not wrong.
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the totals fit the server."""
        return not self.problems

    def lines(self) -> list[str]:
        """The plan, as ``python -m greenpool plan`` prints it."""
        per = " (prefork: one per child)" if self.task_pool == "prefork" else ""
        out = [
            f"workers: {self.workers} {self.task_pool} worker process(es) of concurrency {self.concurrency}:"
            f" {self.processes} process(es) with pools{per}, {self.workers * self.concurrency} tasks at once",
            f"server: max_connections {self.server_max_connections}, {self.reserved} reserved (superusers and"
            f" other clients): {self.available} for the workers",
        ]
        if self.pgbouncer:
            out += [
                "behind PgBouncer (pool_mode = transaction):",
                f"  max_size = {self.max_size}  (each process's pool; Peewee: max_connections)",
                f"  max_client_conn = {self.max_client_conn}  (PgBouncer: {self.processes} x {self.max_size}"
                f" client connections + {self.reserved})",
                f"  default_pool_size = {self.default_pool_size}  (PgBouncer: server connections per database"
                " and user)",
                f"  totals: {self.client_connections} client connections to PgBouncer,"
                f" {self.server_connections} on the server (of {self.available})",
            ]
        else:
            out += [
                "direct to the server:",
                f"  max_size = {self.max_size}  (each process's pool; Peewee: max_connections)",
                f"  total: {self.processes} x {self.max_size} = {self.client_connections} connections"
                f" (of {self.available})",
            ]
        out += [f"note: {note}" for note in self.notes]
        out += [f"warn: {problem}" for problem in self.problems]
        return out


def _whole(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def plan_pools(
    workers: int,
    concurrency: int,
    server_max_connections: int,
    *,
    task_pool: str = "gevent",
    pgbouncer: bool = False,
    reserved: int | None = None,
    max_size: int | None = None,
) -> Plan:
    """Size the pools of `workers` worker processes of `concurrency` against one server.

    `task_pool` is "gevent", "prefork" or "threads"; `pgbouncer` plans for
    PgBouncer in transaction mode in front of the server; `reserved`
    (default `default_reserved()`) is what the server keeps for superusers
    and other clients; `max_size`, if given, is checked instead of computed.
    See the module docstring for the formula. Raises TypeError/ValueError,
    naming the parameter, for bad input.
    """
    workers = _whole("workers", workers, 1)
    concurrency = _whole("concurrency", concurrency, 1)
    server_max_connections = _whole("server_max_connections", server_max_connections, 1)
    if task_pool not in TASK_POOLS:
        raise ValueError(f"task_pool must be one of {', '.join(TASK_POOLS)}, got {task_pool!r}")
    if reserved is None:
        reserved = default_reserved(server_max_connections)
    reserved = _whole("reserved", reserved, 0)
    if reserved >= server_max_connections:
        raise ValueError(f"reserved must be below server_max_connections ({server_max_connections}), got {reserved!r}")
    if max_size is not None:
        max_size = _whole("max_size", max_size, 1)

    processes = workers * processes_per_worker(task_pool, concurrency)
    at_once = connections_at_once(task_pool, concurrency)
    available = server_max_connections - reserved
    tasks = workers * concurrency
    problems: list[str] = []
    notes: list[str] = []
    given = max_size is not None
    if max_size is not None and max_size > at_once:
        notes.append(
            f"max_size {max_size} is more than a process uses at once ({at_once}): max_size = {at_once} is enough"
        )

    default_pool_size: int | None = None
    max_client_conn: int | None = None
    if pgbouncer:
        size = max_size if max_size is not None else at_once
        clients = processes * size
        server = default_pool_size = min(available, tasks)
        max_client_conn = clients + reserved
        if tasks > default_pool_size:
            notes.append(
                f"up to {tasks} tasks share {default_pool_size} server connections: transactions queue in"
                " PgBouncer (query_wait_timeout, 120 s by default); keep them short"
            )
        notes.append(
            "with several databases or users, divide default_pool_size among the pairs; with a PgBouncer per"
            " machine, divide it among the PgBouncers; PgBouncer's file limit must exceed max_client_conn"
            " plus its server connections"
        )
    else:
        if max_size is not None:
            size = max_size
        else:
            size = min(at_once, available // processes)
            if size < 1:
                size = 1
        clients = server = processes * size
        if clients > available:
            if given:
                fix = f"lower max_size to {available // processes}" if available >= processes else "lower max_size"
            else:
                fix = "even one connection per process is too many"
            problems.append(
                f"{processes} process(es) x max_size {size} = {clients} connections exceed the {available} the"
                f" server allows the workers (max_connections {server_max_connections} - {reserved} reserved): {fix};"
                " put PgBouncer in between (--pgbouncer), run fewer processes, or raise max_connections"
            )
        elif size < at_once:
            notes.append(
                f"each process's {at_once} tasks share {size} connection(s): tasks wait (FIFO) when more hold one"
                " at once; fine for short queries between other work, else put PgBouncer in between (--pgbouncer)"
            )
    return Plan(
        workers,
        concurrency,
        task_pool,
        server_max_connections,
        reserved,
        bool(pgbouncer),
        processes,
        at_once,
        available,
        size,
        clients,
        server,
        default_pool_size=default_pool_size,
        max_client_conn=max_client_conn,
        problems=problems,
        notes=notes,
    )


# ---------------------------------------------------------------- CLI


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``plan``'s options to its sub-parser."""
    one_line_errors(parser)
    parser.add_argument(
        "--workers",
        type=_count(1),
        metavar="W",
        help="worker processes over all machines (`celery worker` commands; e.g. 4 machines x 2 = 8)",
    )
    parser.add_argument("--concurrency", "-c", type=_count(1), metavar="C", help="each worker's -c")
    parser.add_argument(
        "--server-max-connections",
        type=_count(1),
        metavar="M",
        help="the server's max_connections (PostgreSQL: SHOW max_connections)",
    )
    parser.add_argument(
        "--pool",
        "-P",
        choices=TASK_POOLS,
        default="gevent",
        help="the workers' task pool (default: gevent); prefork children have pools of their own",
    )
    parser.add_argument(
        "--pgbouncer",
        action="store_true",
        help="plan for PgBouncer in transaction mode between the workers and the server",
    )
    parser.add_argument(
        "--reserved",
        type=_count(0),
        metavar="R",
        help="connections kept for superusers and other clients (migrations, cron, consoles);"
        " default: a tenth of M, at least 3",
    )
    parser.add_argument(
        "--max-size",
        type=_count(1),
        metavar="N",
        help="check this per-process max_size instead of computing one",
    )


def run(args: argparse.Namespace, invocation: object = None) -> int:
    """Run ``plan``: print the sizes; exit status 1 when the totals exceed the server, 2 for bad input."""
    try:
        for option, value in (
            ("--workers", args.workers),
            ("--concurrency", args.concurrency),
            ("--server-max-connections", args.server_max_connections),
        ):
            if value is None:
                raise UsageError(f"{option} is required")
        if args.reserved is not None and args.reserved >= args.server_max_connections:
            raise UsageError(
                f"--reserved must be below --server-max-connections ({args.server_max_connections}),"
                f" got {args.reserved}"
            )
    except UsageError as ex:
        usage_error(_PROG, str(ex))
    result = plan_pools(
        args.workers,
        args.concurrency,
        args.server_max_connections,
        task_pool=args.pool,
        pgbouncer=args.pgbouncer,
        reserved=args.reserved,
        max_size=args.max_size,
    )
    for line in result.lines():
        print(line)
    return 0 if result.ok else 1

"""A soak that proves nothing leaks: ``python -m greenpool soak --minutes N``.

Hundreds of greenlets run short transactions through a `greenpool.ConnectionPool`
and a Peewee `PooledPostgresqlDatabase`, both through a fault-injection `Proxy`
and with lifetimes of a few seconds, while chaos strikes at random intervals:
`gevent.Timeout` cuts queries in flight (inside `connection()` blocks and
Peewee `atomic()`), `greenlet.kill()` of greenlets holding connections (as
Celery's revoke), `pg_terminate_backend()` of random pool backends, dropped
proxied connections and short outages. After the load stops and the pools
settle, the process must be back where it was after warm-up: open file
descriptors, threads, live greenlets, pool sizes, server connections, memory
(RSS and `tracemalloc`, within tolerances), and every connection the pools ever
made must be accounted for (see `accounting_problems`). The exit status is 1
if any check fails, each failure named. docs/soak.md has the method and a
10-minute run's figures.

The phases: *warm-up* (load, each kind of chaos once, calm), stop and settle,
*baseline*; *soak* (load and random chaos for ``--minutes``); *calm* (load
without chaos: a grace, then a window that must have no error); stop and
settle, *final* figures and checks; close the pools, *closed* checks.

The CLI monkey-patches gevent before this module's `main()` runs; everything
that binds threading or socket objects (gevent, psycopg, peewee, the pools) is
imported inside functions, so the CLI may import this module for its options
first. The figures and checks (`PoolFigures`, `Snapshot`, `evaluate`, ...) are
plain functions of numbers, tested without a server.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

#: Environment variable holding the DSN, as for the benchmark.
DSN_ENV = "GREENPOOL_DSN"
#: Prefix of the soak's application_name on the server (then the pid, then the pool).
APP_PREFIX = "greenpool-soak"

# -- the pools ----------------------------------------------------------------

#: The psycopg pool's sizes.
PG_MIN, PG_MAX = 4, 16
#: The Peewee database's `min_connections` and `max_connections`.
PEEWEE_MIN, PEEWEE_MAX = 2, 12
#: Default `max_lifetime` / `stale_timeout`, seconds: connections are replaced all along.
LIFETIME = 4.0
#: `max_idle`, seconds: after the load stops, the pools shrink back to their minimum.
MAX_IDLE = 2.0
#: Seconds a request may wait for a connection (psycopg `timeout`, Peewee `timeout`).
REQUEST_TIMEOUT = 10.0

# -- the load -----------------------------------------------------------------

#: A transaction: this, then `WORK_SQL` (or `SLOW_SQL` when a timeout is due).
FIRST_SQL = "select %s::int"
#: The second statement, sleeping `THINK` seconds on the server at most.
WORK_SQL = "select pg_sleep(%s)"
THINK = 0.004
#: What a timeout cuts: it runs far longer than any timeout the chaos sets.
SLOW_SQL = "select pg_sleep(0.5)"
#: A greenlet whose transaction failed pauses this long (at most) before its
#: next one, so that an outage's fail-fast errors don't spin the CPU.
ERROR_PAUSE = 0.05

# -- the chaos ----------------------------------------------------------------

#: Mean seconds between two events of each kind (exponential intervals).
CHAOS_MEAN_INTERVAL: dict[str, float] = {
    "timeout": 1.0,  # 1-4 greenlets' next transaction cut by a gevent.Timeout
    "kill": 1.0,  # 1-3 greenlets holding a connection killed (GreenletExit)
    "terminate": 2.0,  # 1-2 random pool backends: pg_terminate_backend()
    "drop": 10.0,  # proxy.kill_connections(): every pooled connection breaks
    "outage": 15.0,  # proxy.pause() for OUTAGE seconds: connects refused
}
#: The event counted for each kind of chaos: a struck greenlet or backend, or the event itself.
CHAOS_EVENTS: dict[str, str] = {
    "timeout": "timeout-set",
    "kill": "kill",
    "terminate": "terminate",
    "drop": "drop",
    "outage": "outage",
}
#: Shortest and longest timeout set on a transaction, seconds.
CUT_AFTER = (0.005, 0.05)
#: Shortest and longest outage, seconds.
OUTAGE = (0.2, 1.5)

# -- phases -------------------------------------------------------------------

#: Seconds of load before the warm-up's chaos, and between its events.
WARMUP_STEP = 1.0
#: After the chaos stops: seconds of load not looked at, then seconds that must have no error.
CALM_GRACE, CALM_WINDOW = 3.0, 3.0
#: Seconds the load greenlets get to finish their transaction when asked to stop.
STOP_TIMEOUT = REQUEST_TIMEOUT + 5.0
#: Seconds between two looks while waiting for the pools to settle.
SETTLE_POLL = 0.2

# -- tolerances ---------------------------------------------------------------

#: Open file descriptors, live greenlets and threads: back to the baseline exactly.
FD_TOLERANCE = 0
GREENLET_TOLERANCE = 0
THREAD_TOLERANCE = 0
#: Growth of the memory `tracemalloc` traces (the soak's own module, the import
#: system and tracemalloc left out): caches filled once, interned strings and
#: the like. A leak of one small object per transaction is far more.
TRACED_TOLERANCE = 1024 * 1024
#: Growth of the resident set: the allocator keeps freed pages and arenas at
#: its discretion, so only a gross leak shows here (tracemalloc is the fine one).
RSS_TOLERANCE = 8 * 1024 * 1024

#: Distinct messages kept for each kind of error.
EXAMPLES = 3
#: Lines of the tracemalloc comparison shown in the report.
TOP_ALLOCATIONS = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``soak`` command's options to `parser`."""
    parser.add_argument(
        "--minutes",
        type=float,
        default=1.0,
        help="length of the soak proper, load and chaos, in minutes (fractions allowed; default 1);"
        " warm-up, calm and settling add about half a minute",
    )
    parser.add_argument(
        "--greenlets",
        type=int,
        default=300,
        help="greenlets running transactions (default 300)",
    )
    parser.add_argument(
        "--dsn",
        help="libpq connection string of the PostgreSQL server to use "
        f"(default: ${DSN_ENV}, else a throw-away embedded server)",
    )
    parser.add_argument(
        "--lifetime",
        type=float,
        default=LIFETIME,
        help=f"the pools' max_lifetime / stale_timeout in seconds (default {LIFETIME:g})",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=5.0,
        help="seconds between progress lines (default 5)",
    )
    parser.add_argument(
        "--settle-timeout",
        type=float,
        default=60.0,
        help="seconds the pools get to settle after the load stops, and to close (default 60)",
    )
    parser.add_argument("--seed", type=int, help="seed of the chaos's random choices (default: drawn, and printed)")
    parser.add_argument("--no-chaos", action="store_true", help="load only: no timeouts, kills, drops or outages")
    parser.add_argument("--verbose", action="store_true", help="print the pools' log records (warnings) to stderr")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH as JSON")


# =============================================================================
# Figures and checks: plain functions of numbers
# =============================================================================


@dataclass
class Tally:
    """Connections of one pool, counted by the soak, not by the pool.

    `made`: connections created (a `GeventConnection` constructed once its
    connect succeeded; Peewee's `_connect()` returned). `closed`: those whose
    `close()` the pool called, each counted once.
    """

    made: int = 0
    closed: int = 0


@dataclass(frozen=True)
class PoolFigures:
    """One pool at one moment: its stats, the soak's tally, the server's count."""

    name: str
    min_size: int
    #: `get_stats()`: connect attempts, and those that failed.
    connections_num: int
    connections_errors: int
    #: `get_stats()`: connections held (idle or lent, or being made), idle, requests queued.
    pool_size: int
    pool_available: int
    requests_waiting: int
    #: `Tally`.
    made: int
    closed: int
    #: Backends with the pool's application_name in pg_stat_activity.
    server: int

    @property
    def stats_made(self) -> int:
        """Connections made, by the pool's stats: `connections_num - connections_errors`."""
        return self.connections_num - self.connections_errors

    @property
    def open(self) -> int:
        """Connections made and not closed, by the soak's tally."""
        return self.made - self.closed

    def connection_fields(self) -> tuple[int, ...]:
        """What a connect or a close changes (`server` aside): equal twice, nothing happened between."""
        return (
            self.connections_num,
            self.connections_errors,
            self.pool_size,
            self.pool_available,
            self.requests_waiting,
            self.made,
            self.closed,
        )


def accounting_problems(pool: PoolFigures) -> list[str]:
    """What breaks the accounting identity of an open, quiet pool (empty: it holds).

    The identity, when no connect or close is under way::

        connections_num - connections_errors   (connects that succeeded, by the pool's stats)
          = made                               (connections created, by the soak's count)
          = closed + pool_size                 (closed by the pool, plus those it holds)
        and pool_size = server                 (backends with the pool's application_name)

    A connection the pool lost track of (neither closed nor held), or closed
    without counting it, or holds without the server having it, breaks it.
    """
    problems = []
    if pool.stats_made != pool.made:
        problems.append(
            f"{pool.name}: its stats say {pool.stats_made} connections were made"
            f" ({pool.connections_num} attempts - {pool.connections_errors} failed), the soak counted {pool.made}"
        )
    if pool.made != pool.closed + pool.pool_size:
        problems.append(
            f"{pool.name}: {pool.made} made != {pool.closed} closed + {pool.pool_size} held"
            f" ({pool.made - pool.closed - pool.pool_size:+d} unaccounted for)"
        )
    if pool.server != pool.pool_size:
        problems.append(f"{pool.name}: the server has {pool.server} connections, the pool holds {pool.pool_size}")
    return problems


def closed_problems(pool: PoolFigures) -> list[str]:
    """What is wrong with a pool after its `close()`: every connection closed, none on the server."""
    problems = []
    if pool.stats_made != pool.made:
        problems.append(f"{pool.name}: its stats say {pool.stats_made} connections were made, the soak {pool.made}")
    if pool.closed != pool.made:
        problems.append(f"{pool.name}: {pool.made} made but {pool.closed} closed ({pool.open} never closed)")
    if pool.server:
        problems.append(f"{pool.name}: the server still has {pool.server} connections")
    return problems


def size_problems(pool: PoolFigures, baseline: PoolFigures | None = None) -> list[str]:
    """What keeps a pool from being settled: its baseline size (else its minimum), all idle, none waiting."""
    want = pool.min_size if baseline is None else baseline.pool_size
    problems = []
    if pool.pool_size != want:
        problems.append(f"{pool.name}: holds {pool.pool_size} connections, not {want}")
    if pool.pool_available != pool.pool_size:
        problems.append(f"{pool.name}: {pool.pool_size - pool.pool_available} connections not idle")
    if pool.requests_waiting:
        problems.append(f"{pool.name}: {pool.requests_waiting} requests waiting")
    return problems


@dataclass(frozen=True)
class Snapshot:
    """The process and its pools at one moment (`None`: not measurable here)."""

    elapsed: float
    fds: int | None
    threads: int | None
    greenlets: int
    rss: int | None
    pools: tuple[PoolFigures, ...]
    #: Connections open through the proxy, all pools together.
    proxy_active: int | None

    def pool(self, name: str) -> PoolFigures:
        """The figures of the pool called `name`."""
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(name)


def proxy_problems(snap: Snapshot) -> list[str]:
    """The proxy must relay exactly the connections the pools hold."""
    held = sum(p.pool_size for p in snap.pools)
    if snap.proxy_active is not None and snap.proxy_active != held:
        return [f"the proxy relays {snap.proxy_active} connections, the pools hold {held}"]
    return []


def _back_to(what: str, now: int | None, before: int | None, tolerance: int) -> list[str]:
    if now is None or before is None or now - before <= tolerance:
        return []
    return [f"{what}: {now}, {now - before:+d} since the baseline ({before}; tolerance {tolerance})"]


def process_problems(snap: Snapshot, baseline: Snapshot) -> dict[str, list[str]]:
    """File descriptors, threads and greenlets against the baseline, by check name."""
    return {
        "fds": _back_to("open file descriptors", snap.fds, baseline.fds, FD_TOLERANCE),
        "threads": _back_to("threads", snap.threads, baseline.threads, THREAD_TOLERANCE),
        "greenlets": _back_to("live greenlets", snap.greenlets, baseline.greenlets, GREENLET_TOLERANCE),
    }


def settle_problems(snap: Snapshot, baseline: Snapshot | None = None) -> dict[str, list[str]]:
    """Every problem keeping `snap` from being settled, by check name (all lists empty: settled).

    Without a baseline (taking it): each pool at its minimum size, all idle,
    accounted for, and the proxy relaying what they hold. With one: the same
    against the baseline's sizes, plus fds, threads and greenlets back to it.
    """
    problems: dict[str, list[str]] = {
        "pool-sizes": [],
        "server-connections": [],
        "accounting": [],
    }
    for pool in snap.pools:
        problems["pool-sizes"] += size_problems(pool, None if baseline is None else baseline.pool(pool.name))
        for problem in accounting_problems(pool):
            key = "server-connections" if "the server has" in problem else "accounting"
            problems[key].append(problem)
    problems["server-connections"] += proxy_problems(snap)
    if baseline is not None:
        problems.update(process_problems(snap, baseline))
    return problems


@dataclass(frozen=True)
class MemoryFigures:
    """Memory at the baseline and at the end (after a full garbage collection each time)."""

    rss_before: int | None
    rss_after: int | None
    traced_before: int
    traced_after: int
    #: The lines whose traced memory grew most: (file:line, bytes, blocks).
    top: tuple[tuple[str, int, int], ...] = ()

    @property
    def traced_growth(self) -> int:
        """Bytes traced at the end minus at the baseline."""
        return self.traced_after - self.traced_before

    @property
    def rss_growth(self) -> int | None:
        """RSS bytes at the end minus at the baseline, if measurable."""
        if self.rss_before is None or self.rss_after is None:
            return None
        return self.rss_after - self.rss_before


def memory_problems(memory: MemoryFigures) -> dict[str, list[str]]:
    """Traced memory and RSS growth against their tolerances, by check name."""
    problems: dict[str, list[str]] = {"traced-memory": [], "rss": []}
    if memory.traced_growth > TRACED_TOLERANCE:
        problems["traced-memory"].append(
            f"traced memory grew by {_size(memory.traced_growth)} (tolerance {_size(TRACED_TOLERANCE)})"
        )
    growth = memory.rss_growth
    if growth is not None and growth > RSS_TOLERANCE:
        problems["rss"].append(f"RSS grew by {_size(growth)} (tolerance {_size(RSS_TOLERANCE)})")
    return problems


@dataclass(frozen=True)
class LoadFigures:
    """How the load went, for the `load` and `recovery` checks."""

    #: Transactions committed during the soak proper, by pool.
    soak_transactions: dict[str, int]
    #: Transactions committed, and errors, in the calm window, by pool.
    calm_transactions: dict[str, int]
    calm_errors: dict[str, int]
    #: Load greenlets still running when told to stop, after `STOP_TIMEOUT`.
    stragglers: int
    #: Load greenlets ended by an exception the soak didn't raise (a timeout not its own...).
    crashes: int = 0
    #: Events of each kind of chaos, all phases (`CHAOS_EVENTS`); None: no chaos asked for.
    chaos: dict[str, int] | None = None
    #: Connections found closed as soon as lent, by pool.
    lent_closed: dict[str, int] | None = None


def load_problems(load: LoadFigures) -> dict[str, list[str]]:
    """The load ran on every pool and stopped when told; it recovered once the chaos stopped."""
    problems: dict[str, list[str]] = {"load": [], "recovery": []}
    for name, done in sorted(load.soak_transactions.items()):
        if not done:
            problems["load"].append(f"{name}: no transaction committed during the soak")
    if load.stragglers:
        problems["load"].append(f"{load.stragglers} greenlets were still running {STOP_TIMEOUT:g} s after the stop")
    if load.crashes:
        problems["load"].append(f"{load.crashes} greenlets died of an exception the soak didn't raise")
    for name, n in sorted((load.lent_closed or {}).items()):
        if n:
            problems["load"].append(f"{name}: lent {n} connections already closed")
    if load.chaos is not None:
        missed = [kind for kind in CHAOS_EVENTS if not load.chaos.get(kind)]
        if missed:
            problems["load"].append(f"chaos that never struck: {', '.join(missed)}")
    for name, done in sorted(load.calm_transactions.items()):
        if not done:
            problems["recovery"].append(f"{name}: no transaction committed in the calm window")
        errors = load.calm_errors.get(name, 0)
        if errors:
            problems["recovery"].append(f"{name}: {errors} errors in the calm window")
    return problems


@dataclass(frozen=True)
class Check:
    """One named check of the report."""

    name: str
    ok: bool
    detail: str


#: The checks, in report order, and what each verifies.
CHECKS: dict[str, str] = {
    "baseline": "after warm-up the pools settled at their minimum sizes, accounted for",
    "load": "the load committed transactions on both pools, was never lent a closed connection, and stopped"
    " when told; every kind of chaos struck",
    "recovery": "once the chaos stopped, both pools served transactions without an error",
    "pool-sizes": "each pool back to its baseline size, every connection idle, no request waiting",
    "server-connections": "pg_stat_activity has exactly the connections each pool holds; so has the proxy",
    "accounting": "connections_num - connections_errors = made = closed + held, for each pool",
    "fds": "open file descriptors back to the baseline",
    "threads": "threads back to the baseline",
    "greenlets": "live greenlets back to the baseline",
    "traced-memory": "tracemalloc's traced memory within tolerance of the baseline",
    "rss": "resident set size within tolerance of the baseline",
    "closed": "after close(): every connection made was closed, none left on the server or the proxy",
}


def evaluate(problems: dict[str, list[str]], passed: dict[str, str] | None = None) -> list[Check]:
    """One `Check` per name of `CHECKS`: failed with its problems, else passed (with `passed`'s detail).

    A name missing from `problems` fails as "not measured": every check
    must have been looked at.
    """
    checks = []
    for name in CHECKS:
        if name not in problems:
            checks.append(Check(name, False, "not measured"))
        elif problems[name]:
            checks.append(Check(name, False, "; ".join(problems[name])))
        else:
            checks.append(Check(name, True, (passed or {}).get(name, "ok")))
    return checks


def _size(n: float) -> str:
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# =============================================================================
# The process
# =============================================================================


def open_fds() -> int | None:
    """Open file descriptors of this process (/proc/self/fd, less the one listing it), or None."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1
    except OSError:
        return None


def thread_count() -> int | None:
    """OS threads of this process (/proc/self/task), or None."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def rss_bytes() -> int | None:
    """Resident set size of this process (/proc/self/statm), or None."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def live_greenlets() -> int:
    """Greenlets of this process that have not finished, found through the garbage collector."""
    from greenlet import greenlet

    return sum(1 for obj in gc.get_objects() if isinstance(obj, greenlet) and not obj.dead)


def _traced_filters() -> list[tracemalloc.Filter]:
    import importlib
    import linecache

    return [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, linecache.__file__),
        tracemalloc.Filter(False, __file__),  # the soak's own figures and counters
        tracemalloc.Filter(False, importlib.__file__.replace("__init__.py", "*")),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
        tracemalloc.Filter(False, "<unknown>"),
    ]


def traced_snapshot() -> tracemalloc.Snapshot:
    """tracemalloc's snapshot after a full collection, less the soak's and the import system's own."""
    gc.collect()
    return tracemalloc.take_snapshot().filter_traces(_traced_filters())


def traced_total(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes traced in `snapshot`."""
    return sum(stat.size for stat in snapshot.statistics("filename"))


def compare_traced(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, top: int) -> list[tuple[str, int, int]]:
    """The `top` lines whose traced memory grew most: (file:line, bytes, blocks)."""
    stats = after.compare_to(before, "lineno")
    grown = sorted((s for s in stats if s.size_diff > 0), key=lambda s: s.size_diff, reverse=True)[:top]
    rows = []
    for stat in grown:
        frame = stat.traceback[0]
        rows.append((f"{_short_path(frame.filename)}:{frame.lineno}", stat.size_diff, stat.count_diff))
    return rows


def _short_path(path: str) -> str:
    for marker in ("/site-packages/", "/greenpool/", "/lib/python"):
        i = path.rfind(marker)
        if i >= 0:
            return path[i + 1 :]
    return path


# =============================================================================
# The pools under test
# =============================================================================


class Subject:
    """A pool under test: its transactions, stats and tally."""

    name: str
    app: str
    tally: Tally
    min_size: int

    def stats(self) -> dict[str, int]:
        """The pool's `get_stats()`."""
        raise NotImplementedError

    def transaction(self, n: int, slow: bool, start_cut: Callable[[], None], hold: Callable[[Any], None]) -> int:
        """Run one transaction; return the statements run.

        `slow`: the second statement is `SLOW_SQL`, after calling `start_cut()`
        (which may do nothing: the cut was started before). `hold(conn)` once
        a connection is held, `hold(None)` once not.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Close the pool."""
        raise NotImplementedError

    def figures(self, server: int) -> PoolFigures:
        """The pool's figures now, with `server` connections seen on the server."""
        s = self.stats()
        return PoolFigures(
            name=self.name,
            min_size=self.min_size,
            connections_num=s["connections_num"],
            connections_errors=s["connections_errors"],
            pool_size=s["pool_size"],
            pool_available=s["pool_available"],
            requests_waiting=s["requests_waiting"],
            made=self.tally.made,
            closed=self.tally.closed,
            server=server,
        )


def counting_connection_class(tally: Tally) -> type[Any]:
    """`GeventConnection` counting in `tally` each connection made and its first `close()`."""
    from greenpool.pg import GeventConnection

    class CountingConnection(GeventConnection):
        """A `GeventConnection` counted by the soak."""

        _soak_closed = False

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            tally.made += 1  # constructed once its connect succeeded

        def close(self) -> None:
            """Close, and count the first call."""
            try:
                super().close()
            finally:
                if not self._soak_closed:
                    self._soak_closed = True
                    tally.closed += 1

    return CountingConnection


class PsycopgSubject(Subject):
    """A `greenpool.ConnectionPool` (not in autocommit: each block is a transaction)."""

    def __init__(self, conninfo: str, app: str, lifetime: float) -> None:
        from psycopg.conninfo import make_conninfo

        from greenpool import ConnectionPool

        self.name, self.app, self.tally, self.min_size = "pg", app, Tally(), PG_MIN
        self.pool: Any = ConnectionPool(
            make_conninfo(conninfo, application_name=app),
            connection_class=counting_connection_class(self.tally),
            min_size=PG_MIN,
            max_size=PG_MAX,
            open=False,
            name=app,
            timeout=REQUEST_TIMEOUT,
            max_lifetime=lifetime,
            max_idle=MAX_IDLE,
        )
        self.pool.open(wait=True, timeout=30.0)

    def stats(self) -> dict[str, int]:
        """The pool's `get_stats()`."""
        return dict(self.pool.get_stats())

    def transaction(self, n: int, slow: bool, start_cut: Callable[[], None], hold: Callable[[Any], None]) -> int:
        """``with pool.connection() as conn:`` two statements, committed at the block's end."""
        with self.pool.connection() as conn:
            hold(conn)
            try:
                conn.execute(FIRST_SQL, (n,)).fetchone()
                if slow:
                    start_cut()
                    conn.execute(SLOW_SQL)
                else:
                    conn.execute(WORK_SQL, (THINK * (n % 5) / 4,))
            finally:
                hold(None)
        return 2

    def close(self) -> None:
        """Close the pool."""
        self.pool.close()


def counting_database_class() -> type[Any]:
    """A `greenpool.peewee.PooledPostgresqlDatabase` counting its connections in a `Tally`.

    The count sits past the pooling mixin, where Peewee makes and closes a
    connection (`_connect()`, `_close()`): the pool's driver calls those.
    """
    import peewee

    from greenpool.peewee import PooledPostgresqlDatabase

    class CountingPostgresqlDatabase(peewee.PostgresqlDatabase):
        """Peewee's `PostgresqlDatabase`, counting connections made and closed."""

        soak_tally: Tally

        def _connect(self) -> Any:
            conn = super()._connect()  # type: ignore[misc]  # peewee's stubs lack its private methods
            self.soak_tally.made += 1
            return conn

        def _close(self, conn: Any) -> None:
            try:
                super()._close(conn)  # type: ignore[misc]  # peewee's stubs lack its private methods
            finally:
                if not getattr(conn, "_soak_closed", False):
                    conn._soak_closed = True
                    self.soak_tally.closed += 1

    class SoakDatabase(PooledPostgresqlDatabase, CountingPostgresqlDatabase):  # type: ignore[misc]
        """`PooledPostgresqlDatabase` whose connections are made by `CountingPostgresqlDatabase`."""

        def __init__(self, *args: Any, tally: Tally, **kwargs: Any) -> None:
            self.soak_tally = tally
            super().__init__(*args, **kwargs)

    return SoakDatabase


class PeeweeSubject(Subject):
    """A Peewee `PooledPostgresqlDatabase`: ``connection_context()`` and ``atomic()``."""

    def __init__(self, conninfo: str, app: str, lifetime: float) -> None:
        from psycopg.conninfo import conninfo_to_dict

        params: dict[str, Any] = dict(conninfo_to_dict(conninfo))
        database = str(params.pop("dbname", None) or params.get("user") or os.environ.get("PGDATABASE") or "postgres")
        params["application_name"] = app
        self.name, self.app, self.tally, self.min_size = "peewee", app, Tally(), PEEWEE_MIN
        self.db: Any = counting_database_class()(
            database,
            max_connections=PEEWEE_MAX,
            stale_timeout=lifetime,
            timeout=REQUEST_TIMEOUT,
            min_connections=PEEWEE_MIN,
            max_idle=MAX_IDLE,
            tally=self.tally,
            **params,
        )
        self.db.pool.open(wait=True, timeout=30.0)

    def stats(self) -> dict[str, int]:
        """The engine's `get_stats()` (`db.pool_stats()`)."""
        return dict(self.db.pool_stats())

    def transaction(self, n: int, slow: bool, start_cut: Callable[[], None], hold: Callable[[Any], None]) -> int:
        """``with db.connection_context(): with db.atomic():`` two statements."""
        db = self.db
        with db.connection_context():
            hold(db.connection())
            try:
                with db.atomic():
                    db.execute_sql(FIRST_SQL, (n,)).fetchone()
                    if slow:
                        start_cut()
                        db.execute_sql(SLOW_SQL)
                    else:
                        db.execute_sql(WORK_SQL, (THINK * (n % 5) / 4,))
            finally:
                hold(None)
        return 2

    def close(self) -> None:
        """Close every connection of the database, then its engine."""
        self.db.close_all()
        self.db.pool.close()


class Monitor:
    """A connection of its own, straight to the server (not through the proxy)."""

    def __init__(self, dsn: str, app: str, apps: Sequence[str]) -> None:
        import gevent.lock
        from psycopg.conninfo import make_conninfo

        from greenpool.pg import GeventConnection

        self.apps = list(apps)
        self.conn: Any = GeventConnection.connect(make_conninfo(dsn, application_name=app), autocommit=True)
        self.lock: Any = gevent.lock.Semaphore()

    def server_counts(self) -> dict[str, int]:
        """Backends per pool application_name."""
        with self.lock:
            rows = self.conn.execute(
                "select application_name, count(*) from pg_stat_activity where application_name = any(%s) group by 1",
                (self.apps,),
            ).fetchall()
        counts = dict.fromkeys(self.apps, 0)
        counts.update({str(app): int(n) for app, n in rows})
        return counts

    def terminate(self, count: int) -> int:
        """`pg_terminate_backend()` of `count` random pool backends; how many were."""
        with self.lock:
            rows = self.conn.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity"
                " where application_name = any(%s) order by random() limit %s",
                (self.apps, count),
            ).fetchall()
        return sum(1 for (done,) in rows if done)

    def server_info(self) -> dict[str, Any]:
        """The server's version, max_connections, and client connections open now."""
        with self.lock:
            version = self.conn.execute("show server_version").fetchone()[0]
            max_conns = int(self.conn.execute("show max_connections").fetchone()[0])
            clients = int(
                self.conn.execute(
                    "select count(*) from pg_stat_activity where backend_type = 'client backend'"
                ).fetchone()[0]
            )
        return {"version": version, "max_connections": max_conns, "client_connections": clients}

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


# =============================================================================
# Load and chaos
# =============================================================================


class Counts:
    """What happened, by phase: transactions, statements, errors, chaos."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.transactions: Counter[tuple[str, str]] = Counter()  # (phase, pool)
        self.queries: Counter[tuple[str, str]] = Counter()  # (phase, pool)
        self.errors: Counter[tuple[str, str]] = Counter()  # (phase, "pool: module.Class")
        self.examples: dict[str, list[str]] = {}  # error kind -> its first distinct messages
        self.chaos: Counter[tuple[str, str]] = Counter()  # (phase, event)
        self.outage_seconds: dict[str, float] = {}  # phase -> seconds
        self.crashes = 0  # load greenlets ended by an exception the soak didn't raise
        self.lent_closed: Counter[str] = Counter()  # pool -> connections lent already closed

    def error(self, where: str, exc: BaseException) -> None:
        """Count one error of `where` (a pool, or the chaos) by its class."""
        kind = f"{where}: {type(exc).__module__.split('.')[0]}.{type(exc).__name__}"
        self.errors[self.phase, kind] += 1
        seen = self.examples.setdefault(kind, [])
        if len(seen) < EXAMPLES:
            message = " ".join(str(exc).split())[:160]
            if message not in seen:
                seen.append(message)

    def by_pool(self, counter: Counter[tuple[str, str]], phase: str) -> dict[str, int]:
        """`counter`'s entries for `phase`, by their second key."""
        return {key: n for (ph, key), n in counter.items() if ph == phase}

    def by_kind(self, counter: Counter[tuple[str, str]]) -> Counter[str]:
        """`counter`'s entries summed over the phases, by their second key."""
        summed: Counter[str] = Counter()
        for (_, key), n in counter.items():
            summed[key] += n
        return summed

    def total(self, counter: Counter[tuple[str, str]]) -> int:
        """All of `counter`'s entries summed."""
        return sum(counter.values())


class Load:
    """The greenlets running transactions, and the chaos acting on them."""

    def __init__(self, subjects: Sequence[Subject], counts: Counts, rng: Any) -> None:
        self.subjects = list(subjects)
        self.counts = counts
        self.rng = rng
        self.workers: dict[Any, Subject] = {}  # greenlet -> the pool it uses
        self.holders: set[Any] = set()  # workers holding a connection
        self.doomed: set[Any] = set()  # workers whose next transaction a timeout cuts
        self.stopping = False
        self._n = 0
        self._spawned = 0

    def spawn(self, count: int, subject: Subject | None = None) -> None:
        """Start `count` more load greenlets on `subject`, else on each pool in turn.

        Each greenlet keeps to one pool, so both pools have a queue of their own.
        """
        import gevent

        for _ in range(count):
            if subject is None:
                on = self.subjects[self._spawned % len(self.subjects)]
                self._spawned += 1
            else:
                on = subject
            self.workers[gevent.spawn(self._worker, on)] = on

    def _worker(self, subject: Subject) -> None:
        import gevent

        me = gevent.getcurrent()
        rng, counts = self.rng, self.counts

        def hold(conn: Any) -> None:
            if conn is None:
                self.holders.discard(me)
                return
            self.holders.add(me)
            if conn.closed:  # the pool checks the status of what it lends: a closed one is its bug
                counts.lent_closed[subject.name] += 1

        try:
            while not self.stopping:
                self._n += 1
                cut: Any = None
                start: Callable[[], None] = _nothing
                if me in self.doomed:
                    self.doomed.discard(me)
                    cut = gevent.Timeout(rng.uniform(*CUT_AFTER))
                    if rng.random() < 0.25:
                        cut.start()  # over the whole block: may cut the wait for a connection too
                    else:
                        start = cut.start  # over the slow statement only
                failed = False
                try:
                    queries = subject.transaction(self._n, cut is not None, start, hold)
                    counts.transactions[counts.phase, subject.name] += 1
                    counts.queries[counts.phase, subject.name] += queries
                except gevent.Timeout as exc:
                    if exc is not cut:
                        raise
                    counts.chaos[counts.phase, f"timeout-cut-{subject.name}"] += 1
                except Exception as exc:
                    counts.error(subject.name, exc)
                    failed = True
                finally:
                    if cut is not None:
                        cut.close()
                if failed:
                    gevent.sleep(rng.uniform(0, ERROR_PAUSE))
        except gevent.GreenletExit:
            counts.chaos[counts.phase, f"killed-{subject.name}"] += 1
        except BaseException as exc:
            # Not the soak's doing: the greenlet dies (gevent prints why), and the `load` check fails.
            counts.error(f"{subject.name} greenlet died", exc)
            counts.crashes += 1
            raise
        finally:
            self.holders.discard(me)
            self.doomed.discard(me)
            self.workers.pop(me, None)

    def stop(self, timeout: float) -> int:
        """Ask every greenlet to stop after its transaction; kill those still running after `timeout`.

        Return how many had to be killed.
        """
        import gevent

        self.stopping = True
        workers = list(self.workers)
        gevent.joinall(workers, timeout=timeout)
        stragglers = [w for w in workers if not w.dead]
        if stragglers:
            gevent.killall(stragglers, block=True, timeout=5.0)
        self.doomed.clear()
        return len(stragglers)


def _nothing() -> None:
    pass


class Chaos:
    """The faults: one greenlet per kind, each striking at exponential intervals."""

    def __init__(self, load: Load, monitor: Monitor, proxy: Any, counts: Counts, rng: Any) -> None:
        self.load = load
        self.monitor = monitor
        self.proxy = proxy
        self.counts = counts
        self.rng = rng
        self.greenlets: list[Any] = []

    def strike(self, kind: str, outage: float | None = None) -> None:
        """One event of `kind`; its errors are counted, never raised."""
        import gevent

        counts, rng = self.counts, self.rng
        try:
            if kind == "timeout":
                spared = [w for w in self.load.workers if w not in self.load.doomed]
                for worker in rng.sample(spared, min(len(spared), rng.randint(1, 4))):
                    self.load.doomed.add(worker)
                    counts.chaos[counts.phase, "timeout-set"] += 1
            elif kind == "kill":
                holders = sorted(self.load.holders, key=id)
                victims = rng.sample(holders, min(len(holders), rng.randint(1, 3)))
                for victim in victims:
                    on = self.load.workers.get(victim)
                    victim.kill(block=False)
                    counts.chaos[counts.phase, "kill"] += 1
                    self.load.spawn(1, on)  # as a worker starts the next task
            elif kind == "terminate":
                counts.chaos[counts.phase, "terminate"] += self.monitor.terminate(rng.randint(1, 2))
            elif kind == "drop":
                counts.chaos[counts.phase, "drop"] += 1
                counts.chaos[counts.phase, "drop-connections"] += self.proxy.kill_connections()
            elif kind == "outage":
                seconds = rng.uniform(*OUTAGE) if outage is None else outage
                self.proxy.pause()
                counts.chaos[counts.phase, "outage"] += 1
                started = time.monotonic()
                try:
                    gevent.sleep(seconds)
                finally:
                    self.proxy.resume()
                    spent = time.monotonic() - started
                    counts.outage_seconds[counts.phase] = counts.outage_seconds.get(counts.phase, 0.0) + spent
            else:
                raise ValueError(f"unknown chaos {kind!r}")
        except gevent.GreenletExit:
            raise
        except Exception as exc:
            counts.error(f"chaos {kind}", exc)

    def start(self) -> None:
        """Start striking: one greenlet per kind of `CHAOS_MEAN_INTERVAL`."""
        import gevent

        self.greenlets = [gevent.spawn(self._loop, kind, mean) for kind, mean in CHAOS_MEAN_INTERVAL.items()]

    def _loop(self, kind: str, mean: float) -> None:
        import gevent

        while True:
            gevent.sleep(self.rng.expovariate(1.0 / mean))
            self.strike(kind)

    def stop(self) -> None:
        """Stop striking (an outage under way ends: the proxy resumes)."""
        import gevent

        gevent.killall(self.greenlets, block=True, timeout=10.0)
        self.greenlets = []
        self.load.doomed.clear()
        self.proxy.resume()  # a no-op if it listens


class LogCounter(logging.Handler):
    """Counts the pools' log records by level and message template; prints them if asked."""

    def __init__(self, echo: bool) -> None:
        super().__init__(logging.INFO)
        self.counts: Counter[tuple[str, str]] = Counter()
        self.echo = echo

    def emit(self, record: logging.LogRecord) -> None:
        """Count `record` (and print it with ``--verbose``)."""
        self.counts[record.levelname, str(record.msg)] += 1
        if self.echo:
            sys.stderr.write(f"{record.levelname} {record.name}: {record.getMessage()}\n")


# =============================================================================
# The run
# =============================================================================


class Soak:
    """One soak run: the phases, the figures, the report."""

    def __init__(self, args: argparse.Namespace, dsn: str, source: str) -> None:
        import random

        self.args = args
        self.dsn = dsn
        self.source = source
        self.seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
        self.rng = random.Random(self.seed)
        self.counts = Counts()
        self.t0 = time.monotonic()
        app = f"{APP_PREFIX}-{os.getpid()}"
        self.apps = {"pg": f"{app}-pg", "peewee": f"{app}-peewee", "monitor": f"{app}-monitor"}
        self.proxy: Any = None
        self.monitor: Monitor | None = None
        self.subjects: list[Subject] = []
        self.load: Load | None = None
        self.chaos: Chaos | None = None
        self.closed = False
        self.traced_file: str | None = None
        self._mark: dict[str, Any] = {"elapsed": 0.0, "queries": 0, "errors": {}}
        # The progress lines go to a file, not to a list: memory the soak
        # itself holds on to is growth to the traced-memory check, and
        # tracemalloc, under greenlets, may put it on another module's line
        # than this one's (which `traced_snapshot()` leaves out).
        self.progress_file: str | None = None
        self.document: dict[str, Any] = {}

    # -- helpers -----------------------------------------------------------

    def elapsed(self) -> float:
        """Seconds since the run began."""
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        """Print a line of the run's log, with the time."""
        print(f"[{self.elapsed():6.1f}s] {text}", flush=True)

    def snapshot(self, attempts: int = 20) -> Snapshot:
        """The process and the pools now, measured when no connect or close ran meanwhile.

        The pools' figures are read before and after the server is asked
        (which lets other greenlets run); a snapshot is kept only if they
        didn't change, else it is taken again (up to `attempts` times).
        """
        assert self.monitor is not None
        for _ in range(attempts):
            before = [s.figures(0).connection_fields() for s in self.subjects]
            servers = self.monitor.server_counts()
            proxy_active = self.proxy.stats()["active"] if self.proxy is not None else None
            pools = tuple(s.figures(servers[s.app]) for s in self.subjects)
            if [p.connection_fields() for p in pools] == before:
                break
        return Snapshot(
            elapsed=self.elapsed(),
            fds=open_fds(),
            threads=thread_count(),
            greenlets=live_greenlets(),
            rss=rss_bytes(),
            pools=pools,
            proxy_active=proxy_active,
        )

    def settle(self, baseline: Snapshot | None, what: str) -> tuple[Snapshot, dict[str, list[str]], float]:
        """Wait until `settle_problems()` finds nothing, or `--settle-timeout`.

        Return the last look, its problems and the seconds waited.
        """
        import gevent

        started = time.monotonic()
        deadline = started + self.args.settle_timeout
        while True:
            gc.collect()  # what only the cyclic collector frees is not a leak
            snap = self.snapshot()
            problems = settle_problems(snap, baseline)
            waited = time.monotonic() - started
            if not any(problems.values()):
                self.say(f"{what}: settled in {waited:.1f} s")
                return snap, problems, waited
            if time.monotonic() >= deadline:
                self.say(f"{what}: NOT settled after {waited:.1f} s: " + "; ".join(sum(problems.values(), [])))
                return snap, problems, waited
            gevent.sleep(SETTLE_POLL)

    def run_load(self, seconds: float, phase: str, chaos: bool) -> None:
        """Let the load (and the chaos) run for `seconds`, printing progress."""
        import gevent

        assert self.chaos is not None
        self.counts.phase = phase
        self.mark()
        if chaos:
            self.chaos.start()
        try:
            end = time.monotonic() + seconds
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    break
                gevent.sleep(min(left, self.args.interval))
                self.report_progress()
        finally:
            if chaos:
                self.chaos.stop()

    def mark(self) -> None:
        """Start counting the next progress line's figures from now."""
        counts = self.counts
        self._mark = {
            "elapsed": self.elapsed(),
            "queries": counts.total(counts.queries),
            "errors": counts.by_kind(counts.errors),
        }

    def report_progress(self) -> None:
        """Print (and keep) one progress line."""
        counts = self.counts
        snap = self.snapshot(attempts=1)
        queries = counts.total(counts.queries)
        errors = counts.by_kind(counts.errors)
        chaos = counts.by_kind(counts.chaos)
        last = self._mark
        dt = max(snap.elapsed - last["elapsed"], 1e-9)
        qps = (queries - last["queries"]) / dt
        new_errors = {k: n - last["errors"].get(k, 0) for k, n in errors.items() if n != last["errors"].get(k, 0)}
        self._mark = {"elapsed": snap.elapsed, "queries": queries, "errors": dict(errors)}
        load = os.getloadavg()
        entry = {
            "elapsed": round(snap.elapsed, 2),
            "phase": counts.phase,
            "queries": queries,
            "qps": round(qps, 1),
            "errors": dict(errors),
            "chaos": dict(chaos),
            "pools": {
                p.name: {
                    "size": p.pool_size,
                    "idle": p.pool_available,
                    "waiting": p.requests_waiting,
                    "server": p.server,
                    "made": p.made,
                    "closed": p.closed,
                }
                for p in snap.pools
            },
            "proxy_active": snap.proxy_active,
            "fds": snap.fds,
            "threads": snap.threads,
            "greenlets": snap.greenlets,
            "rss": snap.rss,
            "load": load,
        }
        if self.progress_file is None:
            self.progress_file = _temp_path("greenpool-soak-progress-")
        with open(self.progress_file, "a", encoding="utf-8") as out:
            out.write(json.dumps(entry) + "\n")
        pools = ", ".join(
            f"{p.name} {p.pool_size} held/{p.pool_available} idle/{p.requests_waiting} waiting/{p.server} on server"
            for p in snap.pools
        )
        shown = ", ".join(f"{k} {n}" for k, n in sorted(new_errors.items())) or "none"
        events = " ".join(
            f"{chaos[e]} {label}"
            for e, label in (
                ("timeout-set", "cuts"),
                ("kill", "kills"),
                ("terminate", "terminated"),
                ("drop", "drops"),
                ("outage", "outages"),
            )
        )
        rss = f"{snap.rss / 2**20:.0f} MiB" if snap.rss is not None else "?"
        self.say(
            f"{counts.phase}: {qps:,.0f} q/s, {queries:,} queries; new errors: {shown}; pools: {pools};"
            f" chaos so far: {events}; fds {snap.fds}, RSS {rss}, greenlets {snap.greenlets}, load {load[0]:.2f}"
        )

    # -- phases ------------------------------------------------------------

    def setup(self) -> None:
        """Start the proxy and the monitor, open the pools."""
        from psycopg.conninfo import make_conninfo

        from greenpool.testing.proxy import Proxy, parse_dsn_host_port

        host, port = parse_dsn_host_port(self.dsn)
        self.proxy = Proxy(host, port).start()
        self.monitor = Monitor(self.dsn, self.apps["monitor"], [self.apps["pg"], self.apps["peewee"]])
        info = self.monitor.server_info()
        self.document["meta"]["server"] = info
        self.say(
            f"server: PostgreSQL {info['version']} at {_masked(self.dsn)} ({self.source}); max_connections"
            f" {info['max_connections']}, {info['client_connections']} client connections open"
        )
        if info["client_connections"] + PG_MAX + PEEWEE_MAX + 4 > info["max_connections"]:
            self.say("warning: the pools at their maximum may not fit under max_connections")
        via_proxy = self.proxy.dsn(make_conninfo(self.dsn, connect_timeout=10))
        self.subjects = [
            PsycopgSubject(via_proxy, self.apps["pg"], self.args.lifetime),
            PeeweeSubject(via_proxy, self.apps["peewee"], self.args.lifetime),
        ]
        self.load = Load(self.subjects, self.counts, self.rng)
        self.chaos = Chaos(self.load, self.monitor, self.proxy, self.counts, self.rng)
        self.say(
            f"pools open through the proxy on port {self.proxy.port}: greenpool.ConnectionPool"
            f" {PG_MIN}..{PG_MAX} ({self.apps['pg']}), Peewee PooledPostgresqlDatabase {PEEWEE_MIN}..{PEEWEE_MAX}"
            f" ({self.apps['peewee']}); lifetime {self.args.lifetime:g} s, max_idle {MAX_IDLE:g} s"
        )

    def warm_up(self) -> None:
        """Load, each kind of chaos once, calm: every code path has run before the baseline."""
        import gevent

        assert self.load is not None and self.chaos is not None
        self.counts.phase = "warm-up"
        self.say(f"warm-up: {self.args.greenlets} greenlets" + ("" if self.args.no_chaos else ", each chaos once"))
        self.load.spawn(self.args.greenlets)
        gevent.sleep(WARMUP_STEP)
        if not self.args.no_chaos:
            for kind in CHAOS_MEAN_INTERVAL:
                self.chaos.strike(kind, outage=min(OUTAGE))
                gevent.sleep(WARMUP_STEP)
        gevent.sleep(CALM_GRACE)

    def stop_load(self) -> int:
        """Stop the load greenlets; how many had to be killed."""
        assert self.load is not None
        started = time.monotonic()
        stragglers = self.load.stop(STOP_TIMEOUT)
        self.load.stopping = False
        killed = f", {stragglers} killed after {STOP_TIMEOUT:g} s" if stragglers else ""
        self.say(f"load stopped in {time.monotonic() - started:.1f} s (each finished its transaction){killed}")
        return stragglers

    def run(self) -> dict[str, Any]:
        """All the phases; the document of figures (checks included)."""
        args = self.args
        self.document["meta"] = self.meta()
        soak_seconds = args.minutes * 60.0
        problems: dict[str, list[str]] = {}
        passed: dict[str, str] = {}
        try:
            self.setup()
            assert self.load is not None
            self.warm_up()
            self.stop_load()
            self.counts.phase = "settle"
            baseline, baseline_problems, _ = self.settle(None, "baseline")
            # Kept in a file, not in memory: a snapshot's objects weigh more
            # than a dozen MiB, which the RSS check would count as growth.
            traced_file = self.traced_file = _temp_path("greenpool-soak-traced-")
            traced_snapshot().dump(traced_file)
            traced_before_total = traced_total(tracemalloc.Snapshot.load(traced_file))
            gc.collect()
            baseline = replace(baseline, rss=rss_bytes())  # with what the snapshot left behind
            problems["baseline"] = [p for ps in baseline_problems.values() for p in ps]
            passed["baseline"] = ", ".join(f"{p.name} {p.pool_size}" for p in baseline.pools)
            self.document["baseline"] = asdict(baseline)
            self.say(
                f"baseline: fds {baseline.fds}, threads {baseline.threads}, greenlets {baseline.greenlets},"
                f" RSS {_size(baseline.rss or 0)}, traced {_size(traced_before_total)}"
            )

            self.load.spawn(args.greenlets)
            what = "load" if args.no_chaos else "load and chaos"
            self.say(f"soak: {what} for {args.minutes:g} min, seed {self.seed}")
            self.run_load(soak_seconds, "soak", chaos=not args.no_chaos)
            self.say(f"calm: load without chaos, {CALM_GRACE:g} s grace then a {CALM_WINDOW:g} s window")
            self.run_load(CALM_GRACE, "calm-grace", chaos=False)
            self.run_load(CALM_WINDOW, "calm", chaos=False)
            stragglers = self.stop_load()
            self.counts.phase = "settle"
            final, final_problems, waited = self.settle(baseline, "final")
            problems.update(final_problems)
            passed.update(self.passed_details(baseline, final, waited))

            traced_after = traced_snapshot()
            traced_before = tracemalloc.Snapshot.load(traced_file)
            memory = MemoryFigures(
                rss_before=baseline.rss,
                rss_after=final.rss,
                traced_before=traced_before_total,
                traced_after=traced_total(traced_after),
                top=tuple(compare_traced(traced_before, traced_after, TOP_ALLOCATIONS)),
            )
            del traced_before, traced_after
            problems.update(memory_problems(memory))
            passed["traced-memory"] = f"{_size(memory.traced_growth)} (tolerance {_size(TRACED_TOLERANCE)})"
            passed["rss"] = f"{_size(memory.rss_growth or 0)} (tolerance {_size(RSS_TOLERANCE)})"
            counts = self.counts
            load = LoadFigures(
                soak_transactions={s.name: counts.transactions[("soak", s.name)] for s in self.subjects},
                calm_transactions={s.name: counts.transactions[("calm", s.name)] for s in self.subjects},
                calm_errors={
                    s.name: sum(
                        n for (ph, kind), n in counts.errors.items() if ph == "calm" and kind.startswith(s.name)
                    )
                    for s in self.subjects
                },
                stragglers=stragglers,
                crashes=counts.crashes,
                lent_closed={s.name: counts.lent_closed[s.name] for s in self.subjects},
                chaos=None
                if args.no_chaos
                else {
                    kind: sum(n for (_, event), n in counts.chaos.items() if event == counted)
                    for kind, counted in CHAOS_EVENTS.items()
                },
            )
            problems.update(load_problems(load))
            passed["load"] = ", ".join(f"{k} {v:,} transactions" for k, v in load.soak_transactions.items())
            passed["recovery"] = ", ".join(f"{k} {v:,} transactions" for k, v in load.calm_transactions.items())
            self.document.update(
                final=asdict(final),
                memory={**asdict(memory), "traced_growth": memory.traced_growth, "rss_growth": memory.rss_growth},
                load=asdict(load),
            )

            self.counts.phase = "close"
            closed = self.close_pools()
            problems["closed"] = [p for pool in closed.pools for p in closed_problems(pool)]
            if closed.proxy_active:
                problems["closed"].append(f"the proxy still relays {closed.proxy_active} connections")
            passed["closed"] = ", ".join(f"{p.name} {p.closed:,} of {p.made:,} closed" for p in closed.pools)
            self.document["closed"] = asdict(closed)
            progress = self.read_progress()
        finally:
            self.teardown()
        checks = evaluate(problems, passed)
        self.document["checks"] = [asdict(c) for c in checks]
        self.document["totals"] = self.totals()
        self.document["progress"] = progress
        self.document["totals"]["load_average_samples"] = [entry["load"] for entry in progress]
        self.document["meta"]["load_end"] = os.getloadavg()
        self.document["meta"]["seconds"] = round(self.elapsed(), 1)
        return self.document

    def read_progress(self) -> list[dict[str, Any]]:
        """The progress lines' figures, as printed."""
        if self.progress_file is None:
            return []
        with open(self.progress_file, encoding="utf-8") as lines:
            return [json.loads(line) for line in lines]

    def passed_details(self, baseline: Snapshot, final: Snapshot, waited: float) -> dict[str, str]:
        """The detail of each passed check: the figures compared."""
        sizes = ", ".join(f"{p.name} {p.pool_size}" for p in final.pools)
        return {
            "pool-sizes": f"{sizes} (settled in {waited:.1f} s)",
            "server-connections": ", ".join(f"{p.name} {p.server}" for p in final.pools)
            + f"; proxy {final.proxy_active}",
            "accounting": ", ".join(
                f"{p.name} {p.stats_made:,} made = {p.closed:,} closed + {p.pool_size} held" for p in final.pools
            ),
            "fds": f"{baseline.fds} -> {final.fds}",
            "threads": f"{baseline.threads} -> {final.threads}",
            "greenlets": f"{baseline.greenlets} -> {final.greenlets}",
        }

    def close_pools(self) -> Snapshot:
        """Close the pools; wait until the server and the proxy let their connections go."""
        import gevent

        self.closed = True
        for subject in self.subjects:
            subject.close()
        deadline = time.monotonic() + self.args.settle_timeout
        while True:
            snap = self.snapshot()
            problems = [p for pool in snap.pools for p in closed_problems(pool)]
            if snap.proxy_active:
                problems.append(f"the proxy relays {snap.proxy_active}")
            if not problems or time.monotonic() >= deadline:
                self.say("closed: " + ("; ".join(problems) if problems else "every connection closed"))
                return snap
            gevent.sleep(SETTLE_POLL)

    def teardown(self) -> None:
        """Stop whatever still runs: chaos, load, pools, monitor, proxy."""
        import gevent

        if self.chaos is not None and self.chaos.greenlets:
            self.chaos.stop()
        if self.load is not None and self.load.workers:
            gevent.killall(list(self.load.workers), block=True, timeout=10.0)
        for subject in [] if self.closed else self.subjects:
            try:
                subject.close()
            except Exception as exc:  # noqa: BLE001 - teardown: keep going
                print(f"warning: closing {subject.name}: {exc}", file=sys.stderr)
        for path in (self.traced_file, self.progress_file):
            if path is not None:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        if self.monitor is not None:
            self.monitor.close()
        if self.proxy is not None:
            self.proxy.stop()

    # -- figures -----------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        """What the run was, where, when."""
        args = self.args
        return {
            "argv": sys.argv,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "host": platform.node(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_start": os.getloadavg(),
            "versions": _versions(),
            "dsn": _masked(self.dsn),
            "dsn_source": self.source,
            "seed": self.seed,
            "minutes": args.minutes,
            "greenlets": args.greenlets,
            "chaos": not args.no_chaos,
            "config": {
                "pg": {"min_size": PG_MIN, "max_size": PG_MAX},
                "peewee": {"min_connections": PEEWEE_MIN, "max_connections": PEEWEE_MAX},
                "lifetime": args.lifetime,
                "max_idle": MAX_IDLE,
                "request_timeout": REQUEST_TIMEOUT,
                "chaos_mean_interval": CHAOS_MEAN_INTERVAL,
                "cut_after": CUT_AFTER,
                "outage": OUTAGE,
                "calm": [CALM_GRACE, CALM_WINDOW],
            },
            "tolerances": {
                "fds": FD_TOLERANCE,
                "threads": THREAD_TOLERANCE,
                "greenlets": GREENLET_TOLERANCE,
                "traced_bytes": TRACED_TOLERANCE,
                "rss_bytes": RSS_TOLERANCE,
            },
        }

    def totals(self) -> dict[str, Any]:
        """Transactions, statements, errors and chaos, by phase; the pools' stats; the log records."""
        counts = self.counts
        phases = sorted(
            {ph for ph, _ in counts.transactions} | {ph for ph, _ in counts.errors} | {ph for ph, _ in counts.chaos}
        )
        by_phase = {
            ph: {
                "transactions": counts.by_pool(counts.transactions, ph),
                "queries": counts.by_pool(counts.queries, ph),
                "errors": counts.by_pool(counts.errors, ph),
                "chaos": counts.by_pool(counts.chaos, ph),
                "outage_seconds": round(counts.outage_seconds.get(ph, 0.0), 2),
            }
            for ph in phases
        }
        soak_seconds = self.args.minutes * 60.0
        soak_queries = sum(counts.by_pool(counts.queries, "soak").values())
        return {
            "by_phase": by_phase,
            "soak_qps": round(soak_queries / soak_seconds, 1) if soak_seconds else None,
            "error_examples": counts.examples,
            "pool_stats": {s.name: s.stats() for s in self.subjects},
        }


def _temp_path(prefix: str) -> str:
    import tempfile

    fd, path = tempfile.mkstemp(prefix=prefix)
    os.close(fd)
    return path


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for dist in ("greenpool", "gevent", "greenlet", "psycopg", "psycopg-binary", "peewee"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            pass
    try:
        import psycopg

        found["libpq"] = str(psycopg.pq.version())
    except Exception:  # noqa: BLE001 - informational only
        pass
    return found


def _masked(dsn: str) -> str:
    """The DSN without its password (the benchmark's helper; imported late, after the patch)."""
    from greenpool.bench.backends import masked_dsn

    return masked_dsn(dsn)


# =============================================================================
# The report
# =============================================================================


def format_report(document: dict[str, Any]) -> str:
    """The final report: load, errors, chaos, connections, resources, checks."""
    meta, totals = document["meta"], document.get("totals", {})
    lines = [
        "",
        f"== soak report: {meta['minutes']:g} min, {meta['greenlets']} greenlets, seed {meta['seed']},"
        f" {meta.get('seconds', 0):.0f} s in all; load average {_loads(meta.get('load_start'))} at start,"
        f" {_loads(meta.get('load_end'))} at end ({meta['cpus']} CPUs)",
    ]
    phases = totals.get("by_phase", {})
    soak = phases.get("soak", {})
    tx, qs = soak.get("transactions", {}), soak.get("queries", {})
    if tx:
        lines.append(
            f"soak: {sum(qs.values()):,} queries ({_by(qs)}), {sum(tx.values()):,} transactions ({_by(tx)}),"
            f" {totals.get('soak_qps') or 0:,.0f} q/s"
        )
    for phase in ("warm-up", "soak", "calm-grace", "calm"):
        errors = phases.get(phase, {}).get("errors", {})
        if errors:
            lines.append(f"errors during {phase}:")
            for kind, n in sorted(errors.items(), key=lambda kv: -kv[1]):
                lines.append(f"  {n:>8,}  {kind}")
                for message in totals.get("error_examples", {}).get(kind, []):
                    lines.append(f"            e.g. {message}")
        elif phase in phases:
            lines.append(f"errors during {phase}: none")
    chaos = soak.get("chaos", {})
    if chaos:
        lines.append(
            "chaos during soak: "
            f"{chaos.get('timeout-set', 0):,} timeouts set ({chaos.get('timeout-cut-pg', 0):,} cut pg,"
            f" {chaos.get('timeout-cut-peewee', 0):,} cut peewee), {chaos.get('kill', 0):,} greenlets killed holding"
            f" a connection, {chaos.get('terminate', 0):,} backends terminated, {chaos.get('drop', 0):,} drops"
            f" ({chaos.get('drop-connections', 0):,} connections), {chaos.get('outage', 0):,} outages"
            f" ({soak.get('outage_seconds', 0):.1f} s)"
        )
    final, closed = document.get("final"), document.get("closed")
    stats = totals.get("pool_stats", {})
    if final and closed:
        lines.append("connections:            " + "".join(f"{p['name']:>12}" for p in final["pools"]))
        rows: list[tuple[str, Callable[[str], int]]] = [
            ("connect attempts", lambda n: stats[n]["connections_num"]),
            ("failed connects", lambda n: stats[n]["connections_errors"]),
            ("made (counted)", lambda n: _pool(closed, n)["made"]),
            ("closed (counted)", lambda n: _pool(closed, n)["closed"]),
            ("held when settled", lambda n: _pool(final, n)["pool_size"]),
            ("server when settled", lambda n: _pool(final, n)["server"]),
            ("server after close", lambda n: _pool(closed, n)["server"]),
            ("lost at checkout", lambda n: stats[n]["connections_lost"]),
            ("returned broken", lambda n: stats[n]["returns_bad"]),
            ("returned dirty", lambda n: stats[n]["returns_reset"]),
            ("requests", lambda n: stats[n]["requests_num"]),
            ("requests failed", lambda n: stats[n]["requests_errors"]),
        ]
        for label, get in rows:
            lines.append(f"  {label:<22}" + "".join(f"{get(p['name']):>12,}" for p in final["pools"]))
    base, memory = document.get("baseline"), document.get("memory")
    if base and final and memory:
        lines.append("resources:               baseline       final       delta   tolerance")
        for label, key, tol in (
            ("open fds", "fds", FD_TOLERANCE),
            ("threads", "threads", THREAD_TOLERANCE),
            ("live greenlets", "greenlets", GREENLET_TOLERANCE),
        ):
            b, f = base[key], final[key]
            delta = f"{f - b:+d}" if b is not None and f is not None else "?"
            lines.append(f"  {label:<22}{b!s:>10}{f!s:>12}{delta:>12}{tol:>12}")
        rb, ra = memory["rss_before"], memory["rss_after"]
        if rb is not None and ra is not None:
            lines.append(f"  {'RSS':<22}{_size(rb):>10}{_size(ra):>12}{_size(ra - rb):>12}{_size(RSS_TOLERANCE):>12}")
        tb, ta = memory["traced_before"], memory["traced_after"]
        lines.append(
            f"  {'traced (tracemalloc)':<22}{_size(tb):>10}{_size(ta):>12}{_size(ta - tb):>12}"
            f"{_size(TRACED_TOLERANCE):>12}"
        )
        during = [p for p in document.get("progress", []) if p["phase"] == "soak"]
        if during:
            ranges = []
            for label, key, fmt in (
                ("fds", "fds", str),
                ("greenlets", "greenlets", str),
                ("RSS", "rss", lambda v: f"{v / 2**20:.1f} MiB"),
            ):
                values = [p[key] for p in during if p[key] is not None]
                if values:
                    ranges.append(f"{label} {fmt(min(values))}-{fmt(max(values))}")
            lines.append(f"  during the soak ({len(during)} progress lines): " + ", ".join(ranges))
        if memory["top"]:
            lines.append("  traced memory grown most, by line:")
            for where, size, count in memory["top"]:
                lines.append(f"    {_size(size):>10} {count:+7d} blocks  {where}")
    logs = totals.get("log_records", [])
    if logs:
        lines.append("pool log records (level, message, count):")
        for entry in logs[:8]:
            level, msg = entry["record"] if isinstance(entry["record"], (list, tuple)) else ("", entry["record"])
            lines.append(f"  {entry['count']:>8,}  {level} {msg}")
    lines.append("checks:")
    checks = document.get("checks", [])
    for check in checks:
        lines.append(f"  {'PASS' if check['ok'] else 'FAIL'} {check['name']}: {check['detail']}")
    failed = [c["name"] for c in checks if not c["ok"]]
    lines.append(f"FAILED: {', '.join(failed)}" if failed else f"all {len(checks)} checks passed")
    return "\n".join(lines)


def _pool(snapshot: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in snapshot["pools"] if p["name"] == name)


def _by(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counts.items())


def _loads(loads: Iterable[float] | None) -> str:
    return " ".join(f"{x:.2f}" for x in loads) if loads else "?"


def write_json(path: str, document: dict[str, Any]) -> None:
    """Write `document` to `path` (atomically), NaN as null."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items() if not str(k).startswith("_")}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(clean(document), out, indent=2, default=str)
        out.write("\n")
    os.replace(tmp, path)


def _check_args(args: argparse.Namespace) -> None:
    def positive(name: str, value: float) -> None:
        if not (math.isfinite(value) and value > 0):
            raise SystemExit(f"--{name} must be a number > 0, got {value!r}")

    positive("minutes", args.minutes)
    positive("lifetime", args.lifetime)
    positive("interval", args.interval)
    positive("settle-timeout", args.settle_timeout)
    if args.greenlets < 1:
        raise SystemExit(f"--greenlets must be at least 1, got {args.greenlets}")
    if args.json:
        try:
            open(args.json, "a").close()  # now, not after the run
        except OSError as exc:
            raise SystemExit(f"--json: can't write {args.json}: {exc.strerror or exc}") from None


def resolve_dsn(explicit: str | None) -> tuple[str, str]:
    """The DSN to use and where it came from: --dsn, $GREENPOOL_DSN or an embedded server."""
    if explicit:
        return explicit, "--dsn"
    if os.environ.get(DSN_ENV, "").strip():
        return os.environ[DSN_ENV].strip(), f"${DSN_ENV}"
    from greenpool.testing.embedded import resolve_dsn as embedded

    return embedded(None, DSN_ENV), "embedded throw-away pgserver"


def main(args: argparse.Namespace) -> int:
    """Run the soak described by the ``soak`` CLI options; 0 if every check passed, else 1."""
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        monkey.patch_all()  # called from Python rather than the CLI: late, but needed
    _check_args(args)
    if not tracemalloc.is_tracing():
        tracemalloc.start(1)  # before anything the baseline holds is made
    handler = LogCounter(echo=args.verbose)
    pool_logger = logging.getLogger("greenpool")
    saved = pool_logger.level, pool_logger.propagate
    pool_logger.addHandler(handler)
    pool_logger.setLevel(logging.INFO)
    pool_logger.propagate = False
    try:
        dsn, source = resolve_dsn(args.dsn)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    print(
        f"soak: {args.minutes:g} min, {args.greenlets} greenlets; load average {_loads(os.getloadavg())}"
        f" ({os.cpu_count()} CPUs)",
        flush=True,
    )
    soak = Soak(args, dsn, source)
    try:
        document = soak.run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        pool_logger.removeHandler(handler)
        pool_logger.setLevel(saved[0])
        pool_logger.propagate = saved[1]
    document["totals"]["log_records"] = [{"record": list(key), "count": n} for key, n in handler.counts.most_common()]
    print(format_report(document), flush=True)
    if args.json:
        write_json(args.json, document)
        print(f"figures written to {args.json}")
    return 0 if all(c["ok"] for c in document["checks"]) else 1

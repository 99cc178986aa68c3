"""A write load through a pool while a `ReplicatedCluster` fails over, and what it measured.

Shared by tests/pg/test_failover.py and tests/peewee/test_peewee_failover.py.
`run_failover()` starts `WORKERS` workers (greenlets or threads, see
`Greenlets` and `Threads`), each writing in a loop through the pool under
test: an INSERT of a new unique id, acknowledged when its block commits.
Then it breaks the primary (a crash, or a fast shutdown), waits `OUTAGE`
seconds, promotes the replica, lets the load run on a while, and reads back
the ids the new primary has. `Failover` holds every request's times and
outcome and derives the figures:

- time from the promotion (`ReplicatedCluster.promoted_at`: the replica
  seen out of recovery) to the first write acknowledged after it;
- writes lost: acknowledged, then missing on the new primary;
- requests begun after the promotion that failed;
- requests begun after the promotion served by the old primary;
- the pool's stats (failovers, connections lost) over the run.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from helpers import replicated_cluster

from greenpool.testing import ReplicatedCluster

#: Workers writing at once, through a pool of `POOL_SIZE` connections.
WORKERS = 50
POOL_SIZE = 10
#: The pools' wait for a connection (seconds): psycopg_pool's requests wait
#: this long during an outage before they fail.
POOL_TIMEOUT = 10.0
#: Seconds the load runs before the primary's end.
WARMUP = 1.0
#: Seconds between the primary's end and the replica's promotion
#: ($GREENPOOL_FAILOVER_OUTAGE: docs/resilience.md measures a longer one too).
OUTAGE = float(os.environ.get("GREENPOOL_FAILOVER_OUTAGE", "") or 0.5)
#: Seconds the load runs on after the first write acknowledged after the
#: promotion (and at least this long after the promotion).
AFTER = 2.0
#: At most this long after the promotion, whether writes resumed or not.
LIMIT = 30.0
#: A worker pauses up to this long (at random) after a failed request, as a
#: client retrying would: so requests keep coming at any moment, also while a
#: connect attempt is under way.
PAUSE = 1.0

TABLE = "failover_writes"
INSERT = f"insert into {TABLE} (id) values (%s) returning inet_server_port()"

#: Stats worth a look, in the order printed (those the pool has).
STATS = (
    "failovers",
    "connections_lost",
    "returns_bad",
    "connections_num",
    "connections_errors",
    "requests_errors",
)


@contextlib.contextmanager
def new_cluster() -> Iterator[ReplicatedCluster]:
    """A fresh cluster with the load's table, closed after; skip (fail in CI) without PostgreSQL."""
    with replicated_cluster() as cluster:
        create_table(cluster)
        yield cluster


@contextlib.contextmanager
def slow_commit_table(monitor: psycopg.Connection[Any]) -> Iterator[str]:
    """A table whose every insert makes its COMMIT wait 30 s (a deferred trigger), dropped after.

    So a test can end a session during its COMMIT (`terminate_in_commit()`).
    """
    table = f"gp_slow_commit_{uuid.uuid4().hex[:12]}"
    monitor.execute(f"create table {table} (id int)")
    monitor.execute(
        f"create function {table}_wait() returns trigger language plpgsql"
        " as $$ begin perform pg_sleep(30); return null; end $$"
    )
    monitor.execute(
        f"create constraint trigger {table}_wait after insert on {table}"
        f" deferrable initially deferred for each row execute function {table}_wait()"
    )
    try:
        yield table
    finally:
        monitor.execute(f"drop table {table}")
        monitor.execute(f"drop function {table}_wait()")


def terminate_in_commit(monitor: psycopg.Connection[Any], app: str, timeout: float = 10.0) -> None:
    """Wait until the session of `app` runs COMMIT, then end it: 57P01, as a server shutting down says."""
    limit = time.monotonic() + timeout
    while True:
        row = monitor.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity where application_name = %s and query = 'COMMIT'",
            (app,),
        ).fetchone()
        if row is not None:
            return
        if time.monotonic() > limit:
            raise AssertionError(f"no session of {app!r} in COMMIT after {timeout} s")
        time.sleep(0.01)


def create_table(cluster: ReplicatedCluster) -> None:
    """The table the load writes to, on the primary (node 0)."""
    with psycopg.connect(cluster.node_dsn(0), autocommit=True) as conn:
        conn.execute(f"create table {TABLE} (id bigint primary key)")


# --------------------------------------------------------------------------
# Workers: greenlets or threads
# --------------------------------------------------------------------------


class Greenlets:
    """Workers as greenlets of this thread's hub; blocking calls go to its thread pool."""

    name = "greenlets"

    def __init__(self) -> None:
        import gevent

        self._gevent = gevent
        self.hub = gevent.get_hub()

    def spawn(self, fn: Callable[[], None]) -> Any:
        return self._gevent.spawn(fn)

    def join(self, workers: Sequence[Any], timeout: float) -> list[Any]:
        """Wait for the workers; return those still running after `timeout` (killed)."""
        done = self._gevent.joinall(workers, timeout=timeout)
        late = [w for w in workers if w not in done]
        self._gevent.killall(late, timeout=5)
        return late

    def sleep(self, seconds: float) -> None:
        self._gevent.sleep(seconds)

    def offload(self, fn: Callable[[], Any]) -> Any:
        """Run a blocking call in a real thread while the hub runs the workers."""
        return self.hub.threadpool.apply(fn)


class Threads:
    """Workers as OS threads."""

    name = "threads"

    def spawn(self, fn: Callable[[], None]) -> Any:
        import threading

        thread = threading.Thread(target=fn, daemon=True)
        thread.start()
        return thread

    def join(self, workers: Sequence[Any], timeout: float) -> list[Any]:
        limit = time.monotonic() + timeout
        for w in workers:
            w.join(max(0.0, limit - time.monotonic()))
        return [w for w in workers if w.is_alive()]

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def offload(self, fn: Callable[[], Any]) -> Any:
        return fn()


# --------------------------------------------------------------------------
# What a run measured
# --------------------------------------------------------------------------


@dataclass
class Request:
    """One write: when it began and ended (`time.monotonic()`), and its outcome."""

    id: int
    began: float
    ended: float
    port: int | None  # of the server that acknowledged it; None if it failed
    error: str | None = None
    sqlstate: str | None = None  # of the psycopg error behind the failure, if any


@dataclass
class Failover:
    """A run of `run_failover()`: its timeline, its requests, and the figures derived."""

    label: str
    fault: str
    ports: tuple[int, int]
    fault_began: float = 0.0
    fault_done: float = 0.0
    promoted_at: float = 0.0
    stopped_at: float = 0.0
    requests: list[Request] = field(default_factory=list)
    present: set[int] = field(default_factory=set)
    stats_before: dict[str, int] = field(default_factory=dict)
    stats_after: dict[str, int] = field(default_factory=dict)
    stuck: int = 0  # workers still in a request long after the run

    @property
    def acknowledged(self) -> list[Request]:
        return [r for r in self.requests if r.error is None]

    @property
    def lost(self) -> list[int]:
        """Ids acknowledged, then missing on the new primary."""
        return sorted({r.id for r in self.acknowledged} - self.present)

    @property
    def failed_during_outage(self) -> list[Request]:
        return [r for r in self.requests if r.error is not None and r.began < self.promoted_at]

    @property
    def failed_after_promotion(self) -> list[Request]:
        """Requests begun after the promotion that failed."""
        return [r for r in self.requests if r.error is not None and r.began >= self.promoted_at]

    @property
    def old_primary_after_promotion(self) -> list[Request]:
        """Requests begun after the promotion acknowledged by the old primary."""
        return [r for r in self.acknowledged if r.began >= self.promoted_at and r.port == self.ports[0]]

    @property
    def written_after_promotion(self) -> list[Request]:
        return [r for r in self.acknowledged if r.ended >= self.promoted_at]

    @property
    def first_write(self) -> float | None:
        """Seconds from the promotion to the first write acknowledged after it."""
        after = self.written_after_promotion
        return min(r.ended for r in after) - self.promoted_at if after else None

    @property
    def slowest_after_promotion(self) -> float:
        """The longest request (seconds) among those begun after the promotion."""
        return max((r.ended - r.began for r in self.requests if r.began >= self.promoted_at), default=0.0)

    def stats(self) -> dict[str, int]:
        """The pool's counters over the run (after minus before), those in `STATS` it has."""
        return {k: self.stats_after[k] - self.stats_before.get(k, 0) for k in STATS if k in self.stats_after}

    def errors(self, requests: Sequence[Request], most: int = 3) -> str:
        """The commonest errors of `requests`, with their counts."""
        counts: dict[str, int] = {}
        for r in requests:
            text = (r.error or "").splitlines()[0][:140]
            counts[text] = counts.get(text, 0) + 1
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:most]
        return "; ".join(f"{n} x {text}" for text, n in top)

    def summary(self) -> str:
        """The figures, for the test's output (`pytest -s`) and the docs."""
        ms = lambda s: "never" if s is None else f"{s * 1000:.0f} ms"  # noqa: E731
        lines = [
            f"failover [{self.label}, {self.fault}]:",
            f"  primary gone in {ms(self.fault_done - self.fault_began)}, replica promoted"
            f" {ms(self.promoted_at - self.fault_done)} later",
            f"  promotion -> first write: {ms(self.first_write)};"
            f" slowest request begun after promotion: {ms(self.slowest_after_promotion)}",
            f"  requests: {len(self.requests)}, acknowledged {len(self.acknowledged)}"
            f" ({len(self.written_after_promotion)} after promotion);"
            f" failed: {len(self.failed_during_outage)} during the outage,"
            f" {len(self.failed_after_promotion)} begun after promotion",
            f"  writes lost: {len(self.lost)}; served by the old primary after promotion:"
            f" {len(self.old_primary_after_promotion)}; workers stuck at the end: {self.stuck}",
            "  stats: " + ", ".join(f"{k}={v}" for k, v in self.stats().items()),
        ]
        if self.failed_during_outage:
            lines.append(f"  outage errors: {self.errors(self.failed_during_outage)}")
        if self.failed_after_promotion:
            lines.append(f"  errors after promotion: {self.errors(self.failed_after_promotion)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def sqlstate(error: BaseException | None) -> str | None:
    """The SQLSTATE of the psycopg error `error` is or wraps (Peewee's), if any."""
    while error is not None and not isinstance(error, psycopg.Error):
        error = error.__cause__ or error.__context__
    return None if error is None else error.sqlstate


def run_failover(
    cluster: ReplicatedCluster,
    fault: str,
    write: Callable[[int], int],
    workers: Greenlets | Threads,
    stats: Callable[[], dict[str, int]],
    label: str,
    break_primary: Callable[[], None] | None = None,
    count: int = WORKERS,
) -> Failover:
    """Write through `write(id) -> port` from `WORKERS` workers while the primary fails over.

    `fault` names what happens to the primary: "crash" (`crash_primary()`),
    "stop" (`stop_primary()`), or anything `break_primary()` does (run in
    a thread, like the cluster's methods); `stats()` reads the pool's stats;
    `count` workers write. The table must exist (`create_table()`).
    """
    if break_primary is None:
        break_primary = {"crash": cluster.crash_primary, "stop": cluster.stop_primary}[fault]
    run = Failover(f"{label}, {count} workers", fault, cluster.ports)
    ids = itertools.count(1)
    stopping = False

    def worker() -> None:
        while not stopping:
            i = next(ids)
            began = time.monotonic()
            try:
                port = write(i)
            except Exception as ex:  # noqa: BLE001 - an outcome to count
                ended = time.monotonic()
                run.requests.append(Request(i, began, ended, None, f"{type(ex).__name__}: {ex}", sqlstate(ex)))
                workers.sleep(random.uniform(0, PAUSE))
            else:
                run.requests.append(Request(i, began, time.monotonic(), port))

    handles = [workers.spawn(worker) for _ in range(count)]
    try:
        started = time.monotonic()
        # Warmed up: every worker wrote a few times, for a second at least.
        while len(run.requests) < 4 * count or time.monotonic() - started < WARMUP:
            if time.monotonic() - started > 30:
                raise AssertionError(f"the load did not start: {run.requests[-3:]}")
            workers.sleep(0.05)
        run.stats_before = dict(stats())
        run.fault_began = time.monotonic()
        workers.offload(break_primary)
        run.fault_done = time.monotonic()
        workers.sleep(OUTAGE)
        run.promoted_at = workers.offload(cluster.promote)
        while True:
            now = time.monotonic()
            first = run.first_write
            if now - run.promoted_at >= LIMIT or (
                first is not None and now - run.promoted_at >= max(AFTER, first + AFTER)
            ):
                break
            workers.sleep(0.05)
    finally:
        stopping = True
        run.stopped_at = time.monotonic()
        run.stuck = len(workers.join(handles, POOL_TIMEOUT + 10))
    run.stats_after = dict(stats())
    with psycopg.connect(cluster.node_dsn(1)) as conn:
        run.present = {row[0] for row in conn.execute(f"select id from {TABLE}")}
    return run


def check(run: Failover) -> None:
    """Assert the failover's behaviour: nothing lost, nothing failed after the promotion, writes resumed.

    And the pool's `failovers` stat, if it has one: at most one (one server
    went), one if a query heard 57P01 (AdminShutdown) from it.
    """
    assert run.written_after_promotion, f"no write after the promotion\n{run.summary()}"
    assert run.lost == [], f"{len(run.lost)} acknowledged writes lost\n{run.summary()}"
    assert run.failed_after_promotion == [], (
        f"{len(run.failed_after_promotion)} requests begun after the promotion failed\n{run.summary()}"
    )
    assert run.old_primary_after_promotion == [], f"the old primary served requests\n{run.summary()}"
    assert run.stuck == 0, f"{run.stuck} workers never finished their request\n{run.summary()}"
    failovers = run.stats().get("failovers")
    if failovers is not None:
        assert failovers <= 1, run.summary()  # one server went: one failover, however many said so
        if any(r.sqlstate == "57P01" for r in run.requests):
            assert failovers == 1, run.summary()

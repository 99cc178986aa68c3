"""Failover to a new primary.

With two real servers (`greenpool.testing.ReplicatedCluster`): 50 workers
write through a pool of 10 on the multi-host conninfo
(``target_session_attrs=read-write``) while the primary crashes (``pg_ctl
stop -m immediate``) or shuts down (``-m fast``: 57P01 on every session), and
the replica, a synchronous standby, is promoted under that load. Asserted:
no acknowledged write lost, no request begun after the promotion failed or
served by the old primary, writes resume. Measured and printed (``pytest -s``):
the time from the promotion to the first write, and the pool's stats; the
same for psycopg_pool, measured only (docs/resilience.md has the figures).

The greenlets run in this process without monkey-patching, as in
test_pg_gevent.py; the cluster's blocking calls run in the hub's thread pool.

And on the test server: errors saying the server is no longer the primary,
wherever a `connection()` block meets them (its COMMIT).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import failover_load as load
import psycopg
import psycopg_pool
import pytest
from helpers import no_hub_and_deadline, run_threads, unique

import greenpool
from greenpool.testing import Proxy, ReplicatedCluster

#: A test must end within this many seconds.
TEST_DEADLINE = 120


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    """No hub left by another test; fail rather than hang."""
    with no_hub_and_deadline(TEST_DEADLINE):
        yield


@pytest.fixture
def cluster() -> Iterator[ReplicatedCluster]:
    """A fresh primary and synchronous replica, with the load's table; removed after the test."""
    with load.new_cluster() as made:
        yield made


def open_pool(cls: type, cluster: ReplicatedCluster, dsn: str | None = None) -> Any:
    """A pool of `POOL_SIZE` connections on both nodes, taking the one that takes writes."""
    pool = cls(
        cluster.dsn(connect_timeout=2) if dsn is None else dsn,
        min_size=load.POOL_SIZE,
        max_size=load.POOL_SIZE,
        timeout=load.POOL_TIMEOUT,
        open=False,
    )
    pool.open(wait=True)
    return pool


def pool_writer(pool: Any) -> Any:
    """One write through `pool`: an INSERT committed when the block ends; return the server's port."""

    def write(i: int) -> int:
        with pool.connection() as conn:
            row = conn.execute(load.INSERT, (i,)).fetchone()
        return int(row[0])

    return write


def failover(
    cls: type,
    cluster: ReplicatedCluster,
    fault: str,
    workers: Any,
    label: str,
    dsn: str | None = None,
    break_primary: Callable[[], None] | None = None,
    count: int = load.WORKERS,
) -> load.Failover:
    pool = open_pool(cls, cluster, dsn)
    try:
        run = load.run_failover(cluster, fault, pool_writer(pool), workers, pool.get_stats, label, break_primary, count)
    finally:
        pool.close()
    print(f"\n{run.summary()}")
    return run


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["crash", "stop"])
def test_failover_under_load(cluster: ReplicatedCluster, fault: str) -> None:
    """50 greenlets on 10 connections: the primary crashes or stops, the replica is
    promoted; nothing acknowledged is lost, no request begun after the
    promotion fails, writes resume on the new primary. A stop's 57P01 on
    lent connections counts one failover, however many heard it (a
    session waiting for its synchronous standby in COMMIT hears only EOF)."""
    run = failover(greenpool.ConnectionPool, cluster, fault, load.Greenlets(), "greenpool, greenlets")
    load.check(run)


@pytest.mark.slow
def test_failover_while_the_old_primary_hangs(cluster: ReplicatedCluster) -> None:
    """The old primary's host stops answering (connects to it hang, 1 s here,
    until `connect_timeout` in life) and it comes after the replica in the
    host list (as `load_balance_hosts=random` puts it half the time): each
    connect attempt hears "read-only" from the replica early, then hangs.
    A request that comes after the promotion, while such an attempt hangs
    on, must not fail with its stale verdict: it waits for the next attempt."""
    proxy = Proxy(cluster.host, cluster.ports[0]).start()
    try:
        dsn = cluster.dsn(connect_timeout=2).replace(
            f"port={cluster.ports[0]},{cluster.ports[1]}", f"port={cluster.ports[1]},{proxy.port}"
        )

        def hang() -> None:
            cluster.crash_primary()
            proxy.set_connect_delay(1.0)  # then the proxy's upstream connect is refused: closed

        run = failover(
            greenpool.ConnectionPool, cluster, "crash, then hang", load.Greenlets(), "greenpool, greenlets", dsn, hang
        )
    finally:
        proxy.stop()
    load.check(run)


@pytest.mark.slow
def test_failover_under_load_from_threads(cluster: ReplicatedCluster) -> None:
    """The same with 50 OS threads (the pool's jobs in threads too)."""
    run = failover(greenpool.ConnectionPool, cluster, "crash", load.Threads(), "greenpool, threads")
    load.check(run)


@pytest.mark.slow
def test_failover_under_light_load(cluster: ReplicatedCluster) -> None:
    """5 greenlets on 10 connections: half of them sit idle when the primary
    crashes; none of those dead connections is lent after the promotion."""
    run = failover(greenpool.ConnectionPool, cluster, "crash", load.Greenlets(), "greenpool, greenlets", count=5)
    load.check(run)


@pytest.mark.slow
@pytest.mark.parametrize("fault, count", [("crash", 50), ("stop", 50), ("crash", 5)])
def test_psycopg_pool_failover_measured(cluster: ReplicatedCluster, fault: str, count: int) -> None:
    """psycopg_pool in the same scenarios (OS threads: its way), for the docs: measured, not asserted."""
    run = failover(psycopg_pool.ConnectionPool, cluster, fault, load.Threads(), "psycopg_pool, threads", count=count)
    assert run.requests  # the load ran; the figures are printed


def test_a_commit_refused_by_a_server_going_away_is_a_failover(pg_dsn: str, monitor: psycopg.Connection[Any]) -> None:
    """The block's COMMIT fails with 57P01 (the server, shutting down, ends the
    session while it commits): the pool declares a failover, as for an
    error raised in the block, and the block raises it."""
    app = unique("gp_commit")
    pool = greenpool.ConnectionPool(pg_dsn, kwargs={"application_name": app}, min_size=1, max_size=2, open=False)
    pool.open(wait=True)
    try:
        with load.slow_commit_table(monitor) as table:

            def act(i: int) -> None:
                if i == 0:
                    with pool.connection() as conn:
                        conn.execute(f"insert into {table} values (1)")  # its COMMIT waits
                else:
                    load.terminate_in_commit(monitor, app)

            _, raised = run_threads(act, 2, timeout=60)
        assert [type(ex) for ex in raised] == [psycopg.errors.AdminShutdown]
        assert pool.get_stats()["failovers"] == 1
    finally:
        pool.close()

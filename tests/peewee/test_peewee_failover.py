"""Failover with Peewee's `PooledPostgresqlDatabase`.

A query's error saying the server is no longer the primary (25006 read-only,
57P01-57P03 shutdown) retires every pooled connection to it, as with the
psycopg pool: Peewee raises its own error, psycopg's is its `__context__`.

With two real servers (`greenpool.testing.ReplicatedCluster`), as
tests/pg/test_failover.py does for the psycopg pool: 50 greenlets write
through a database of 10 connections on both nodes (Peewee hands `host` and
`port`, comma-separated strings, to psycopg as they are, with
`target_session_attrs` and `connect_timeout`) while the primary crashes or
stops and the replica is promoted. Asserted: nothing acknowledged lost, no
request begun after the promotion failed, writes resume; measured and
printed (``pytest -s``): the time from the promotion to the first write.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import failover_load as load
import peewee
import psycopg
import pytest
from helpers import close_dbs, no_hub_and_deadline, pg_params, run_threads, unique

import greenpool.peewee as gpw
from greenpool.testing import ReplicatedCluster

#: A test must end within this many seconds.
TEST_DEADLINE = 120


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    """Fresh hub state, and fail (rather than hang) a test that overruns."""
    with no_hub_and_deadline(TEST_DEADLINE):
        yield


def test_a_read_only_error_replaces_every_connection(pg_dsn: str, read_only_role: str) -> None:
    """Writes refused with 25006 (Peewee's `InternalError`, psycopg's
    `ReadOnlySqlTransaction` its context) retire every pooled connection,
    counted once as a failover: the next checkout gets a new one."""
    params = pg_params(pg_dsn)
    database = params.pop("dbname")
    db = gpw.PooledPostgresqlDatabase(
        database, **{**params, "user": read_only_role}, max_connections=3, min_connections=3, timeout=10
    )
    try:
        both_lent = threading.Barrier(2, timeout=10)
        pids: list[int] = []

        def write(i: int) -> None:
            with db.connection_context():
                pids.append(db.connection().info.backend_pid)
                both_lent.wait()  # both lent before either fails
                db.execute_sql("create temporary table gp_ro_probe (x int)")

        _, raised = run_threads(write, 2, timeout=20)
        assert [type(ex) for ex in raised] == [peewee.InternalError] * 2
        assert db.pool_stats()["failovers"] == 1  # two connections to the same server: one failover
        with db.connection_context():
            assert db.connection().info.backend_pid not in pids
    finally:
        close_dbs([db])


def test_a_commit_refused_by_a_server_going_away_is_a_failover(pg_dsn: str, monitor: psycopg.Connection[Any]) -> None:
    """`atomic()`'s COMMIT fails with 57P01 (the server, shutting down, ends the
    session while it commits): a failover, as for a query's error (Peewee
    runs COMMIT past `_execute_cursor()`)."""
    app = unique("gp_commit")
    params = pg_params(pg_dsn)
    database = params.pop("dbname")
    db = gpw.PooledPostgresqlDatabase(database, **params, application_name=app, max_connections=2, timeout=10)
    try:
        with load.slow_commit_table(monitor) as table:

            def act(i: int) -> None:
                if i == 0:
                    with db.connection_context(), db.atomic():
                        db.execute_sql(f"insert into {table} values (1)")  # its COMMIT waits
                else:
                    load.terminate_in_commit(monitor, app)

            _, raised = run_threads(act, 2, timeout=60)
        assert [type(ex) for ex in raised] == [peewee.OperationalError]
        assert db.pool_stats()["failovers"] == 1
    finally:
        close_dbs([db])


def test_a_begin_refused_by_a_server_going_away_is_a_failover(pg_dsn: str, monitor: psycopg.Connection[Any]) -> None:
    """`atomic()`'s BEGIN fails with 57P01 (the server, shutting down, ended the
    session between its checkout and the BEGIN): a failover, as for a
    query's error (Peewee runs BEGIN past `_execute_cursor()`)."""
    app = unique("gp_begin")
    params = pg_params(pg_dsn)
    database = params.pop("dbname")
    db = gpw.PooledPostgresqlDatabase(database, **params, application_name=app, max_connections=2, timeout=10)
    try:
        with db.connection_context():
            pid = db.connection().info.backend_pid
            monitor.execute("select pg_terminate_backend(%s, 5000)", (pid,))  # waits until it is gone
            with pytest.raises(peewee.OperationalError) as excinfo:
                with db.atomic():
                    pass
        assert isinstance(excinfo.value.__context__, psycopg.errors.AdminShutdown)
        assert db.pool_stats()["failovers"] == 1
    finally:
        close_dbs([db])


def cluster_db(cluster: ReplicatedCluster) -> Any:
    """A pooled database of `POOL_SIZE` connections on both nodes, taking the one that takes writes."""
    params = cluster.params(connect_timeout=2)  # host="127.0.0.1,127.0.0.1", port="P0,P1", ...
    database = params.pop("dbname")
    return gpw.PooledPostgresqlDatabase(
        database,
        max_connections=load.POOL_SIZE,
        min_connections=load.POOL_SIZE,
        timeout=load.POOL_TIMEOUT,
        **params,
    )


def db_writer(db: Any) -> Any:
    """One write through `db`: an INSERT in `atomic()`, committed as it ends; return the server's port."""

    def write(i: int) -> int:
        with db.connection_context():
            with db.atomic():
                row = db.execute_sql(load.INSERT, (i,)).fetchone()
        return int(row[0])

    return write


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["crash", "stop"])
def test_failover_under_load(fault: str) -> None:
    """50 greenlets on 10 connections: the primary crashes or stops, the replica is
    promoted; nothing acknowledged is lost, no request begun after the
    promotion fails, writes resume on the new primary."""
    with load.new_cluster() as cluster:
        db = cluster_db(cluster)
        try:
            workers = load.Greenlets()
            run = load.run_failover(
                cluster, fault, db_writer(db), workers, db.pool_stats, "greenpool Peewee, greenlets"
            )
        finally:
            close_dbs([db])
    print(f"\n{run.summary()}")
    load.check(run)

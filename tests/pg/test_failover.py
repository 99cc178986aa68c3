"""Failover: errors saying the server is no longer the primary, wherever a
`connection()` block meets them (here: its COMMIT).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import failover_load as load
import psycopg
import pytest
from helpers import deadline, destroy_main_hub, run_threads, unique

import greenpool

#: A test must end within this many seconds.
TEST_DEADLINE = 120


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    """No hub left by another test (the pools here serve threads); fail rather than hang."""
    destroy_main_hub()
    with deadline(TEST_DEADLINE, dump_after=TEST_DEADLINE * 2):
        yield
    destroy_main_hub()


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

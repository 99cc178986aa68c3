"""Smoke tests against whatever ``pg_dsn`` resolves to.

``.ci/run`` runs this file a second time with ``GREENPOOL_TEST_DSN`` unset, so
that it exercises the embedded server (``greenpool.testing.embedded``) end to end.
"""

from __future__ import annotations

import psycopg


def test_select_one(pg_dsn: str) -> None:
    """A plain psycopg connection to the test server works."""
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("select 1").fetchone() == (1,)

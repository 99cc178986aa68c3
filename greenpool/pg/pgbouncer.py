"""psycopg connections through PgBouncer in transaction mode: `pgbouncer_kwargs()`.

In transaction mode PgBouncer lends a server connection to a client for one
transaction only; the client's next transaction may run on another server
connection. What lives in a server session then goes astray:

- psycopg's prepared statements: after a query ran `prepare_threshold` (5)
  times on a connection, psycopg prepares it as ``_pg3_0``, ``_pg3_1``...
  and from then on executes it by name, on whatever server connection the
  transaction lands on: ``prepared statement "_pg3_0" does not exist``, or
  ``... already exists`` where another client prepared its own ``_pg3_0``.
  PgBouncer 1.21 and later can track protocol-level prepared statements
  (``max_prepared_statements`` > 0); psycopg then needs libpq 17 or later to
  close them at the protocol level, and PgBouncer 1.22 or later for the
  ``DEALLOCATE ALL`` it sends after a rollback.
- Session state: ``SET`` (use ``SET LOCAL``), ``LISTEN``, session advisory
  locks, temporary tables, ``WITH HOLD`` cursors.

greenpool's own connections keep nothing in the session: its libpq
`NETWORK_DEFAULTS <greenpool.pg.driver.NETWORK_DEFAULTS>` are client-side
options, its checks are empty queries in autocommit, and a connection given
back inside a transaction (or with a query running) is rolled back (the
query cancelled first) before it is lent again, so no server connection
stays pinned to an idle client.
"""

from __future__ import annotations

from typing import Any

import psycopg

__all__ = ["pgbouncer_kwargs"]


def pgbouncer_kwargs(prepared_statements: bool = False) -> dict[str, Any]:
    """The connect arguments psycopg connections need behind PgBouncer in transaction mode.

    Merge them into a pool's `kwargs`, or pass them to a Peewee database::

        ConnectionPool(dsn, kwargs={**pgbouncer_kwargs(), "autocommit": False})
        PooledPostgresqlDatabase("app", host="pgbouncer", **pgbouncer_kwargs())

    `prepared_statements=False` (the default, and the only choice with
    PgBouncer older than 1.22 or ``max_prepared_statements = 0``):
    ``{"prepare_threshold": None}``, psycopg never prepares statements.
    `prepared_statements=True`: ``{}``, psycopg's own preparing stays on,
    for PgBouncer >= 1.22 with ``max_prepared_statements`` > 0; it raises
    `psycopg.NotSupportedError` when psycopg's libpq is older than 17, which
    can't close a prepared statement at the protocol level (PgBouncer
    refuses ``DEALLOCATE name``).

    Nothing session-scoped is ever among them: a ``SET`` or an
    ``options='-c ...'`` startup parameter (which PgBouncer refuses) would
    not follow the client from one server connection to the next.
    """
    if not isinstance(prepared_statements, bool):
        raise TypeError(f"prepared_statements must be True or False, got {prepared_statements!r}")
    if not prepared_statements:
        return {"prepare_threshold": None}
    if not psycopg.capabilities.has_send_close_prepared():
        raise psycopg.NotSupportedError(
            f"prepared statements through PgBouncer need libpq >= 17 (psycopg uses libpq"
            f" {psycopg.pq.version() // 10000}): use pgbouncer_kwargs(prepared_statements=False)"
        )
    return {}

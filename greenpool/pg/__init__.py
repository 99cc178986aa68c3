"""psycopg 3 on the greenpool engine.

- `pool`: `ConnectionPool` and `NullConnectionPool`, drop-ins for psycopg_pool's.
- `connection`: `GeventConnection`, a `psycopg.Connection` that waits through gevent.
- `driver`: the engine's psycopg driver: making, checking and repairing connections.
- `errors`: the pools' errors, also psycopg_pool's classes.
- `pgbouncer`: `pgbouncer_kwargs()`, the connect arguments for PgBouncer's transaction mode.
"""

from __future__ import annotations

from .connection import GeventConnection
from .errors import PoolClosed, PoolTimeout, TooManyRequests
from .pgbouncer import pgbouncer_kwargs
from .pool import ConnectionPool, NullConnectionPool

__all__ = [
    "ConnectionPool",
    "GeventConnection",
    "NullConnectionPool",
    "PoolClosed",
    "PoolTimeout",
    "TooManyRequests",
    "pgbouncer_kwargs",
]

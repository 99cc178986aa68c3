"""Test helpers for code that uses greenpool, as `gevent.testing` is for gevent's.

- `proxy`: `Proxy`, a loopback TCP proxy in a child process for fault
  injection: delay new connections, kill every relayed one, refuse new ones.
- `embedded`: `embedded_dsn()`, a throw-away PostgreSQL server (the
  `embedded` extra's `pgserver` wheel) for machines without one.
- `cluster`: `ReplicatedCluster`, a throw-away PostgreSQL primary and its
  synchronous streaming replica, to crash or stop the primary and promote
  the replica under load (failover tests).
- `pgbouncer`: `PgBouncer`, a throw-away PgBouncer (the ``pgbouncer``
  program) in front of a server, on a free loopback port.
- `childproc`: the line-protocol child processes they run in.

greenpool's own tests and benchmark use them; so may yours::

    from greenpool.testing import Proxy, ReplicatedCluster, embedded_dsn

    with Proxy("127.0.0.1", 5432) as proxy:
        pool = ConnectionPool(proxy.dsn(dsn), open=True)
        proxy.kill_connections()  # every pooled connection breaks

    with ReplicatedCluster() as cluster:
        pool = ConnectionPool(cluster.dsn(), open=True)  # target_session_attrs=read-write
        cluster.crash_primary()
        cluster.promote()  # the pool's requests go to the new primary

Names are imported on first use: the child processes run these modules as
``__main__`` and must not find them imported already.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "ClusterError",
    "HelperError",
    "PgBouncer",
    "PgBouncerMissing",
    "PostgresNotFound",
    "Proxy",
    "ReplicatedCluster",
    "embedded_dsn",
    "parse_dsn_host_port",
]

_WHERE = {
    "HelperError": "childproc",
    "Proxy": "proxy",
    "parse_dsn_host_port": "proxy",
    "embedded_dsn": "embedded",
    "ReplicatedCluster": "cluster",
    "ClusterError": "cluster",
    "PostgresNotFound": "cluster",
    "PgBouncer": "pgbouncer",
    "PgBouncerMissing": "pgbouncer",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'greenpool.testing' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value

"""The engine's driver for Peewee's PostgreSQL databases: psycopg 3, through `GeventConnection`."""

from __future__ import annotations

import logging
from typing import Any

import peewee

from ..pg.connection import GeventConnection
from ..pg.driver import (
    ACTIVE,
    checkout_status,
    is_failover_error,
    is_permanent_error,
    network_defaults,
    pool_status,
    settle,
)
from .drivers import DatabaseDriver

logger = logging.getLogger("greenpool.peewee")


class PostgresDriver(DatabaseDriver):
    """psycopg 3, connected through `GeventConnection`."""

    # Functions, not methods: one call per return or checkout.
    status = staticmethod(pool_status)
    checkout_status = staticmethod(checkout_status)
    is_failover = staticmethod(is_failover_error)
    is_permanent = staticmethod(is_permanent_error)

    def configure(self, connect_kwargs: dict[str, Any]) -> None:
        """Make peewee choose its psycopg 3 adapter."""
        connect_kwargs["prefer_psycopg3"] = True

    def adopt(self, db: Any) -> None:
        """Make peewee's adapter connect with `GeventConnection`."""
        db._adapter.__class__ = gevent_adapter(type(db._adapter))

    def busy(self, conn: Any) -> bool:
        """A query still runs: the connection is ACTIVE."""
        return bool(conn.pgconn.transaction_status == ACTIVE)

    def is_closed(self, conn: Any) -> bool:
        """Closed by psycopg, or found closed by peewee's adapter (a round trip)."""
        return bool(conn.closed) or bool(self.db._adapter.is_connection_closed(conn))

    def can_reuse(self, conn: Any) -> bool:
        """Cancel a running query, roll back (`greenpool.pg.driver.settle`)."""
        try:
            settle(conn)
        except Exception as ex:
            logger.warning("discarding connection: %s", ex)
            return False
        return True


class GeventPsycopg3Adapter(peewee.Psycopg3Adapter):
    """Peewee's psycopg 3 adapter, connecting with `GeventConnection`."""

    def connect(self, db: Any, **params: Any) -> Any:
        """Connect as peewee's adapter does, with `GeventConnection`."""
        if db._encoding:
            params.setdefault("client_encoding", db._encoding)
        if db.database.startswith("postgresql://"):
            params.setdefault("conninfo", db.database)
        else:
            params.setdefault("dbname", db.database)
        conninfo = params.pop("conninfo", "")
        return GeventConnection.connect(conninfo, **network_defaults(conninfo, params), **params)


_GEVENT_GEVENT_ADAPTERS: dict[type, type] = {peewee.Psycopg3Adapter: GeventPsycopg3Adapter}


def gevent_adapter(base: type) -> type:
    """`base`, a peewee psycopg 3 adapter class, connecting with `GeventConnection`.

    `GeventPsycopg3Adapter` comes right after `base` and its own bases in
    the method resolution order, in place of peewee's `connect()`: a `base`
    with a `connect()` of its own that calls `super().connect()` (to set
    something up on each connection) keeps it.
    """
    if base in _GEVENT_GEVENT_ADAPTERS.values():
        return base
    if base not in _GEVENT_GEVENT_ADAPTERS:
        _GEVENT_GEVENT_ADAPTERS[base] = type(f"Gevent{base.__name__}", (base, GeventPsycopg3Adapter), {})
    return _GEVENT_GEVENT_ADAPTERS[base]

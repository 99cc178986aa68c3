"""The engine's drivers for Peewee databases, one per server kind (backends).

A `DatabaseDriver` makes connections the way the database class would
(peewee's own `_connect()`), judges and repairs them the way its server
needs: psycopg 3 (`greenpool.peewee.postgres.PostgresDriver`), pymysql
(`MySQLDriver`), sqlite3 (`SqliteDriver`); any other class gets the base, which trusts its
connections. `driver_for()` picks one. A database subclass that overrides
playhouse's hooks `_is_closed(conn)` or `_can_reuse(conn)` keeps them: the
probe and the clean-up call those.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import peewee

from .. import errors
from .._runtime.hub import gevent_hub, readiness_poller
from ..engine.driver import BROKEN, DIRTY, OK, Driver

logger = logging.getLogger("greenpool.peewee")


class DatabaseDriver(Driver[Any]):
    """Connections of one Peewee database; the base trusts them as they are.

    `base` is `db` as the pooling mixin's `super()` sees it: its
    `_connect()` and `_close(conn)` are the database class's own, looked up
    at each call (as peewee's `connect()` looks up `_connect()`).
    """

    #: playhouse connects in the caller: a connect's error is a request's.
    connect_error_fails_a_request = True
    #: Mark connections busy during queries (when the driver can't tell).
    marks_busy = False

    def __init__(self, db: Any, base: Any) -> None:
        self.db = db
        self._base = base

    def configure(self, connect_kwargs: dict[str, Any]) -> None:
        """Adjust the database's connect parameters before peewee's `init()`."""

    def adopt(self, db: Any) -> None:
        """Adjust the database after peewee's `init()`."""

    def connect(self) -> Any:
        """A new connection, made as the database class makes them."""
        return self._base._connect()

    def close(self, conn: Any) -> None:
        """Close `conn` as the database class does; errors are only logged."""
        try:
            self._base._close(conn)
        except Exception:
            logger.debug("error closing connection %s", id(conn), exc_info=True)

    def status(self, conn: Any) -> int:
        """`OK`, `DIRTY` or `BROKEN`, without I/O."""
        return OK

    def ping(self, conn: Any) -> None:
        """The database's `_is_closed(conn)` probe (playhouse's hook); raise if closed."""
        if self.db._is_closed(conn):
            raise errors.PoolError("connection is closed")

    def clean(self, conn: Any) -> None:
        """The database's `_can_reuse(conn)` (playhouse's hook); raise if it can't be reused."""
        if not self.db._can_reuse(conn):
            raise errors.PoolError("connection can't be reused")

    def is_closed(self, conn: Any) -> bool:
        """Probe the connection; True if it is unusable."""
        return False

    def busy(self, conn: Any) -> bool:
        """Whether a query interrupted mid-flight still runs on `conn` (no I/O).

        Then a rollback can't be sent: the pool repairs the connection when
        it comes back (see `PooledDatabase.rollback`).
        """
        return False

    def can_reuse(self, conn: Any) -> bool:
        """Settle a returned connection; False if it can't be reused."""
        return True


class MySQLDriver(DatabaseDriver):
    """pymysql: pure Python on the `socket` module, so under gevent it
    cooperates once `monkey.patch_all()` has run (before or after import)."""

    marks_busy = True
    hub_bound = True  # patched sockets: gevent's belong to the hub that made them

    def connect(self) -> Any:
        """As peewee's `MySQLDatabase._connect()`, sharing pymysql's TLS context."""
        # Not for another driver than pymysql, nor for a class with a
        # `_connect()` of its own: it connects its way.
        if (
            getattr(getattr(peewee, "mysql", None), "__name__", None) != "pymysql"
            or getattr(self._base._connect, "__func__", None) is not vars(peewee.MySQLDatabase)["_connect"]
        ):
            return super().connect()
        connection_class = _shared_context_connection_class()
        return connection_class(database=self.db.database, autocommit=True, **self.db.connect_params)

    def status(self, conn: Any) -> int:
        """`DIRTY` while a query was interrupted or a transaction is open."""
        if getattr(conn, "_greenpool_busy", False):
            # A query was interrupted mid-flight (pymysql may have closed the
            # socket already): it still runs on the server until killed.
            return DIRTY
        if not getattr(conn, "open", True) or _blocking_under_gevent(conn):
            return BROKEN
        server_status = getattr(conn, "server_status", 0) or 0
        return DIRTY if server_status & 1 else OK  # SERVER_STATUS_IN_TRANS

    def checkout_status(self, conn: Any) -> int:
        """`status()`, and `BROKEN` if the server closed `conn` or sent it an error while idle.

        No round trip: idle, the server sends nothing but its goodbye (an
        error packet, `KILL`, `wait_timeout`) then EOF: a readable socket.
        """
        status = self.status(conn)
        sock = getattr(conn, "_sock", None)
        if status != OK or sock is None:
            return status
        fd = sock.fileno()
        watched = getattr(conn, "_greenpool_poller", None)
        if watched is None or watched[0] != fd:  # pymysql's ping(True) makes a new socket
            watched = conn._greenpool_poller = (fd, readiness_poller(fd))
        return BROKEN if watched[1].poll(0) else OK

    def is_permanent(self, error: BaseException) -> bool:
        """Access denied (1044, 1045) or an unknown database (1049)."""
        args: tuple[Any, ...] = getattr(error, "args", ())
        return bool(args) and args[0] in (1044, 1045, 1049)

    def is_failover(self, error: BaseException) -> bool:
        """Server shutdown (1053) or read-only (1290, 1836: a replica, a demoted primary)."""
        args: tuple[Any, ...] = getattr(error, "args", ())
        return bool(args) and args[0] in (1053, 1290, 1836)

    def busy(self, conn: Any) -> bool:
        """Marked busy by `while_busy()`: a query was interrupted mid-result."""
        return bool(getattr(conn, "_greenpool_busy", False))

    def is_closed(self, conn: Any) -> bool:
        """`ping(False)`: never pymysql's silent reconnect."""
        try:
            try:
                conn.ping(False)
            except TypeError:  # a driver whose ping() takes no argument (MariaDB's), as playhouse
                conn.ping()
        except Exception:
            return True
        return False

    def can_reuse(self, conn: Any) -> bool:
        """Roll back; a connection interrupted mid-result has its query killed, and is dropped."""
        if getattr(conn, "_greenpool_busy", False):
            # The protocol stream is mid-result: stop the query on the server
            # from another connection, and drop this one.
            self._kill_query(conn)
            return False
        try:
            conn.rollback()
        except Exception:
            return False
        return True

    def _kill_query(self, conn: Any) -> None:
        try:
            killer = self.connect()
            try:
                killer.cursor().execute(f"KILL QUERY {int(conn.thread_id())}")
            finally:
                self.close(killer)
        except Exception as ex:
            logger.warning("couldn't cancel the interrupted query: %s", ex)


class SqliteDriver(DatabaseDriver):
    """sqlite3: connections made in the pool's background jobs, closed in the caller."""

    closes_inline = True

    def configure(self, connect_kwargs: dict[str, Any]) -> None:
        """Let connections be used by other threads than their maker's."""
        # The pool's background jobs make and close connections.
        connect_kwargs.setdefault("check_same_thread", False)

    def status(self, conn: Any) -> int:
        """`DIRTY` inside a transaction; `BROKEN` once closed."""
        try:
            return DIRTY if conn.in_transaction else OK
        except Exception:
            return BROKEN

    def is_closed(self, conn: Any) -> bool:
        """Whether reading a property of `conn` raises (it does once closed)."""
        try:
            return conn.total_changes is None  # raises once closed
        except Exception:
            return True

    def can_reuse(self, conn: Any) -> bool:
        """Roll back an open transaction."""
        try:
            if conn.in_transaction:
                conn.rollback()
        except Exception:
            return False
        return True


def driver_for(db: Any, base: Any) -> DatabaseDriver:
    """The driver for `db`'s server kind (see the module docstring); `base`: see `DatabaseDriver`."""
    if isinstance(db, peewee.PostgresqlDatabase):
        # psycopg is an optional extra: imported only for a PostgreSQL database.
        from .postgres import PostgresDriver

        return PostgresDriver(db, base)
    if isinstance(db, peewee.MySQLDatabase):
        return MySQLDriver(db, base)
    if isinstance(db, peewee.SqliteDatabase):
        return SqliteDriver(db, base)
    return DatabaseDriver(db, base)


def while_busy(conn: Any, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)`, with `conn` marked busy (for `MySQLDriver`) until it returns.

    The mark stays only if the call is interrupted (gevent.Timeout, a kill):
    then the connection is mid-result, its query still running on the
    server. A call failing afterwards on that dead connection keeps it.
    """
    was_busy = getattr(conn, "_greenpool_busy", False)
    conn._greenpool_busy = True
    try:
        result = call(*args, **kwargs)
    except Exception:
        conn._greenpool_busy = was_busy
        raise
    conn._greenpool_busy = False
    return result


def _blocking_under_gevent(conn: Any) -> bool:
    """True for a pymysql connection unusable by this caller under gevent.

    Made before `monkey.patch_all()`, its socket blocks the hub; made in
    another thread's hub (a background job of a pool opened before the
    patch, before the main hub was seen), its patched socket can't switch
    to that hub ("cannot switch to a different thread"). Replace it with
    one made here.
    """
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("socket"):
        return False
    from gevent.socket import socket as green_socket

    sock = getattr(conn, "_sock", None)
    if sock is None:
        return False
    if not isinstance(sock, green_socket):
        return True
    hub = gevent_hub()
    return hub is not None and sock.hub is not hub


@functools.cache
def _shared_context_connection_class() -> Any:
    """pymysql's connection class for `MySQLDriver` (made once, when first needed)."""
    import pymysql

    class SharedContextConnection(pymysql.connections.Connection):  # type: ignore[misc]  # pymysql: no type hints
        """pymysql's connection, building its default TLS context once, and
        marking itself busy while a query runs (see `while_busy`).

        With no TLS option pymysql "prefers" TLS and builds a fresh
        `ssl.create_default_context()` (loading the CA store) for every
        connection: about 20 ms of CPU that blocks the gevent hub. The
        context is the same every time and safe to share.
        """

        _default_context: Any = None

        def query(self, sql: Any, unbuffered: bool = False) -> Any:
            # What every cursor's execute() comes down to, `db.cursor()`'s too.
            return while_busy(self, super().query, sql, unbuffered)

        def _create_ssl_ctx(self, sslp: Any) -> Any:
            if sslp != {}:
                return super()._create_ssl_ctx(sslp)
            cls = type(self)
            if cls._default_context is None:
                cls._default_context = super()._create_ssl_ctx(sslp)
            return cls._default_context

    return SharedContextConnection

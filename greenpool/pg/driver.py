"""The psycopg 3 driver of the engine: how pooled psycopg connections are made and repaired."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import psycopg
from psycopg import errors as e
from psycopg.conninfo import conninfo_to_dict
from psycopg.generators import fetch_many, send
from psycopg.pq import TransactionStatus

from .._runtime.hub import readiness_poller
from ..engine.driver import BROKEN, DIRTY, OK, Driver

logger = logging.getLogger("greenpool.pg")

CT = TypeVar("CT", bound="psycopg.Connection[Any]")

ConninfoParam = str | Callable[[], str]
KwargsParam = dict[str, Any] | Callable[[], dict[str, Any]]

#: Seconds allowed for each step of settling a returned connection (finish
#: sending an interrupted query, cancel it, drain it, roll back): a server
#: that stopped answering costs the connection, not a cleaner for good.
SETTLE_TIMEOUT = 5.0

# Plain ints: an enum member lookup costs more than the rest of the check.
IDLE = int(TransactionStatus.IDLE)
ACTIVE = int(TransactionStatus.ACTIVE)
_UNKNOWN = int(TransactionStatus.UNKNOWN)


def pool_status(conn: psycopg.Connection[Any]) -> int:
    """The engine's view of a connection, without I/O: OK, DIRTY or BROKEN."""
    status = conn.pgconn.transaction_status
    if status == IDLE:
        return OK
    return BROKEN if status == _UNKNOWN else DIRTY


#: Set on every pooled connection unless its conninfo or kwargs say
#: otherwise: a connect that gets no answer ends after `connect_timeout`
#: seconds per host (psycopg waits 130 s when it's unset), and TCP
#: keepalives find a peer gone from the network in about a minute of
#: silence (idle 30 s, then 3 probes 10 s apart).
NETWORK_DEFAULTS = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}


def network_defaults(conninfo: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The `NETWORK_DEFAULTS` that neither `conninfo` nor `kwargs` set."""
    given = conninfo_to_dict(conninfo) if conninfo else {}
    return {key: value for key, value in NETWORK_DEFAULTS.items() if key not in given and key not in kwargs}


#: SQLSTATEs saying the server is no longer the primary: shutting down (57P01
#: admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now) or
#: read-only (25006: a standby, or a demoted primary).
FAILOVER_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "25006"})


def is_failover_error(error: BaseException) -> bool:
    """Whether `error` (or the driver error it wraps) has one of the `FAILOVER_SQLSTATES`.

    A wrapper's driver error is its `__cause__` (``raise ... from``), or its
    `__context__` when it was raised while handling it, as Peewee raises its
    own errors (``peewee.InternalError`` for psycopg's 25006).
    """
    found: BaseException | None = error
    while found is not None and not isinstance(found, psycopg.Error):
        cause = found.__cause__
        if cause is None and not found.__suppress_context__:
            cause = found.__context__
        found = cause
    return found is not None and found.sqlstate in FAILOVER_SQLSTATES


#: SQLSTATEs of connect errors that retrying won't fix soon: authentication
#: (28P01, 28000: also an unknown role) and an unknown database (3D000).
PERMANENT_SQLSTATES = frozenset({"28P01", "28000", "3D000"})


#: libpq reports a failed connect without its SQLSTATE: the server's FATAL
#: messages (English, the server's default `lc_messages`) for the same errors.
PERMANENT_MESSAGES = (
    "password authentication failed",
    "no pg_hba.conf entry",
    "does not exist",  # database "x", role "x"
)


def is_permanent_error(error: BaseException) -> bool:
    """Whether a connect's `error` is a configuration error (see `PERMANENT_SQLSTATES`)."""
    if not isinstance(error, psycopg.Error):
        return False
    if error.sqlstate is not None:
        return error.sqlstate in PERMANENT_SQLSTATES
    message = str(error)
    return "FATAL:" in message and any(text in message for text in PERMANENT_MESSAGES)


def checkout_status(conn: psycopg.Connection[Any]) -> int:
    """`pool_status()`, and `BROKEN` if the server closed `conn` (or sent it an error) while idle.

    No round trip: a zero-timeout poll of the socket. Idle in the pool, a
    connection hears from the server only its goodbye: a FATAL error
    (`pg_terminate_backend()`, a shutdown, `idle_session_timeout`), then EOF.
    (Or a notification, for a connection returned with a LISTEN on: pooled,
    that connection is dropped too, as go-sql-driver/mysql's connCheck drops
    any connection with unread data.)
    """
    pgconn = conn.pgconn
    status = pgconn.transaction_status
    if status != IDLE:
        return BROKEN if status == _UNKNOWN else DIRTY
    pooled: Any = conn  # psycopg's types don't know the attribute
    try:
        poller = pooled._greenpool_poller
    except AttributeError:  # its socket is the same for life: one poller
        poller = pooled._greenpool_poller = readiness_poller(pgconn.socket)
    return BROKEN if poller.poll(0) else OK


def is_busy(conn: psycopg.Connection[Any]) -> bool:
    """Whether a query still runs on `conn` (interrupted mid-flight): libpq's status is ACTIVE."""
    return bool(conn.pgconn.transaction_status == ACTIVE)


def settle(conn: psycopg.Connection[Any]) -> None:
    """Bring a returned connection back to IDLE, or raise if it can't be.

    A query interrupted mid-flight (`gevent.Timeout`, a killed greenlet)
    leaves the connection ACTIVE: cancel it on the server and read the rest
    of its results, so it neither runs on orphaned nor blocks the next
    command (psycopg #1198). Then roll back any open transaction.
    """
    status = conn.pgconn.transaction_status
    if status == TransactionStatus.ACTIVE:
        logger.warning("cancelling the query of a connection returned busy: %s", conn)
        # Interrupted while still sending? The server ignores a cancel until
        # it has the whole query: finish sending it first.
        conn.wait(send(conn.pgconn), timeout=SETTLE_TIMEOUT)
        conn.cancel_safe(timeout=SETTLE_TIMEOUT)
        conn.wait(_drain(conn.pgconn), timeout=SETTLE_TIMEOUT)
        status = conn.pgconn.transaction_status
    if status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
        logger.info("rolling back returned connection: %s", conn)
        with conn.lock:  # `conn.rollback()`, with a timeout
            conn.wait(conn._rollback_gen(), timeout=SETTLE_TIMEOUT)
    status = conn.pgconn.transaction_status
    if status != TransactionStatus.IDLE:
        raise e.ProgrammingError(f"connection left in status {TransactionStatus(status).name}: discarded")


def _drain(pgconn: Any) -> Any:
    """A psycopg generator reading results until the connection is idle."""
    yield from fetch_many(pgconn)


def check_connection(conn: psycopg.Connection[Any]) -> None:
    """Verify with a round trip that `conn` works; raise if it doesn't.

    Usable as a pool's `check` callback, like psycopg_pool's.
    """
    if conn.autocommit:
        conn.execute("")
    else:
        conn.autocommit = True
        try:
            conn.execute("")
        finally:
            try:
                conn.autocommit = False
            except Exception:
                # Broken, or interrupted mid round trip (psycopg refuses
                # while ACTIVE): never lend it on in autocommit. Break it
                # (`close()` would return it instead, with `close_returns`).
                conn.pgconn.finish()


def call_pooled(pool: Any, callback: Callable[[Any], None], conn: Any) -> None:
    """Call `callback(conn)` with `conn` marked as `pool`'s, as psycopg_pool does.

    So a callback's `with conn:` commits or rolls back instead of closing it.
    """
    conn._pool = pool
    try:
        callback(conn)
    finally:
        conn._pool = None


class PsycopgDriver(Driver[CT], Generic[CT]):
    """Connections made by `connection_class.connect(conninfo, **kwargs)`.

    `conninfo` and `kwargs` may be callables, called for each connect.
    `configure(conn)` runs on each new connection; `reset(conn)`, if given,
    on each return (so every return is `DIRTY`), in the background. Both
    must leave the connection idle. `pool` is the pool the callbacks see
    as the connection's (`conn._pool`).
    """

    status = staticmethod(pool_status)
    checkout_status = staticmethod(checkout_status)
    is_failover = staticmethod(is_failover_error)
    is_permanent = staticmethod(is_permanent_error)
    busy = staticmethod(is_busy)

    def __init__(
        self,
        pool: Any,
        conninfo: ConninfoParam,
        kwargs: KwargsParam | None,
        connection_class: type[CT],
        configure: Callable[[CT], None] | None = None,
        reset: Callable[[CT], None] | None = None,
    ) -> None:
        self.conninfo = conninfo
        self.kwargs = kwargs
        self.connection_class = connection_class
        self.configure = configure
        self.reset = reset
        self._pool = weakref.ref(pool)  # not a cycle: a dropped pool is freed at once

    def connect(self) -> CT:
        """Connect, then run `configure`; close the connection if it fails."""
        conninfo = self.conninfo() if callable(self.conninfo) else self.conninfo
        kwargs = self.kwargs() if callable(self.kwargs) else (self.kwargs or {})
        conn = self.connection_class.connect(conninfo, **network_defaults(conninfo, kwargs), **kwargs)
        conn._pool = None
        if self.configure is not None:
            try:
                self._run_callback("configure", self.configure, conn)
            except BaseException:
                conn.close()
                raise
        return conn

    def close(self, conn: CT) -> None:
        """Close `conn`, and drop the pool's references to it."""
        c: Any = conn
        c._pool = None
        # The slot refers to the connection: without this reference cycle
        # the connection and its psycopg objects are freed as soon as the
        # pool drops them, not left to a full collection of the cyclic GC.
        c._pool_slot = None
        conn.close()

    def clean(self, conn: CT) -> None:
        """Settle a returned connection (see `settle()`), then run `reset`."""
        settle(conn)
        if self.reset is not None:
            self._run_callback("reset", self.reset, conn)

    def ping(self, conn: CT) -> None:
        """A round trip: the pool's `check_connection()` (a subclass may override it)."""
        pool = self._pool()
        (check_connection if pool is None else pool.check_connection)(conn)

    def _run_callback(self, role: str, callback: Callable[[Any], None], conn: Any) -> None:
        """Run a user callback on a connection, which it must leave idle."""
        call_pooled(self._pool(), callback, conn)
        status = conn.pgconn.transaction_status
        if status != IDLE:
            raise e.ProgrammingError(
                f"connection left in status {TransactionStatus(status).name} by {role} function {callback}: discarded"
            )


class ResettingPsycopgDriver(PsycopgDriver[CT]):
    """A `PsycopgDriver` with a `reset` callback: every return needs cleaning."""

    def status(self, conn: psycopg.Connection[Any]) -> int:
        """`pool_status()`, but `DIRTY` for `OK`: `reset` runs on every return."""
        status = pool_status(conn)
        return DIRTY if status == OK else status

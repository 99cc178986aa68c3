"""psycopg 3 pools on the greenpool engine: drop-ins for psycopg_pool's.

`ConnectionPool` takes psycopg_pool's constructor parameters with the same
defaults, has the same methods and raises the same errors (subclasses of
`psycopg.OperationalError` and, when psycopg_pool is installed, of its error
classes too, so existing `except psycopg_pool.PoolTimeout` keeps working).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import psycopg
from psycopg import errors as e
from psycopg.pq import TransactionStatus

from . import errors
from .engine import DIRTY, GONE, OK, Pool, Slot, _check_positive
from .pgconn import _ACTIVE, _IDLE, GeventConnection, pool_status, settle

logger = logging.getLogger("greenpool")

CT = TypeVar("CT", bound="psycopg.Connection[Any]")

ConninfoParam = str | Callable[[], str]
KwargsParam = dict[str, Any] | Callable[[], dict[str, Any]]

try:
    import psycopg_pool as _psycopg_pool

    _COMPAT: dict[str, tuple[type, ...]] = {
        name: (getattr(_psycopg_pool, name),) for name in ("PoolTimeout", "PoolClosed", "TooManyRequests")
    }
except ImportError:  # pragma: no cover - psycopg_pool is optional
    _COMPAT = {name: (e.OperationalError,) for name in ("PoolTimeout", "PoolClosed", "TooManyRequests")}


class PoolTimeout(errors.PoolTimeout, *_COMPAT["PoolTimeout"]):  # type: ignore[misc]
    """The pool couldn't provide a connection in acceptable time."""


class PoolClosed(errors.PoolClosed, *_COMPAT["PoolClosed"]):  # type: ignore[misc]
    """Attempt to get a connection from a closed pool."""


class TooManyRequests(errors.TooManyRequests, *_COMPAT["TooManyRequests"]):  # type: ignore[misc]
    """Too many requests in the queue waiting for a connection from the pool."""


_UNLIMITED = 2**31 - 1


class ConnectionPool(Pool[CT], Generic[CT]):
    """A pool of psycopg connections, drop-in for `psycopg_pool.ConnectionPool`.

    Parameters are psycopg_pool's, with the same defaults, plus the engine's
    `lifetime_jitter`, `segments`, `check_idle` and `leak_threshold` (see the
    README). `connection_class` defaults to `GeventConnection`, which behaves
    as `psycopg.Connection` outside gevent and cooperates with gevent inside.
    """

    PoolTimeout = PoolTimeout
    PoolClosed = PoolClosed
    TooManyRequests = TooManyRequests

    def __init__(
        self,
        conninfo: ConninfoParam = "",
        *,
        connection_class: type[CT] = GeventConnection,  # type: ignore[assignment]
        kwargs: KwargsParam | None = None,
        min_size: int = 4,
        max_size: int | None = None,
        open: bool | None = None,
        configure: Callable[[CT], None] | None = None,
        check: Callable[[CT], None] | None = None,
        reset: Callable[[CT], None] | None = None,
        name: str | None = None,
        close_returns: bool = False,
        timeout: float = 30.0,
        max_waiting: int = 0,
        max_lifetime: float = 60 * 60.0,
        max_idle: float = 10 * 60.0,
        reconnect_timeout: float = 5 * 60.0,
        reconnect_failed: Callable[[Any], None] | None = None,
        num_workers: int = 3,
        lifetime_jitter: float = 0.1,
        segments: int = 4,
        check_idle: float = 0.0,
        leak_threshold: float | None = None,
    ) -> None:
        if not (isinstance(conninfo, str) or callable(conninfo)):
            raise TypeError(f"conninfo must be a string or a callable, got {conninfo!r}")
        if not (isinstance(connection_class, type) and issubclass(connection_class, psycopg.Connection)):
            raise TypeError(f"connection_class must be a psycopg.Connection subclass, got {connection_class!r}")
        if kwargs is not None and not (isinstance(kwargs, dict) or callable(kwargs)):
            raise TypeError(f"kwargs must be a dict or a callable, got {kwargs!r}")
        if open is not None and not isinstance(open, bool):
            raise TypeError(f"open must be True, False or None, got {open!r}")
        if not isinstance(close_returns, bool):
            raise TypeError(f"close_returns must be True or False, got {close_returns!r}")
        for pname, value in (("configure", configure), ("reset", reset)):
            if value is not None and not callable(value):
                raise TypeError(f"{pname} must be callable or None, got {value!r}")
        self.conninfo = conninfo
        self.kwargs = kwargs
        self.connection_class = connection_class
        self._configure = configure
        self._reset = reset
        self.close_returns = close_returns
        super().__init__(
            min_size=min_size,
            max_size=max_size,
            name=name,
            timeout=timeout,
            max_waiting=max_waiting,
            max_lifetime=max_lifetime,
            lifetime_jitter=lifetime_jitter,
            max_idle=max_idle,
            reconnect_timeout=reconnect_timeout,
            reconnect_failed=reconnect_failed,
            num_workers=num_workers,
            segments=segments,
            check=functools.partial(_call_pooled, self, check) if callable(check) else check,
            check_idle=check_idle,
            leak_threshold=leak_threshold,
        )
        #: `_status()` of an idle connection, if it is always the same; None: ask.
        self._idle_status: int | None = None
        if reset is None and type(self)._status is ConnectionPool._status:
            # Checked on every return: skip a call layer when there's no reset.
            self._status = pool_status  # type: ignore[method-assign]
            self._idle_status = OK
        self._open_implicit = open is None
        if open is None or open:
            self.open()

    # -- engine hooks ----------------------------------------------------

    def _open_connection(self) -> CT:
        conninfo = self.conninfo() if callable(self.conninfo) else self.conninfo
        kwargs = self.kwargs() if callable(self.kwargs) else (self.kwargs or {})
        conn = self.connection_class.connect(conninfo, **kwargs)
        conn._pool = None
        if self._configure is not None:
            try:
                _run_callback(self, "configure", self._configure, conn)
            except BaseException:
                conn.close()
                raise
        return conn

    def _close_connection(self, conn: CT) -> None:
        conn._pool = None
        # The slot refers to the connection: without this reference cycle
        # the connection and its psycopg objects are freed as soon as the
        # pool drops them, not left to a full collection of the cyclic GC.
        conn._pool_slot = None  # type: ignore[attr-defined]
        conn.close()

    def _status(self, conn: CT) -> int:
        status = pool_status(conn)
        # The reset callback runs on every return, so every return is dirty.
        return DIRTY if status == OK and self._reset is not None else status

    def _clean(self, conn: CT) -> None:
        settle(conn)
        if self._reset is not None:
            _run_callback(self, "reset", self._reset, conn)

    def _ping(self, conn: CT) -> None:
        self.check_connection(conn)

    # -- psycopg_pool API ------------------------------------------------

    def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        """Open the pool and fill it in the background (see `wait()`)."""
        super().open(wait=wait, timeout=timeout)

    def wait(self, timeout: float = 30.0) -> None:
        """Block until `min_size` connections are ready (see the engine's `wait()`)."""
        if self._open_implicit:
            self._warn_open_implicit()
        super().wait(timeout)

    def __enter__(self) -> ConnectionPool[CT]:
        self._open_implicit = False
        self.open()
        return self

    def connection(self, timeout: float | None = None) -> _Lease[CT]:
        """Context manager lending a connection, returned on exit.

        The connection's own context applies: commit on success, roll back
        on error. Wait up to `timeout` (default `self.timeout`) seconds.
        """
        # No __init__: calling into Python from C is the dearest part of a
        # small object's creation, and one is made per checkout.
        lease = _new_object(_Lease)
        lease._pool = self
        lease._timeout = timeout
        return lease

    def getconn(self, timeout: float | None = None) -> CT:
        """Lend a connection; you must give it back with `putconn()`."""
        if self._open_implicit:
            self._warn_open_implicit()
        return self._lend_connection(self.acquire(timeout))

    def _warn_open_implicit(self) -> None:
        """psycopg_pool's warning, before the first checkout of a pool opened implicitly."""
        self._open_implicit = False
        warnings.warn(
            f"the default for the {type(self).__name__} 'open' parameter will become 'False'"
            " in a future release. Please use open={True|False} explicitly, or use the pool"
            f" as context manager using: `with {type(self).__name__}(...) as pool: ...`",
            DeprecationWarning,
            stacklevel=3,
        )

    def _lend_connection(self, slot: Slot[CT]) -> CT:
        conn = slot.conn
        conn._pool = self  # type: ignore[assignment]
        conn._pool_slot = slot  # type: ignore[attr-defined]
        conn._pool_lease = None  # type: ignore[attr-defined]
        return conn

    def putconn(self, conn: CT) -> None:
        """Give back a connection obtained with `getconn()`."""
        pool = getattr(conn, "_pool", None)
        if pool is not self:
            if pool is not None:
                where = f"it comes from pool {pool.name!r}"
            elif getattr(conn, "_pool_slot", None) in self._slots:
                where = "it was given back already"
            else:
                where = "it doesn't come from any pool"
            raise ValueError(f"can't return connection to pool {self.name!r}, {where}: {conn}")
        slot = conn._pool_slot  # type: ignore[attr-defined]
        conn._pool = None
        conn._pool_lease = None  # type: ignore[attr-defined]
        if slot is not None:  # else closed by the pool (`close_lent()`) since `_pool` was read
            self.release(slot)

    @staticmethod
    def check_connection(conn: CT) -> None:
        """Verify with a round trip that `conn` works; raise if it doesn't.

        Usable as the `check` callback, like psycopg_pool's.
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


def _run_callback(pool: ConnectionPool[Any], role: str, callback: Callable[[Any], None], conn: Any) -> None:
    """Run a user callback on a connection, which it must leave idle."""
    _call_pooled(pool, callback, conn)
    status = conn.pgconn.transaction_status
    if status != _IDLE:
        raise e.ProgrammingError(
            f"connection left in status {TransactionStatus(status).name} by {role} function {callback}: discarded"
        )


def _call_pooled(pool: ConnectionPool[Any], callback: Callable[[Any], None], conn: Any) -> None:
    """Call `callback(conn)` with `conn` marked as the pool's, as psycopg_pool does.

    So a callback's `with conn:` commits or rolls back instead of closing it.
    """
    conn._pool = pool
    try:
        callback(conn)
    finally:
        conn._pool = None


_new_object = object.__new__


class _Lease(Generic[CT]):
    """`pool.connection()`: a class, not a generator, to keep the hot path short."""

    __slots__ = ("_pool", "_timeout", "_slot")

    _pool: ConnectionPool[CT]
    _timeout: float | None
    _slot: Slot[CT]

    def __enter__(self) -> CT:
        pool = self._pool
        if pool._open_implicit:
            pool._warn_open_implicit()
        self._slot = slot = pool.acquire(self._timeout)
        conn = slot.conn  # `_lend_connection()`, inlined
        conn._pool = pool  # type: ignore[assignment]
        conn._pool_slot = slot  # type: ignore[attr-defined]
        # Whose lending this is: given back inside the block (`putconn()`,
        # `close()` with `close_returns`), it may be lent again before the
        # block ends, and is then someone else's to commit and return.
        conn._pool_lease = self  # type: ignore[attr-defined]
        return conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        conn: Any = self._slot.conn  # psycopg types `_pool` as one of psycopg_pool's
        pool = self._pool
        if conn._pool_lease is not self or conn._pool is not pool:
            self._given_back(conn)
            return
        status = None
        uncommitted = False
        try:
            # Commit/rollback like `with conn:`. Nothing to do on an idle
            # connection outside pipeline mode (then the status read is the
            # pool's too); nothing possible on a busy one (an interrupted
            # query): the pool cancels it, and rolls back.
            pgstatus = conn.pgconn.transaction_status
            if exc_type is None and pgstatus == _IDLE and not conn._pipeline:
                status = pool._idle_status
            elif pgstatus != _ACTIVE:
                conn.__exit__(exc_type, exc, tb)
            else:
                # A block ending normally must commit: say it can't.
                uncommitted = exc_type is None and not conn.autocommit
        finally:
            conn._pool_lease = None  # the lending is over (and no cycle through this lease)
            if conn._pool is pool:
                conn._pool = None
                pool.release(self._slot, status)
            # else closed by the pool (`close_lent()`) meanwhile: nothing to give back
        if uncommitted:
            raise e.OperationalError(
                "the 'with' block ended while a query was still running on its connection"
                " (interrupted, and the interruption caught?): its transaction can't be"
                " committed, and is rolled back"
            )

    def _given_back(self, conn: CT) -> None:
        """The block's connection isn't its own any more: raise, unless the pool closed it."""
        if conn._pool_lease is self and self._slot.state is GONE:  # type: ignore[attr-defined]
            conn._pool_lease = None  # type: ignore[attr-defined]
            return  # closed by the pool (`close_lent()`), as its borrower sees
        raise ValueError(
            f"can't return connection to pool {self._pool.name!r}: it was given back inside"
            f" the 'with' block already (putconn(), or close() with close_returns): {conn}"
        )


class NullConnectionPool(ConnectionPool[CT]):
    """A pool that keeps no idle connection: drop-in for psycopg_pool's.

    Each request opens a connection (in the background) and each return
    closes it, unless a request is waiting for it. `max_size` bounds how many
    exist at once; `min_size` must be 0.
    """

    _retain_idle = False

    def __init__(self, conninfo: ConninfoParam = "", *, min_size: int = 0, **kwargs: Any) -> None:
        super().__init__(conninfo, min_size=min_size, **kwargs)

    @staticmethod
    def _check_size(min_size: int, max_size: int | None) -> tuple[int, int]:
        if min_size != 0:
            raise ValueError(f"min_size must be 0 for a NullConnectionPool, got {min_size!r}")
        if max_size is None or max_size == 0:
            max_size = _UNLIMITED
        return Pool._check_size(min_size, max_size)

    @property
    def max_size(self) -> int:
        """Most connections open at once; 0 if unlimited (as psycopg_pool says)."""
        return 0 if self._max_size == _UNLIMITED else self._max_size

    def get_stats(self) -> dict[str, int]:
        """The engine's stats, `pool_max` 0 if unlimited (as psycopg_pool's)."""
        stats = super().get_stats()
        stats["pool_max"] = self.max_size
        return stats

    def wait(self, timeout: float = 30.0) -> None:
        """Check that a connection can be made within `timeout`, then close it.

        The trial connection is one request in the stats. A failed connect
        fails it at once, with the driver's error; a connect that doesn't
        answer, after `timeout`.
        """
        self._check_open()
        timeout = _check_positive("timeout", timeout)
        if self._open_implicit:
            self._warn_open_implicit()
        try:
            slot = self.acquire(timeout)
        except errors.PoolTimeout as ex:
            self.close()
            cause = ex.__cause__
            suffix = f": {cause}" if cause is not None else ""
            raise PoolTimeout(f"pool initialization incomplete after {timeout} sec{suffix}") from cause
        self.release(slot)

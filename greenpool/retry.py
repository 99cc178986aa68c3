"""Re-running idempotent work after connection-level failures: `greenpool.retry`.

`greenpool.retry(...)` (and `pool.retry(...)`, `db.retry(...)`) makes a
`Retrying` policy, usable two ways::

    @greenpool.retry(attempts=3)
    def transfer(pool, a, b):
        with pool.connection() as conn:
            ...

    for attempt in pool.retry(deadline=10):
        with attempt:
            with pool.connection() as conn:
                ...

Each attempt runs the whole block again, and the block asks the pool for a
connection again: the one the failed attempt held went back through the
pool's return path, which discards a broken connection. Only failures a new
connection may cure are retried (see `classify()`); any other error, and
any `BaseException` that isn't an `Exception` (`gevent.Timeout`,
`GreenletExit`, `KeyboardInterrupt`), propagates at once. Between attempts
the caller sleeps a "full jitter" backoff, cooperatively under gevent.

Nothing here imports psycopg, pymysql, peewee or gevent at import: an error
is recognized as a driver's only if that driver's module is already
imported (it must be, to have raised it).
"""

from __future__ import annotations

import functools
import logging
import math
import random
import sys
from collections.abc import Callable, Iterator
from time import monotonic
from typing import Any, ParamSpec, TypeVar, overload

from . import errors

__all__ = [
    "CONNECTION",
    "READ_ONLY",
    "SERIALIZATION",
    "Attempt",
    "DatabaseRetrying",
    "PoolRetrying",
    "Retrying",
    "classify",
    "retry",
]

logger = logging.getLogger("greenpool.retry")

P = ParamSpec("P")
R = TypeVar("R")

#: `classify()`'s kinds of retryable failures.
#: The connection was lost, closed, refused or shut down by the server.
CONNECTION = "connection"
#: A write on a read-only server (25006): a primary demoted by a failover.
READ_ONLY = "read-only"
#: A serialization failure (40001) or deadlock (40P01, MySQL 1213): retried only if asked.
SERIALIZATION = "serialization"

#: PostgreSQL SQLSTATEs of a connection the server ends or refuses (besides class 08):
#: admin_shutdown, crash_shutdown, cannot_connect_now.
_PG_SHUTDOWN = frozenset({"57P01", "57P02", "57P03"})
_PG_READ_ONLY = "25006"
#: serialization_failure, deadlock_detected.
_PG_SERIALIZATION = frozenset({"40001", "40P01"})
#: MySQL/MariaDB error codes of a lost or refused connection: 2006 server has
#: gone away, 2013 lost connection during query, 1927 connection killed
#: (MariaDB), 1053 server shutdown in progress, 2003 can't connect.
_MYSQL_CONNECTION = frozenset({2006, 2013, 1927, 1053, 2003})
#: ER_LOCK_DEADLOCK: InnoDB rolled the whole transaction back.
_MYSQL_SERIALIZATION = frozenset({1213})

#: The start of the error `with pool.connection()` raises when its block ended
#: while a query it interrupted still ran: a caught interruption, not a lost
#: connection, though an `OperationalError` without SQLSTATE.
_UNCOMMITTED = "the 'with' block ended while a query was still running"


def classify(error: BaseException | None, *, retry_serialization: bool = False) -> str | None:
    """What kind of retryable failure `error` is: `CONNECTION`, `READ_ONLY`, `SERIALIZATION`, or None.

    None means "don't retry". Retryable (see docs/retry.md for why):

    - psycopg: an `OperationalError` without SQLSTATE (connection lost,
      closed, refused; not `PipelineAborted`) or of class 08; an
      `InterfaceError` about the connection's state; SQLSTATE 57P01, 57P02,
      57P03 (`CONNECTION`); 25006 (`READ_ONLY`); 40001, 40P01
      (`SERIALIZATION`).
    - pymysql: error codes 2006, 2013, 1927, 1053, 2003, and any
      `InterfaceError` (pymysql raises it only on a closed connection)
      (`CONNECTION`); 1213, a deadlock (`SERIALIZATION`).
    - a Peewee error wrapping one of these (its `orig`, else its `__cause__`).
    - a pool's `PoolTimeout` whose `__cause__` is a `CONNECTION` failure:
      the pool failed fast because the database is unreachable. Other pool
      errors (a timeout of a busy pool, `PoolClosed`, `TooManyRequests`) aren't.

    `retry_serialization` (default False): also return `SERIALIZATION`
    (else None) for serialization failures and deadlocks. Anything not an
    `Exception` is never retryable.
    """
    kind = _kind(error, 0)
    if kind == SERIALIZATION and not retry_serialization:
        return None
    return kind


def _kind(error: BaseException | None, depth: int) -> str | None:
    if not isinstance(error, Exception) or depth > 5:
        return None
    modules = sys.modules
    # First: psycopg pools' errors are `OperationalError`s without SQLSTATE.
    pool_errors = modules.get("psycopg_pool.errors")  # psycopg_pool's own, without a common base
    if isinstance(error, errors.PoolError) or (
        pool_errors is not None
        and isinstance(error, (pool_errors.PoolTimeout, pool_errors.PoolClosed, pool_errors.TooManyRequests))
    ):
        is_timeout = isinstance(error, errors.PoolTimeout) or (
            pool_errors is not None and isinstance(error, pool_errors.PoolTimeout)
        )
        if is_timeout and _kind(error.__cause__, depth + 1) == CONNECTION:
            return CONNECTION
        return None
    psycopg = modules.get("psycopg")
    if psycopg is not None and isinstance(error, psycopg.Error):
        return _psycopg_kind(psycopg, error)
    pymysql_err = modules.get("pymysql.err")
    if pymysql_err is not None and isinstance(error, pymysql_err.MySQLError):
        return _mysql_kind(pymysql_err, error)
    peewee = modules.get("peewee")
    if peewee is not None and isinstance(error, peewee.PeeweeException):
        # Peewee's translation of a driver's error keeps it as `orig`.
        wrapped = getattr(error, "orig", None)
        return _kind(wrapped if wrapped is not None else error.__cause__, depth + 1)
    return None


def _psycopg_kind(psycopg: Any, error: Exception) -> str | None:
    sqlstate = getattr(error, "sqlstate", None)
    if sqlstate is None:
        if isinstance(error, psycopg.OperationalError):
            if isinstance(error, psycopg.errors.PipelineAborted) or str(error).startswith(_UNCOMMITTED):
                return None
            return CONNECTION
        if isinstance(error, psycopg.InterfaceError) and "the connection is" in str(error):
            return CONNECTION  # "cannot execute operations: the connection is in status ..."
        return None
    if sqlstate.startswith("08") or sqlstate in _PG_SHUTDOWN:
        return CONNECTION
    if sqlstate == _PG_READ_ONLY:
        return READ_ONLY
    if sqlstate in _PG_SERIALIZATION:
        return SERIALIZATION
    return None


def _mysql_kind(pymysql_err: Any, error: Exception) -> str | None:
    if isinstance(error, pymysql_err.InterfaceError):
        return CONNECTION  # pymysql's "InterfaceError(0, '')": the connection is closed
    code = error.args[0] if error.args else None
    if code in _MYSQL_CONNECTION:
        return CONNECTION
    if code in _MYSQL_SERIALIZATION:
        return SERIALIZATION
    return None


#: `Retrying._begin()`'s answer when the run must not retry at all.
_NO_RETRY: Any = object()


class Retrying:
    """A retry policy: a decorator, and an iterable of `Attempt`s.

    `@policy` (or `policy(func)`) wraps `func` so that a call runs it again
    after a retryable failure; `for attempt in policy: with attempt: ...`
    does the same for a block. Each call of the wrapped function, and each
    `for` loop, is a run of its own: a policy may be shared by any number of
    greenlets and threads.

    - `attempts` (default 3): the most times the block runs, an int >= 1.
    - `deadline` (default 30.0): seconds since the first attempt began after
      which no new attempt begins (a running attempt isn't cut short); a
      number > 0, `math.inf` or None for no limit.
    - `base_delay` (default 0.05) and `max_delay` (default 2.0): seconds,
      >= 0. Before the n-th retry (n from 0) the caller sleeps
      `random.uniform(0, min(max_delay, base_delay * 2 ** n))` ("full
      jitter"), cooperatively under gevent. A retry whose sleep would end
      past the deadline isn't made.
    - `retry_serialization` (default False): also retry serialization
      failures (40001) and deadlocks (40P01, MySQL 1213). Only for blocks
      that are a whole transaction.
    - `on_retry` (default None): called as `on_retry(attempt, error, delay)`
      before each retry's sleep, with the number of the attempt that failed
      (from 1), its error and the sleep to come. An exception it raises
      propagates, ending the run.

    Each retry is also logged at INFO on the `greenpool.retry` logger. When
    the run gives up on an error after a retry, or on a retryable error, that
    error propagates with `greenpool_attempts` (a list of `(repr(error),
    seconds since the run began)`, one per failed attempt) and a note
    ("failed after N attempts ..."); an error not retryable at the first
    attempt propagates untouched.
    """

    def __init__(
        self,
        *,
        attempts: int = 3,
        deadline: float | None = 30.0,
        base_delay: float = 0.05,
        max_delay: float = 2.0,
        retry_serialization: bool = False,
        on_retry: Callable[[int, Exception, float], object] | None = None,
    ) -> None:
        from .engine import options  # the engine imports gevent: not at `import greenpool`

        self.attempts = options.count("attempts", attempts, 1)
        self.deadline = math.inf if deadline is None else options.positive("deadline", deadline, allow_zero=False)
        self.base_delay = options.positive("base_delay", base_delay)
        self.max_delay = options.positive("max_delay", max_delay)
        if not isinstance(retry_serialization, bool):
            raise TypeError(f"retry_serialization must be True or False, got {retry_serialization!r}")
        self.retry_serialization = retry_serialization
        options.callable_or_none("on_retry", on_retry)
        self.on_retry = on_retry

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} attempts={self.attempts} deadline={self.deadline:g}"
            f" base_delay={self.base_delay:g} max_delay={self.max_delay:g}"
            f" retry_serialization={self.retry_serialization}>"
        )

    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        """Wrap `func`: each call runs it under this policy."""
        if not callable(func):
            raise TypeError(f"a retry policy decorates a callable, got {func!r}")
        what = getattr(func, "__qualname__", None) or repr(func)

        @functools.wraps(func)
        def retried(*args: P.args, **kwargs: P.kwargs) -> R:
            for attempt in _Run(self, what):
                with attempt:
                    return func(*args, **kwargs)
            raise AssertionError("unreachable: a run ends by returning or raising")

        return retried

    def __iter__(self) -> Iterator[Attempt]:
        """A new run: yields `Attempt`s until one succeeds or the run gives up."""
        return _Run(self, "a block")

    def delay(self, retry: int) -> float:
        """The sleep before retry number `retry` (from 0): full jitter."""
        return random.uniform(0.0, min(self.max_delay, self.base_delay * 2.0 ** min(retry, 64)))

    def classify(self, error: BaseException) -> str | None:
        """`classify(error)` with this policy's `retry_serialization`; None: don't retry."""
        return classify(error, retry_serialization=self.retry_serialization)

    # -- hooks for the pools' policies ---------------------------------------

    def _begin(self) -> Any:
        """Called as a run begins; its result goes to the other hooks. `_NO_RETRY`: run once."""
        return None

    def _before_retry(self, token: Any, error: Exception, kind: str) -> None:
        """Called after a retryable failure, before the sleep and the next attempt."""

    def _end(self, token: Any) -> None:
        """Called once the run is over (success or not)."""


class Attempt:
    """One attempt of a run: `with attempt:` runs the block.

    A retryable error leaving the block is swallowed and the `for` loop goes
    on to the next attempt; any other outcome ends the loop. `number` is
    the attempt's number, from 1.
    """

    __slots__ = ("number", "_run")

    def __init__(self, run: _Run, number: int) -> None:
        self.number = number
        self._run = run

    def __repr__(self) -> str:
        return f"<Attempt {self.number} of {self._run.policy.attempts}>"

    def __enter__(self) -> Attempt:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        return self._run.attempt_ended(self.number, exc)


class _Run:
    """One run of a policy: the attempts made so far, and what comes next."""

    __slots__ = ("policy", "what", "start", "history", "number", "done", "error", "kind", "wait", "token", "retrying")

    def __init__(self, policy: Retrying, what: str) -> None:
        self.policy = policy
        self.what = what
        self.start = monotonic()
        self.history: list[tuple[str, float]] = []
        self.number = 0
        self.done = False
        #: The last attempt's retryable error, its kind and the sleep before the next.
        self.error: Exception | None = None
        self.kind = ""
        self.wait = 0.0
        self.token = policy._begin()
        self.retrying = self.token is not _NO_RETRY

    def __iter__(self) -> _Run:
        return self

    def __next__(self) -> Attempt:
        if self.done:
            raise StopIteration
        if self.number:
            if self.error is None:
                # The loop's body ended without a failure (or without `with attempt:`).
                self._finish()
                raise StopIteration
            self._between()
        self.number += 1
        return Attempt(self, self.number)

    def _between(self) -> None:
        """After attempt `number` failed with `error`: hooks, callback, log, sleep."""
        policy = self.policy
        delay = self.wait
        error: Any = self.error
        self.error = None  # not kept alive (with its frames) through the sleep
        try:
            policy._before_retry(self.token, error, self.kind)
            if policy.on_retry is not None:
                policy.on_retry(self.number, error, delay)
        except BaseException:
            self._finish()
            raise
        logger.info(
            "retrying %s: attempt %d of %d failed after %.3f s (%s: %r); next attempt in %.3f s",
            self.what,
            self.number,
            policy.attempts,
            self.history[-1][1],
            self.kind,
            error,
            delay,
        )
        del error
        from ._runtime.hub import sleep  # imports gevent: not at `import greenpool`

        try:
            sleep(delay)
        except BaseException:
            self._finish()
            raise

    def attempt_ended(self, number: int, error: BaseException | None) -> bool:
        """Whether to swallow `error`, the end of attempt `number`, and go on."""
        if self.done or number != self.number:
            return False  # an attempt entered again, or out of turn: no say
        if error is None:
            self._finish()
            return False
        if not isinstance(error, Exception):
            self._finish()  # gevent.Timeout, GreenletExit, KeyboardInterrupt: at once
            return False
        policy = self.policy
        elapsed = monotonic() - self.start
        self.history.append((repr(error), elapsed))
        kind = policy.classify(error) if self.retrying else None
        if kind is None:
            reason = "not retryable" if self.retrying else "not retried inside a transaction"
        elif number >= policy.attempts:
            reason = "attempts exhausted"
        else:
            delay = policy.delay(number - 1)
            if elapsed + delay < policy.deadline:
                self.error, self.kind, self.wait = error, kind, delay
                return True
            reason = f"deadline of {policy.deadline:g} s reached"
        self._finish()
        if kind is not None or number > 1:
            self._annotate(error, reason, elapsed)
        return False

    def _annotate(self, error: Exception, reason: str, elapsed: float) -> None:
        history = list(self.history)
        attached: Any = error
        attached.greenpool_attempts = history
        n = len(history)
        lines = [f"greenpool.retry: {self.what} failed after {n} attempt{'s' if n > 1 else ''} in {elapsed:.3f} s"]
        lines[0] += f" ({reason})"
        lines += [f"  attempt {i} at {seconds:.3f} s: {text}" for i, (text, seconds) in enumerate(history, 1)]
        add_note = getattr(error, "add_note", None)  # Python >= 3.11
        if add_note is not None:
            add_note("\n".join(lines))

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self.error = None
            self.policy._end(self.token)


class PoolRetrying(Retrying):
    """`ConnectionPool.retry()`'s policy: `Retrying` for blocks using `pool`.

    The hook between attempts is the place for pool-wide recovery: after a
    failover (`READ_ONLY` failures, 25006), the pool's other connections
    may still point at the demoted server; nothing is done about that yet
    (`on_retry` may call `pool.drain()`).
    """

    def __init__(self, pool: Any, **options: Any) -> None:
        super().__init__(**options)
        self.pool = pool

    def _before_retry(self, token: Any, error: Exception, kind: str) -> None:
        # Failover hook: a READ_ONLY failure is where replacing the pool's
        # connections would go. The failed attempt's own connection went back
        # through the return path already (discarded if broken).
        pass


class _HeldState:
    """What a Peewee run saw as it began: the greenlet's connection and contexts."""

    __slots__ = ("held", "ctx")

    def __init__(self, held: bool, ctx: list[Any]) -> None:
        self.held = held
        self.ctx = ctx


class DatabaseRetrying(Retrying):
    """`PooledDatabase.retry()`'s policy: `Retrying` for blocks using Peewee database `db`.

    Peewee keeps a greenlet's connection open after an `atomic()` block (it
    connected for it): between attempts the policy gives that connection
    back to the pool (a broken one is discarded there), so the next attempt
    connects anew. A connection the greenlet held before the run (an
    enclosing `connection_context()` or `connect()`) is replaced by a new
    one, enclosing contexts kept (not after a serialization failure: it
    still works). Inside a transaction (an enclosing `atomic()`) the run
    doesn't retry: the enclosing transaction is lost with its connection,
    and only the whole of it can be run again.
    """

    def __init__(self, db: Any, **options: Any) -> None:
        super().__init__(**options)
        self.db = db

    def _begin(self) -> Any:
        state = self.db._state
        if state.transactions:
            return _NO_RETRY
        return _HeldState(not state.closed, list(state.ctx))

    def _before_retry(self, token: Any, error: Exception, kind: str) -> None:
        db = self.db
        state = db._state
        if state.closed or state.transactions:
            return
        if token.held and kind == SERIALIZATION:
            return  # the connection works: only its transaction failed
        try:
            db.close()  # back to the pool: discarded there if broken
        except Exception:
            logger.debug("couldn't give back the connection before a retry", exc_info=True)
            return
        if token.held:
            try:
                db.connect()
            except Exception:
                # The next attempt connects again (autoconnect), and meets
                # the error itself if it persists.
                logger.debug("couldn't reconnect before a retry", exc_info=True)
            db._state.ctx = list(token.ctx)

    def _end(self, token: Any) -> None:
        if token is _NO_RETRY or token is None or not token.ctx:
            return
        state = self.db._state
        if not state.ctx:
            # Enclosing `connection_context()`s: a reconnect (peewee's
            # `set_connection()`) forgot them.
            state.ctx = list(token.ctx)


@overload
def retry(func: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def retry(
    *,
    attempts: int = 3,
    deadline: float | None = 30.0,
    base_delay: float = 0.05,
    max_delay: float = 2.0,
    retry_serialization: bool = False,
    on_retry: Callable[[int, Exception, float], object] | None = None,
) -> Retrying: ...


def retry(
    func: Callable[P, R] | None = None,
    /,
    *,
    attempts: int = 3,
    deadline: float | None = 30.0,
    base_delay: float = 0.05,
    max_delay: float = 2.0,
    retry_serialization: bool = False,
    on_retry: Callable[[int, Exception, float], object] | None = None,
) -> Retrying | Callable[P, R]:
    """A `Retrying` policy re-running a block after connection-level failures.

    `@greenpool.retry(attempts=3)` decorates a function; `@greenpool.retry`
    alone uses the defaults; `for attempt in greenpool.retry(...): with
    attempt: ...` retries a block. The block must take its connection
    itself (`with pool.connection()`, Peewee's `atomic()`), so that each
    attempt gets a new one. Parameters (see `Retrying`): `attempts` (3),
    `deadline` (30.0 s), `base_delay` (0.05 s), `max_delay` (2.0 s),
    `retry_serialization` (False), `on_retry` (None). They are checked
    here: `TypeError`/`ValueError` naming the parameter.
    """
    policy = Retrying(
        attempts=attempts,
        deadline=deadline,
        base_delay=base_delay,
        max_delay=max_delay,
        retry_serialization=retry_serialization,
        on_retry=on_retry,
    )
    return policy if func is None else policy(func)

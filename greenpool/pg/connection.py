"""A psycopg 3 connection that waits through gevent's hub.

psycopg picks its wait function and its connection lock when it is imported:
imported before `gevent.monkey.patch_all()` (or never patched), every query
blocks the whole hub in C (psycopg issues #527, #536). `GeventConnection`
decides at each wait instead: in a thread running a gevent hub it runs
psycopg's non-blocking generators on hub I/O watchers; elsewhere it behaves
exactly like `psycopg.Connection`.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import errors as e
from psycopg.conninfo import conninfo_attempts, make_conninfo, timeout_from_conninfo
from psycopg.waiting import Ready

from .._runtime.hub import allocate_lock, get_thread_ident, gevent_hub

_READY = {int(r): r for r in Ready}


def _green_wait(hub: Any, gen: Any, timeout: float | None, conn: GeventConnection | None = None) -> Any:
    """Consume a psycopg generator on hub I/O watchers; return its result.

    With `conn` the generator yields wait states for its socket (queries),
    and `conn` shows the watcher waited on (see `GeventConnection.close`);
    with None it yields `(fd, state)` pairs (connect, cancel).
    """
    if timeout is not None:  # 0 too: poll once, as psycopg's own wait does
        from gevent import Timeout

        with Timeout(timeout, e._WaitTimeout("wait timeout expired")):
            return _green_wait(hub, gen, None, conn)
    try:
        step = next(gen)
    except StopIteration as ex:
        return ex.value
    io = hub.loop.io
    wait = hub.wait
    fileno = None if conn is None else conn.pgconn.socket
    try:
        while True:
            fd, state = step if fileno is None else (fileno, step)
            watcher = io(fd, state)
            if conn is not None:
                conn._green_waiting = (hub, watcher)
            try:
                wait(watcher)
            finally:
                if conn is not None:
                    conn._green_waiting = None
                watcher.close()
            step = gen.send(_READY[state])
    except StopIteration as ex:
        return ex.value


class _HybridLock:
    """psycopg's per-connection lock, cooperative when taken under gevent.

    psycopg binds `threading.Lock` at import: a real lock held across a
    query's wait would freeze the hub if another greenlet wanted it.
    """

    __slots__ = ("_real", "_green")

    def __init__(self) -> None:
        self._real = allocate_lock()
        self._green: Any = None

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Acquire; greenlets wait on the hub, threads block."""
        if self._real.acquire(False):
            return True
        if not blocking:
            return False
        hub = gevent_hub()
        if hub is None:
            return bool(self._real.acquire(True, timeout))
        # Contended under gevent: poll cooperatively. Contention on a
        # connection lock means misuse (two greenlets on one connection),
        # so simplicity beats latency here.
        import gevent

        deadline = None if timeout < 0 else hub.loop.now() + timeout
        while not self._real.acquire(False):
            if deadline is not None and hub.loop.now() >= deadline:
                return False
            gevent.sleep(0.001)
        return True

    def release(self) -> None:
        """Release the lock."""
        self._real.release()

    def locked(self) -> bool:
        """True if held."""
        return bool(self._real.locked())


class GeventConnection(psycopg.Connection[Any]):
    """A `psycopg.Connection` whose waits cooperate with gevent.

    Under a gevent hub every wait (connect, query, cancel) yields to the hub
    whether or not `monkey.patch_all()` ran, or ran before psycopg was
    imported. In a thread without a hub it is a plain `psycopg.Connection`.
    """

    # A slot: set and cleared around every wait, it must be cheap to store.
    __slots__ = ("_green_waiting",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lock = _HybridLock()  # type: ignore[assignment]
        #: (hub, I/O watcher) while a greenlet waits on this connection's socket.
        self._green_waiting: tuple[Any, Any] | None = None

    def close(self) -> None:
        """Close the connection; a greenlet waiting on it first gets an `OperationalError`.

        libev must not go on watching a closed socket: its number is soon
        another connection's, which the stale watcher then stalls.
        """
        waiting = self._green_waiting
        if waiting is None or self.closed:
            return super().close()
        self._green_waiting = None
        hub, watcher = waiting
        error = e.OperationalError("the connection was closed")
        close = super().close
        if get_thread_ident() == hub.thread_ident:
            hub.cancel_waits_close_and_then([watcher], error, close)
        else:
            hub.loop.run_callback_threadsafe(hub.cancel_waits_close_and_then, [watcher], error, close)

    @classmethod
    def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
        """Connect like `psycopg.Connection.connect()`, cooperatively under gevent."""
        hub = gevent_hub()
        if hub is None:
            return super().connect(conninfo, **kwargs)
        options = {
            key: kwargs.pop(key)
            for key in ("autocommit", "prepare_threshold", "context", "row_factory", "cursor_factory")
            if key in kwargs
        }
        params = cls._get_connection_params(conninfo, **kwargs)
        timeout = timeout_from_conninfo(params)
        failures: list[tuple[e.Error, str]] = []
        conn = None
        for attempt in conninfo_attempts(params):
            host, port, hostaddr = attempt.get("host"), attempt.get("port"), attempt.get("hostaddr")
            where = f"host: {host!r}, port: {port!r}, hostaddr: {hostaddr!r}"  # psycopg's words
            try:
                gen = cls._connect_gen(make_conninfo("", **attempt))
                conn = _green_wait(hub, gen, timeout)
                break
            except e._WaitTimeout:
                failures.append((e.ConnectionTimeout("connection timeout expired"), where))
            except e.Error as ex:
                failures.append((ex, where))
        if conn is None:
            raise _connect_error(failures).with_traceback(None)
        conn._autocommit = bool(options.get("autocommit", False))
        if options.get("row_factory"):
            conn.row_factory = options["row_factory"]
        if options.get("cursor_factory"):
            conn.cursor_factory = options["cursor_factory"]
        if options.get("context"):
            from psycopg.adapt import AdaptersMap

            conn._adapters = AdaptersMap(options["context"].adapters)
        conn.prepare_threshold = options.get("prepare_threshold", 5)
        return conn

    def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        """Consume a generator on this connection, through the hub if any."""
        hub = gevent_hub()
        if hub is None:
            return super().wait(gen, interval, timeout)
        return _green_wait(hub, gen, timeout, self)

    def cancel_safe(self, *, timeout: float = 30.0) -> None:
        """Cancel the running query on the server, cooperatively under gevent."""
        hub = gevent_hub()
        if hub is None:
            return super().cancel_safe(timeout=timeout)
        if not psycopg.capabilities.has_cancel_safe():
            # libpq < 17: psycopg falls back to the blocking PQcancel (a
            # connect and a send, no timeout). In a thread, it blocks no hub.
            job = hub.threadpool.spawn(super().cancel_safe, timeout=timeout)
            job.wait(timeout or None)
            if not job.ready():
                raise e.CancellationTimeout("cancellation timeout expired")
            return job.get()  # type: ignore[no-any-return]
        if not self._should_cancel():
            return
        try:
            _green_wait(hub, self._cancel_gen(), timeout or None)
        except e._WaitTimeout:
            raise e.CancellationTimeout("cancellation timeout expired") from None


def _connect_error(failures: list[tuple[e.Error, str]]) -> e.Error:
    """The error of failed connect attempts, each with where it went, as psycopg words it."""
    last = failures[-1][0]
    if len(failures) == 1:
        return last
    lines = [str(last), "Multiple connection attempts failed. All failures were:"]
    lines.extend(f"- {where}: {error}" for error, where in failures)
    return type(last)("\n".join(lines), pgconn=last.pgconn)

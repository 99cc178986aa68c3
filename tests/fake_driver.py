"""A fake in-memory driver for the engine's pool-logic tests (no server)."""

from __future__ import annotations

import itertools

import gevent

from greenpool.engine import BROKEN, OK, Pool


class FakeConn:
    """A pretend connection: a number, a state and a closed flag."""

    ids = itertools.count(1)

    def __init__(self) -> None:
        self.id = next(self.ids)
        self.status = OK
        self.closed = False
        self.cleaned = 0


class FakePool(Pool[FakeConn]):
    """The engine over FakeConn, with a configurable connect delay/failure."""

    def __init__(self, *, connect_delay: float = 0.0, **kwargs: object) -> None:
        self.connect_delay = connect_delay
        self.fail_connect: Exception | None = None
        self.opened: list[FakeConn] = []
        self.closed_conns: list[FakeConn] = []
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def _open_connection(self) -> FakeConn:
        if self.connect_delay:
            gevent.sleep(self.connect_delay)
        if self.fail_connect is not None:
            raise self.fail_connect
        conn = FakeConn()
        self.opened.append(conn)
        return conn

    def _close_connection(self, conn: FakeConn) -> None:
        conn.closed = True
        self.closed_conns.append(conn)

    def _status(self, conn: FakeConn) -> int:
        return BROKEN if conn.closed else conn.status

    def _clean(self, conn: FakeConn) -> None:
        gevent.sleep(0.01)
        conn.cleaned += 1
        conn.status = OK


def make_pool(**kwargs: object) -> FakePool:
    pool = FakePool(**kwargs)
    pool.open(wait=True, timeout=5)
    return pool

"""A fake in-memory driver for the engine's pool-logic tests (no server)."""

from __future__ import annotations

import itertools
import threading
from typing import Any

import gevent

from greenpool.engine import BROKEN, OK, Driver, Pool


class FakeConn:
    """A pretend connection: a number, a state and a closed flag."""

    ids = itertools.count(1)

    def __init__(self) -> None:
        self.id = next(self.ids)
        self.status = OK
        self.closed = False
        self.cleaned = 0


class FakeDriver(Driver[FakeConn]):
    """FakeConns, with a configurable connect delay or failure; keeps what it
    opened, closed and pinged, and counts the connects under way."""

    def __init__(self, connect_delay: float = 0.0) -> None:
        self.connect_delay = connect_delay
        self.fail_connect: Exception | None = None
        self.opened: list[FakeConn] = []
        self.closed_conns: list[FakeConn] = []
        self.pinged: list[FakeConn] = []
        self.connecting = 0  # connect() calls under way (from several threads: counted under a lock)
        self.counting = threading.Lock()

    def connect(self) -> FakeConn:
        with self.counting:
            self.connecting += 1
        try:
            if self.connect_delay:
                gevent.sleep(self.connect_delay)
            if self.fail_connect is not None:
                raise self.fail_connect
            conn = FakeConn()
            self.opened.append(conn)
            return conn
        finally:
            with self.counting:
                self.connecting -= 1

    def close(self, conn: FakeConn) -> None:
        conn.closed = True
        self.closed_conns.append(conn)

    def status(self, conn: FakeConn) -> int:
        return BROKEN if conn.closed else conn.status

    def clean(self, conn: FakeConn) -> None:
        gevent.sleep(0.01)
        conn.cleaned += 1
        conn.status = OK

    def ping(self, conn: FakeConn) -> None:
        self.pinged.append(conn)


class FakePool(Pool[FakeConn]):
    """The engine on a `FakeDriver` (or the one given)."""

    driver: FakeDriver

    def __init__(self, driver: FakeDriver | None = None, *, connect_delay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(FakeDriver(connect_delay) if driver is None else driver, **kwargs)


def make_pool(**kwargs: Any) -> FakePool:
    pool = FakePool(**kwargs)
    pool.open(wait=True, timeout=5)
    return pool

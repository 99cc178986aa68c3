"""Pinned call counts of the pools' hot path, as SQLAlchemy's aaa_profiling pins its own.

A checkout and return cycle is counted with `sys.setprofile`: the Python
functions of greenpool that run, and the calls (Python or builtin) that
greenpool's own frames make into anything else. The counts depend on the
code, not on timing or the machine, so a change that adds calls to the hot
path fails here until the pins in `call_counts.json` are changed on purpose:

    GREENPOOL_WRITE_CALL_COUNTS=1 python -m pytest tests/profiling

and the commit says why. A change that removes calls fails too, so the pins
follow improvements down.

Each cycle runs in a greenlet, as in a gevent worker, on a pool that is full
(nothing connects in the background). A "wait" cycle asks for the only
connection of a pool while another greenlet holds it; that greenlet's return
hands it over, and is counted with the cycle.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import pytest

import greenpool

PINS = Path(__file__).with_name("call_counts.json")
WRITE = os.environ.get("GREENPOOL_WRITE_CALL_COUNTS", "") not in ("", "0")
PACKAGE = str(Path(greenpool.__file__).parent)
#: The least of this many counts is kept: a rare wake-up in the background
#: (a housekeeping tick) may land in one of them.
REPEATS = 5


def _ours(code: Any) -> bool:
    return code.co_filename.startswith(PACKAGE)


def count_calls(run: Callable[[], None]) -> Counter[str]:
    """The calls `run()` makes, by callee, as the module docstring says."""
    calls: Counter[str] = Counter()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            code = frame.f_code
            if _ours(code):
                calls[f"{Path(code.co_filename).stem}.{code.co_qualname}"] += 1
            elif frame.f_back is not None and _ours(frame.f_back.f_code):
                calls[f"-> {code.co_qualname}"] += 1
        elif event == "c_call" and _ours(frame.f_code):
            calls[f"-> {getattr(arg, '__qualname__', arg)}"] += 1

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return calls


def least_calls(cycle: Callable[[], None], prepare: Callable[[], None] = lambda: None) -> Counter[str]:
    """The smallest count of `cycle()` over `REPEATS` runs in a greenlet, each after `prepare()`."""

    def body() -> Counter[str]:
        prepare()
        cycle()  # warm-up: imports, caches filled on first use
        counts = []
        for _ in range(REPEATS):
            prepare()
            counts.append(count_calls(cycle))
        return min(counts, key=lambda c: c.total())

    return gevent.spawn(body).get(timeout=30)


def with_holder(hold: Callable[[gevent.event.Event], None]) -> tuple[Callable[[], None], Callable[[], None]]:
    """`prepare` and `go` for a wait cycle: `prepare()` starts a greenlet that
    takes the only connection (`hold(event)`) and gives it back once `go()` set
    the event and the cycle's own request parked."""
    event = gevent.event.Event()

    def prepare() -> None:
        event.clear()
        gevent.spawn(hold, event)
        gevent.sleep(0)  # the holder takes the connection, then waits for the event

    return prepare, event.set


class Pins:
    """The pinned counts: compared with, or (GREENPOOL_WRITE_CALL_COUNTS) written."""

    def __init__(self) -> None:
        self.pinned: dict[str, int] = json.loads(PINS.read_text()) if PINS.exists() else {}
        self.seen: dict[str, int] = {}

    def check(self, name: str, calls: Counter[str]) -> None:
        total = calls.total()
        self.seen[name] = total
        if WRITE:
            return
        detail = "\n".join(f"  {n:4d}  {what}" for what, n in calls.most_common())
        pinned = self.pinned.get(name)
        assert total == pinned, (
            f"{name}: {total} calls, pinned {pinned}. If that is meant, update the pins"
            " (GREENPOOL_WRITE_CALL_COUNTS=1 python -m pytest tests/profiling) and say why in"
            f" the commit. The calls:\n{detail}"
        )

    def write(self) -> None:
        if WRITE and self.seen:
            merged = dict(sorted({**self.pinned, **self.seen}.items()))
            PINS.write_text(json.dumps(merged, indent=2) + "\n")


@pytest.fixture(scope="module")
def pins() -> Iterator[Pins]:
    p = Pins()
    yield p
    p.write()


# -- the engine, on a fake driver --------------------------------------------


@pytest.fixture
def engine_pool() -> Iterator[Any]:
    from fake_driver import make_pool

    pool = make_pool(min_size=1, max_size=1)
    yield pool
    pool.close()


def test_engine_checkout_and_return(engine_pool: Any, pins: Pins) -> None:
    def cycle() -> None:
        engine_pool.release(engine_pool.acquire())

    pins.check("engine", least_calls(cycle))


def test_engine_checkout_and_return_with_a_wait(engine_pool: Any, pins: Pins) -> None:
    def hold(event: gevent.event.Event) -> None:
        slot = engine_pool.acquire()
        event.wait()
        engine_pool.release(slot)

    prepare, go = with_holder(hold)

    def cycle() -> None:
        go()
        engine_pool.release(engine_pool.acquire())

    pins.check("engine, with a wait", least_calls(cycle, prepare))


# -- the psycopg pool ---------------------------------------------------------


@pytest.fixture
def pg_pool(pg_dsn: str) -> Iterator[Any]:
    from greenpool import ConnectionPool

    with ConnectionPool(pg_dsn, min_size=1, max_size=1, open=False) as pool:
        pool.wait(timeout=20)
        yield pool


def test_pg_connection_block(pg_pool: Any, pins: Pins) -> None:
    def cycle() -> None:
        with pg_pool.connection():
            pass

    pins.check("pg connection()", least_calls(cycle))


def test_pg_connection_block_with_a_wait(pg_pool: Any, pins: Pins) -> None:
    def hold(event: gevent.event.Event) -> None:
        with pg_pool.connection():
            event.wait()

    prepare, go = with_holder(hold)

    def cycle() -> None:
        go()
        with pg_pool.connection():
            pass

    pins.check("pg connection(), with a wait", least_calls(cycle, prepare))


def test_pg_getconn_putconn(pg_pool: Any, pins: Pins) -> None:
    def cycle() -> None:
        pg_pool.putconn(pg_pool.getconn())

    pins.check("pg getconn()/putconn()", least_calls(cycle))


# -- Peewee (on SQLite: the mixin's code is the same for every server) --------


@pytest.fixture
def peewee_db(tmp_path: Path) -> Iterator[Any]:
    from greenpool.peewee import PooledSqliteDatabase

    db = PooledSqliteDatabase(str(tmp_path / "profile.db"), max_connections=1, timeout=10)
    yield db
    db.close_all()
    db.pool.close()


def test_peewee_connection_context(peewee_db: Any, pins: Pins) -> None:
    def cycle() -> None:
        with peewee_db.connection_context():
            pass

    pins.check("peewee connection_context()", least_calls(cycle))


def test_peewee_connection_context_with_a_wait(peewee_db: Any, pins: Pins) -> None:
    def hold(event: gevent.event.Event) -> None:
        with peewee_db.connection_context():
            event.wait()

    prepare, go = with_holder(hold)

    def cycle() -> None:
        go()
        with peewee_db.connection_context():
            pass

    pins.check("peewee connection_context(), with a wait", least_calls(cycle, prepare))

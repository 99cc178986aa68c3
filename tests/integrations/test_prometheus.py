"""Prometheus metrics (`greenpool.integrations.prometheus`): scraped from a registry, from a
multiprocess-mode directory, and over HTTP from real Celery workers (gevent and prefork).

The pools under test get names of their own: the process may hold other
tests' pools, which the collector reports too.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_driver import FakeConn, FakeDriver, FakePool, make_pool
from helpers import destroy_main_hub

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from greenpool.engine import DIRTY  # noqa: E402
from greenpool.integrations import prometheus  # noqa: E402

#: The metric families every pool has, as the parser names them (counters without `_total`).
FAMILIES = {
    "greenpool_connections",
    "greenpool_connections_max",
    "greenpool_connections_min",
    "greenpool_pending_requests",
    "greenpool_acquire_wait_seconds",
    "greenpool_connection_use_seconds",
    "greenpool_connection_create_seconds",
    "greenpool_acquire_timeouts",
    "greenpool_connections_created",
    "greenpool_connection_errors",
    "greenpool_connections_closed",
    "greenpool_returns_reset",
    "greenpool_failovers",
    "greenpool_leaks",
}


class Scrape:
    """A parsed exposition: `scrape[name, pool, {labels}]` is a sample's value."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[sample.name, frozenset(sample.labels.items())] = sample.value

    def __getitem__(self, key: tuple[Any, ...]) -> float:
        name, pool, *rest = key
        labels = {"pool": pool, **(rest[0] if rest else {})}
        return self.samples[name, frozenset(labels.items())]

    def get(self, name: str, pool: str, default: float | None = None, **labels: str) -> float | None:
        return self.samples.get((name, frozenset({"pool": pool, **labels}.items())), default)

    def pools(self) -> set[str]:
        return {dict(labels)["pool"] for _, labels in self.samples if "pool" in dict(labels)}

    def closed(self, pool: str) -> dict[str, float]:
        return {
            reason: self[("greenpool_connections_closed_total", pool, {"reason": reason})]
            for reason in ("lifetime", "idle", "broken", "returned_active", "failover", "resize")
        }

    def states(self, pool: str) -> dict[str, float]:
        return {
            state: self[("greenpool_connections", pool, {"state": state})]
            for state in ("idle", "used", "connecting", "closing")
        }


def scrape(registry: CollectorRegistry) -> Scrape:
    return Scrape(generate_latest(registry).decode())


def scrape_url(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=10) as response:
        return Scrape(response.read().decode())


def eventually(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll `condition()` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what or condition}")
        time.sleep(0.05)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(autouse=True)
def _no_gevent_hub() -> None:
    """These tests drive the pools from plain threads (a hub left by another test would
    make them greenlet pools whose background jobs `time.sleep()` would block)."""
    destroy_main_hub()


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    registry = CollectorRegistry()
    prometheus.register(registry)
    yield registry
    prometheus.unregister(registry)


@pytest.fixture
def closing() -> Iterator[Callable[[Any], Any]]:
    """`closing(pool)`: close it at teardown."""
    pools: list[Any] = []

    def add(pool: Any) -> Any:
        pools.append(pool)
        return pool

    yield add
    for pool in pools:
        pool.close()


# -- one process: a custom collector ---------------------------------------------------


def test_register_exposes_every_family_with_its_type(
    registry: CollectorRegistry, closing: Callable[[Any], Any]
) -> None:
    """Every metric, typed as docs/metrics.md says, for a pool opened after register()."""
    name = unique("families")
    pool = closing(make_pool(min_size=1, max_size=3, name=name))
    pool.release(pool.acquire())
    metrics = scrape(registry)
    assert name in metrics.pools()
    assert FAMILIES <= set(metrics.types), FAMILIES - set(metrics.types)
    assert metrics.types["greenpool_acquire_wait_seconds"] == "histogram"
    assert metrics.types["greenpool_connection_use_seconds"] == "summary"
    assert metrics.types["greenpool_connections_closed"] == "counter"
    assert metrics.types["greenpool_connections"] == "gauge"
    assert "# TYPE greenpool_leaks_total counter" in metrics.text
    assert (metrics["greenpool_connections_max", name], metrics["greenpool_connections_min", name]) == (3, 1)
    assert metrics.states(name) == {"idle": 1, "used": 0, "connecting": 0, "closing": 0}
    assert prometheus.register(registry) is prometheus.register(registry)  # once per registry


def test_a_real_pool_through_checkouts_a_timeout_a_reset_and_a_broken_connection(
    registry: CollectorRegistry, closing: Callable[[Any], Any], pg_dsn: str, monitor: Any
) -> None:
    """The exposition's values, against what the pool lived through."""
    from greenpool import ConnectionPool, PoolTimeout

    name = unique("pg")
    pool = closing(ConnectionPool(pg_dsn, min_size=2, max_size=2, name=name, open=True))
    pool.wait(timeout=10)

    for _ in range(5):  # 5 requests
        with pool.connection() as conn:
            conn.execute("select 1")
    a, b = pool.getconn(), pool.getconn()  # 2 requests
    held = scrape(registry)
    assert held.states(name) == {"idle": 0, "used": 2, "connecting": 0, "closing": 0}
    with pytest.raises(PoolTimeout):  # 1 request, queued 0.2 s, timed out
        pool.getconn(timeout=0.2)
    pool.putconn(a)
    pool.putconn(b)

    conn = pool.getconn()  # 1 request, returned in a transaction: reset
    conn.execute("select 1")
    pool.putconn(conn)
    eventually(lambda: pool.get_stats()["pool_available"] == 2, what="the reset")

    a, b = pool.getconn(), pool.getconn()  # 2 requests
    victim = a.info.backend_pid
    pool.putconn(a)
    pool.putconn(b)
    monitor.execute("select pg_terminate_backend(%s)", [victim])
    eventually(
        lambda: not monitor.execute("select 1 from pg_stat_activity where pid = %s", [victim]).fetchone(),
        what="the backend gone",
    )
    time.sleep(0.2)  # its goodbye reaches the client socket
    a, b = pool.getconn(timeout=10), pool.getconn(timeout=10)  # 2 requests; one found broken, replaced
    assert victim not in (a.info.backend_pid, b.info.backend_pid)
    pool.putconn(a)
    pool.putconn(b)

    stats = pool.get_stats()
    assert stats["requests_num"] == 13
    metrics = scrape(registry)
    assert metrics.states(name) == {"idle": 2, "used": 0, "connecting": 0, "closing": 0}
    assert metrics["greenpool_pending_requests", name] == 0
    assert metrics["greenpool_acquire_timeouts_total", name] == 1
    assert metrics["greenpool_connections_created_total", name] == 3
    assert metrics["greenpool_connection_errors_total", name] == 0
    assert metrics.closed(name) == {
        "lifetime": 0,
        "idle": 0,
        "broken": 1,
        "returned_active": 0,
        "failover": 0,
        "resize": 0,
    }
    assert metrics["greenpool_returns_reset_total", name] == 1
    assert metrics["greenpool_failovers_total", name] == 0
    assert metrics["greenpool_leaks_total", name] == 0
    # Use: one per return (13 requests, 1 timed out), their time lent.
    assert metrics["greenpool_connection_use_seconds_count", name] == 12
    assert metrics["greenpool_connection_use_seconds_sum", name] == pytest.approx(stats["usage_ms"] / 1000, abs=0.002)
    assert metrics["greenpool_connection_create_seconds_count", name] == 3
    assert metrics["greenpool_connection_create_seconds_sum", name] > 0
    # Waits: 11 served at once, the timed-out one (0.2 s), the one that waited for the replacement.
    assert metrics["greenpool_acquire_wait_seconds_count", name] == 13
    assert metrics["greenpool_acquire_wait_seconds_bucket", name, {"le": "+Inf"}] == 13
    assert metrics["greenpool_acquire_wait_seconds_bucket", name, {"le": "0.0005"}] >= 11
    assert metrics["greenpool_acquire_wait_seconds_bucket", name, {"le": "0.1"}] == 12
    assert metrics["greenpool_acquire_wait_seconds_bucket", name, {"le": "0.25"}] == 13
    assert metrics["greenpool_acquire_wait_seconds_sum", name] >= 0.2
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (sample, labels), value in metrics.samples.items()
        if sample == "greenpool_acquire_wait_seconds_bucket" and ("pool", name) in labels
    )
    assert len(buckets) == len(prometheus.ACQUIRE_WAIT_BUCKETS) + 1
    assert [value for _, value in buckets] == sorted(value for _, value in buckets)  # cumulative
    # get_stats() has the new counters too.
    assert (stats["requests_timeouts"], stats["connections_created"], stats["connections_closed_broken"]) == (1, 3, 1)


def test_lifetime_expiry_and_a_leak(registry: CollectorRegistry, closing: Callable[[Any], Any], pg_dsn: str) -> None:
    """A connection held past its lifetime and its leak threshold: closed for "lifetime" when
    it comes back, one leak reported, a replacement made."""
    from greenpool import ConnectionPool

    name = unique("lifetime")
    pool = closing(
        ConnectionPool(
            pg_dsn,
            min_size=1,
            max_size=1,
            name=name,
            max_lifetime=0.6,
            lifetime_jitter=0.0,
            leak_threshold=0.2,
            open=True,
        )
    )
    pool.wait(timeout=10)
    conn = pool.getconn()
    first = conn.info.backend_pid
    time.sleep(0.9)
    pool.putconn(conn)
    with pool.connection(timeout=10) as conn:
        assert conn.info.backend_pid != first
    metrics = scrape(registry)
    assert metrics["greenpool_leaks_total", name] == 1
    closed = metrics.closed(name)
    assert closed["lifetime"] >= 1
    assert closed["broken"] == closed["idle"] == closed["resize"] == 0
    assert metrics["greenpool_connections_created_total", name] >= 2
    assert pool.get_stats()["leaks"] == 1


class BusyDriver(FakeDriver):
    """A fake driver whose connections may be returned with a query running (`conn.busy`),
    and whose clean-up fails for the connections marked `conn.unclean`."""

    def busy(self, conn: FakeConn) -> bool:
        return bool(getattr(conn, "busy", False))

    def clean(self, conn: FakeConn) -> None:
        if getattr(conn, "unclean", False):
            raise RuntimeError("can't clean it up")
        super().clean(conn)


def test_every_close_reason_is_counted_where_the_pool_closes(
    registry: CollectorRegistry, closing: Callable[[Any], Any]
) -> None:
    """idle (max_idle), resize, failover, broken (return, failed clean-up), returned_active;
    drain() and close_idle() count in none."""
    idle = closing(make_pool(min_size=1, max_size=3, max_idle=0.1, name=unique("idle")))
    slots = [idle.acquire() for _ in range(3)]
    for slot in slots:
        idle.release(slot)
    eventually(lambda: idle.get_stats()["connections_closed_idle"] == 2, what="idle surplus closed")

    resized = closing(make_pool(min_size=3, max_size=3, name=unique("resize")))
    resized.resize(1, 1)

    failed_over = closing(make_pool(min_size=2, max_size=2, name=unique("failover")))
    assert failed_over.failover()

    driver = BusyDriver()
    returned = closing(FakePool(driver, min_size=3, max_size=3, name=unique("returned")))
    returned.open(wait=True, timeout=5)
    active, unclean, broken = (returned.acquire() for _ in range(3))
    active.conn.status = unclean.conn.status = DIRTY
    active.conn.busy = active.conn.unclean = True  # type: ignore[attr-defined]
    unclean.conn.unclean = True  # type: ignore[attr-defined]
    broken.conn.closed = True
    for slot in (active, unclean, broken):
        returned.release(slot)
    eventually(lambda: returned.get_stats()["returns_bad"] == 3, what="the clean-ups")

    untold = closing(make_pool(min_size=2, max_size=2, name=unique("untold")))
    untold.drain()
    eventually(lambda: untold.get_stats()["connections_created"] == 4, what="the drain's replacements")
    untold.close_idle()

    metrics = scrape(registry)
    zero = dict.fromkeys(("lifetime", "idle", "broken", "returned_active", "failover", "resize"), 0)
    assert metrics.closed(idle.name) == {**zero, "idle": 2}
    assert metrics.closed(resized.name) == {**zero, "resize": 2}
    assert metrics.closed(failed_over.name) == {**zero, "failover": 2}
    assert metrics["greenpool_failovers_total", failed_over.name] == 1
    assert metrics.closed(returned.name) == {**zero, "broken": 2, "returned_active": 1}
    assert metrics["greenpool_returns_reset_total", returned.name] == 2
    assert metrics.closed(untold.name) == zero
    for key in ("connections_closed_idle", "connections_closed_resize", "connections_closed_failover"):
        assert key in idle.get_stats()


def test_use_count_stays_monotonic_and_restarts_after_pop_stats(
    registry: CollectorRegistry, closing: Callable[[Any], Any]
) -> None:
    """The returns count (derived) never goes down between scrapes; pop_stats() restarts it."""
    pool = closing(make_pool(min_size=2, max_size=2, name=unique("pop")))
    for _ in range(4):
        pool.release(pool.acquire())
    lent = pool.acquire()
    metrics = scrape(registry)
    assert metrics["greenpool_connection_use_seconds_count", pool.name] == 4
    pool.discard(lent)  # a lending that ends without a return
    assert scrape(registry)["greenpool_connection_use_seconds_count", pool.name] == 4
    pool.pop_stats()
    pool.release(pool.acquire(timeout=5))
    metrics = scrape(registry)
    assert metrics["greenpool_connection_use_seconds_count", pool.name] == 1
    assert metrics["greenpool_acquire_wait_seconds_count", pool.name] == 1


def test_only_open_pools_and_same_names_told_apart(registry: CollectorRegistry, closing: Callable[[Any], Any]) -> None:
    name = unique("twin")
    first = closing(make_pool(min_size=1, max_size=1, name=name))
    second = closing(make_pool(min_size=1, max_size=2, name=name))
    not_open = FakePool(min_size=1, max_size=1, name=unique("not-open"))
    metrics = scrape(registry)
    assert {name, f"{name}#2"} <= metrics.pools()
    assert (metrics["greenpool_connections_max", name], metrics["greenpool_connections_max", f"{name}#2"]) == (1, 2)
    assert not_open.name not in metrics.pools()
    first.close()
    metrics = scrape(registry)
    assert name in metrics.pools() and f"{name}#2" not in metrics.pools()
    assert metrics["greenpool_connections_max", name] == 2  # the one left
    assert second.name == name


def test_an_unlimited_pool_reads_plus_inf(
    registry: CollectorRegistry, closing: Callable[[Any], Any], pg_dsn: str
) -> None:
    from greenpool import NullConnectionPool

    pool = closing(NullConnectionPool(pg_dsn, name=unique("null"), open=True))
    assert math.isinf(scrape(registry)["greenpool_connections_max", pool.name])


def test_setup_checks_metrics_port() -> None:
    celery = pytest.importorskip("celery")
    from greenpool.celery import setup

    app = celery.Celery("gp_metrics_check")
    for bad in (0, 70000, "9100", True, 1.5):
        with pytest.raises(ValueError, match="metrics_port"):
            setup(app, metrics_port=bad)  # type: ignore[arg-type]
    assert setup(app, metrics_port=9100).metrics_port == 9100


# -- prefork: prometheus_client's multiprocess mode ---------------------------------------

_EXPORT_AND_DIE = """
import os, sys
sys.path.insert(0, "tests")
from fake_driver import make_pool
from greenpool.integrations.prometheus import MultiProcessExporter

pool = make_pool(min_size=2, max_size=3, name="mp")
for _ in range(5):
    pool.release(pool.acquire())
MultiProcessExporter().export()
os._exit(0)  # killed, as it were: no mark_process_dead()
"""

_EXPORT_AND_SERVE = """
import json, sys, time
sys.path.insert(0, "tests")
from fake_driver import make_pool
from prometheus_client import CollectorRegistry, generate_latest
from greenpool.integrations.prometheus import LiveProcessesCollector, MultiProcessExporter

pool = make_pool(min_size=1, max_size=3, name="mp")
exporter = MultiProcessExporter(interval=0.05).start()
for _ in range(3):
    pool.release(pool.acquire())
time.sleep(0.3)
slot = pool.acquire()
time.sleep(0.2)
live = CollectorRegistry()
live.register(LiveProcessesCollector())
during = generate_latest(live).decode()
pool.release(slot)
pool.close()
exporter.stop()
print(json.dumps({"during": during, "after": generate_latest(live).decode()}))
"""


def test_multiprocess_exporter_and_the_parents_collector(run_python: Callable[..., Any], tmp_path: Path) -> None:
    """A child exports and dies without a word: its counters stay, its gauges go. The live
    one's gauges are summed while it runs, and zero once its pool closed."""
    directory = tmp_path / "prometheus"
    directory.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(directory), "GREENPOOL_TEST_DSN": ""}
    dead = run_python(_EXPORT_AND_DIE, env=env)
    assert dead.returncode == 0, dead.stderr
    assert any(p.name.startswith("gauge_livesum_") for p in directory.iterdir())
    live = run_python(_EXPORT_AND_SERVE, env=env)
    assert live.returncode == 0, live.stderr
    result = json.loads(live.stdout)

    during = Scrape(result["during"])
    # Gauges: the live process's alone (the dead one's files were marked dead).
    assert during["greenpool_connections_max", "mp"] == 3
    assert during["greenpool_connections_min", "mp"] == 1
    assert during.states("mp") == {"idle": 0, "used": 1, "connecting": 0, "closing": 0}
    # Counters, summaries, histogram: both processes'.
    assert during["greenpool_connections_created_total", "mp"] == 3
    assert during["greenpool_connection_use_seconds_count", "mp"] == 8
    assert during["greenpool_connection_create_seconds_count", "mp"] == 3
    assert during["greenpool_acquire_wait_seconds_count", "mp"] == 9
    assert during["greenpool_acquire_wait_seconds_bucket", "mp", {"le": "+Inf"}] == 9
    assert during["greenpool_connections_closed_total", "mp", {"reason": "broken"}] == 0
    assert during.types["greenpool_acquire_wait_seconds"] == "histogram"

    after = Scrape(result["after"])
    assert after["greenpool_connections_max", "mp"] == 0  # closed: nothing left to count
    assert after["greenpool_connection_use_seconds_count", "mp"] == 9
    # The dead one's live gauges were removed; the other's file stays until someone marks it dead.
    assert len([p for p in directory.iterdir() if p.name.startswith("gauge_livesum_")]) == 1


def test_multiprocess_exporter_needs_the_mode() -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        pytest.skip("this process runs in multiprocess mode")
    with pytest.raises(RuntimeError, match="PROMETHEUS_MULTIPROC_DIR"):
        prometheus.MultiProcessExporter()


# -- Celery: real workers, scraped over HTTP ------------------------------------------------

celery_tests = pytest.importorskip("test_celery")
start_worker = celery_tests.start_worker  # the fixture of tests/integrations/test_celery.py
Worker = celery_tests.Worker


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_gevent_worker_serves_its_pools_metrics(start_worker: Callable[..., Worker]) -> None:
    """`setup(app, pool, db, metrics_port=...)` and `-P gevent`: the worker's pools on /metrics."""
    port = free_port()
    worker = start_worker("-P", "gevent", "-c", "10", GP_METRICS_PORT=str(port))
    url = f"http://127.0.0.1:{port}/metrics"
    results = [worker.task("hold").delay(0.1) for _ in range(20)]
    during = scrape_url(url)  # while tasks run: the server is a greenlet of the worker's hub
    assert during["greenpool_connections_max", "tasks"] == 10
    for result in results:
        result.get(timeout=60)
    worker.run("peewee_hold", 0.01)

    metrics = scrape_url(url)
    assert metrics["greenpool_connections_min", "tasks"] == 2
    assert sum(metrics.states("tasks").values()) <= 10
    assert metrics["greenpool_connection_use_seconds_count", "tasks"] >= 20
    assert metrics["greenpool_connection_use_seconds_sum", "tasks"] >= 20 * 0.1
    assert metrics["greenpool_acquire_wait_seconds_count", "tasks"] >= 20
    assert metrics["greenpool_connections_created_total", "tasks"] >= 2
    assert metrics["greenpool_acquire_timeouts_total", "tasks"] == 0
    peewee = [label for label in metrics.pools() if label.startswith("PooledPostgresqlDatabase-")]
    assert len(peewee) == 1
    assert metrics["greenpool_connection_use_seconds_count", peewee[0]] >= 1
    assert f"Prometheus metrics on http://0.0.0.0:{port}/metrics" in worker.output()


def test_a_prefork_worker_serves_its_childrens_metrics(start_worker: Callable[..., Worker], tmp_path: Path) -> None:
    """-P prefork with PROMETHEUS_MULTIPROC_DIR: the parent serves what its children copy;
    a child killed leaves its counters and takes its gauges away."""
    directory = tmp_path / "prometheus"
    directory.mkdir()
    port = free_port()
    worker = start_worker(
        "-P", "prefork", "-c", "2", GP_METRICS_PORT=str(port), PROMETHEUS_MULTIPROC_DIR=str(directory)
    )
    url = f"http://127.0.0.1:{port}/metrics"

    def tasks(metric: str, **labels: str) -> float | None:
        return scrape_url(url).get(metric, "tasks", **labels)

    # Each child copies its pools at start: max_size summed over the 2 children.
    eventually(lambda: tasks("greenpool_connections_max") == 20, timeout=30, what="both children's gauges")
    for _ in range(6):
        worker.run("hold", 0.01)
    # ... and every 5 s after.
    eventually(
        lambda: (tasks("greenpool_connection_use_seconds_count") or 0) >= 6, timeout=30, what="the tasks' returns"
    )
    created = tasks("greenpool_connections_created_total") or 0
    assert created >= 4

    victim = worker.run("pool_state")["pid"]
    os.kill(victim, signal.SIGKILL)  # billiard starts another child; the victim says nothing
    eventually(
        lambda: (tasks("greenpool_connections_created_total") or 0) >= created + 2,
        timeout=30,
        what="the new child's connections",
    )
    metrics = scrape_url(url)
    assert metrics["greenpool_connections_max", "tasks"] == 20  # not 30: the dead child's gauges are gone
    assert metrics["greenpool_connection_use_seconds_count", "tasks"] >= 6  # its counters stay
    assert "metrics of the prefork children" in worker.output()

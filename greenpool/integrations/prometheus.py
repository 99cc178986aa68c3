"""Prometheus metrics of greenpool's pools (the `prometheus` extra: prometheus_client).

In one process (a gevent, threads or solo Celery worker, a web server's
worker, a script)::

    from greenpool.integrations import prometheus
    import prometheus_client

    prometheus.register()                     # every pool, open now or later
    prometheus_client.start_http_server(9100)

`register()` adds a custom collector to a registry; each scrape reads the
counters the pools keep anyway (`get_stats()`'s, and a few more), so
nothing is added to a checkout or a return. In a Celery worker,
`greenpool.celery.setup(app, *pools, metrics_port=9100)` does the above at
worker start.

A prefork worker's pools live in its children, where a custom collector
can't be scraped: prometheus_client's multiprocess mode
(`PROMETHEUS_MULTIPROC_DIR`) is the way there. `MultiProcessExporter`
copies a child's pool numbers into multiprocess-mode metrics of the same
names every few seconds, and `LiveProcessesCollector` serves them from the
parent, forgetting the gauges of children gone. `setup(...,
metrics_port=...)` wires both when `PROMETHEUS_MULTIPROC_DIR` is set. The
metrics, their labels and the recipe: docs/metrics.md.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import threading
import weakref
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

try:
    import prometheus_client
    from prometheus_client import multiprocess, values
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
        SummaryMetricFamily,
    )
    from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry
    from prometheus_client.utils import floatToGoString
except ModuleNotFoundError as ex:  # pragma: no cover - the extra is missing
    if ex.name is None or not ex.name.startswith("prometheus_client"):
        raise
    raise ModuleNotFoundError(
        f"greenpool.integrations.prometheus needs prometheus_client: pip install 'greenpool[prometheus]' ({ex})",
        name=ex.name,
    ) from ex

from ..engine import instances
from ..engine.stats import CLOSE_REASONS, MetricsSample

__all__ = [
    "ACQUIRE_WAIT_BUCKETS",
    "LiveProcessesCollector",
    "MultiProcessExporter",
    "PoolCollector",
    "mark_dead_processes",
    "multiprocess_dir",
    "register",
    "serve_worker_metrics",
    "unregister",
    "wait_buckets",
]

logger = logging.getLogger("greenpool.prometheus")

#: Upper bounds (seconds) of `greenpool_acquire_wait_seconds`' buckets.
ACQUIRE_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: The `state` label of `greenpool_connections`.
STATES = ("idle", "used", "connecting", "closing")

#: A `max_size` at least this large is unlimited (a null pool's, Peewee's `max_connections=0`).
_UNLIMITED = 2**31 - 1

# Each metric's name (without `_total` for counters) and help text, shared by
# the single-process collector and the multiprocess exporter.
_HELP = {
    "greenpool_connections": (
        "Connections of the pool by state: idle; used (lent, or being cleaned after their return);"
        " connecting (connects reserved or under way); closing. All count against connections_max."
    ),
    "greenpool_connections_max": "The pool's max_size (+Inf when unlimited).",
    "greenpool_connections_min": "The pool's min_size.",
    "greenpool_pending_requests": "Requests waiting for a connection now.",
    "greenpool_acquire_wait_seconds": (
        "Time requests waited for a connection (0 for those served at once). _sum and _count are"
        " counters; the buckets spread _count as the pool's recent window of waits (its last 4096"
        " queued requests) does."
    ),
    "greenpool_connection_use_seconds": "Time connections were lent, per return.",
    "greenpool_connection_create_seconds": "Time successful connects took.",
    "greenpool_acquire_timeouts": "Requests that got no connection within their timeout.",
    "greenpool_connections_created": "Successful connects.",
    "greenpool_connection_errors": "Failed connects.",
    "greenpool_connections_closed": (
        "Connections the pool closed, by reason: lifetime, idle, broken, returned_active, failover, resize."
    ),
    "greenpool_returns_reset": "Returns that needed a clean-up (rollback, cancel, reset callback).",
    "greenpool_failovers": "Times the pool found its server no longer the primary and replaced its connections.",
    "greenpool_leaks": "Connections lent longer than leak_threshold.",
}

# Counter metric (without `_total`) -> the pool's counter (a `get_stats()` key).
_COUNTERS = {
    "greenpool_acquire_timeouts": "requests_timeouts",
    "greenpool_connections_created": "connections_created",
    "greenpool_connection_errors": "connections_errors",
    "greenpool_returns_reset": "returns_reset",
    "greenpool_failovers": "failovers",
    "greenpool_leaks": "leaks",
}


def _open_pools() -> list[Any]:
    """The engine pools of this process that are open, oldest first."""
    return [pool for pool in instances.pools() if not pool.closed]


def _labelled(pools: Iterable[Any]) -> Iterator[tuple[str, Any]]:
    """`(label, pool)`: the pool's name, made unique with `#2`, `#3`... for pools of the same name."""
    seen: dict[str, int] = {}
    for pool in pools:
        n = seen[pool.name] = seen.get(pool.name, 0) + 1
        yield (pool.name if n == 1 else f"{pool.name}#{n}"), pool


def _max_size(sample: MetricsSample) -> float:
    return math.inf if sample.max_size >= _UNLIMITED else float(sample.max_size)


def _states(sample: MetricsSample) -> dict[str, int]:
    return {"idle": sample.idle, "used": sample.used, "connecting": sample.connecting, "closing": sample.closing}


def wait_buckets(sample: MetricsSample) -> list[tuple[str, float]]:
    """`greenpool_acquire_wait_seconds`' cumulative buckets for `sample`, `+Inf` last.

    Requests served at once waited 0 and fall in every bucket; the queued
    ones are spread over the buckets as the recent window of waits is (so
    the counts are estimates once more requests queued than the window
    holds). `+Inf` is every request: the histogram's `_count`.
    """
    requests = sample.counters["requests_num"]
    queued = min(sample.counters["requests_queued"], requests)
    immediate = requests - queued
    waits = sorted(sample.waits)
    scale = queued / len(waits) if waits else 0.0
    buckets: list[tuple[str, float]] = [
        (floatToGoString(bound), float(immediate + round(bisect_right(waits, bound) * scale)))  # type: ignore[no-untyped-call]
        for bound in ACQUIRE_WAIT_BUCKETS
    ]
    buckets.append(("+Inf", float(requests)))
    return buckets


class PoolCollector(Collector):
    """A prometheus_client collector of every open greenpool pool of this process.

    Each scrape reads the pools' counters (see docs/metrics.md for the
    metrics); a pool is labelled `pool=<its name>`. Counters restart from
    zero after a pool's `pop_stats()`, which Prometheus takes as a reset.
    Use `register()` rather than making one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # The returns count is derived (see `MetricsSample`): held monotonic
        # here, per pool, until `pop_stats()` resets the pool's counters.
        self._returns: weakref.WeakKeyDictionary[Any, tuple[int, int]] = weakref.WeakKeyDictionary()

    def describe(self) -> Iterable[Metric]:
        """The metric families, without samples (so registering doesn't scrape)."""
        return list(self._families().values())

    def collect(self) -> Iterable[Metric]:
        """The metric families with a sample set per open pool."""
        families = self._families()
        for label, pool in _labelled(_open_pools()):
            sample = pool.metrics_sample()
            self._add(families, label, sample, self._monotonic_returns(pool, sample))
        return list(families.values())

    def _monotonic_returns(self, pool: Any, sample: MetricsSample) -> int:
        with self._lock:
            generation, last = self._returns.get(pool, (sample.generation, 0))
            returns = sample.returns if generation != sample.generation else max(last, sample.returns)
            self._returns[pool] = (sample.generation, returns)
        return returns

    @staticmethod
    def _families() -> dict[str, Any]:
        pool = ["pool"]
        families: dict[str, Any] = {
            "greenpool_connections": GaugeMetricFamily(
                "greenpool_connections", _HELP["greenpool_connections"], labels=["pool", "state"]
            ),
        }
        for name in ("greenpool_connections_max", "greenpool_connections_min", "greenpool_pending_requests"):
            families[name] = GaugeMetricFamily(name, _HELP[name], labels=pool)
        families["greenpool_acquire_wait_seconds"] = HistogramMetricFamily(
            "greenpool_acquire_wait_seconds", _HELP["greenpool_acquire_wait_seconds"], labels=pool
        )
        for name in ("greenpool_connection_use_seconds", "greenpool_connection_create_seconds"):
            families[name] = SummaryMetricFamily(name, _HELP[name], labels=pool)
        for name in _COUNTERS:
            families[name] = CounterMetricFamily(name, _HELP[name], labels=pool)
        families["greenpool_connections_closed"] = CounterMetricFamily(
            "greenpool_connections_closed", _HELP["greenpool_connections_closed"], labels=["pool", "reason"]
        )
        return families

    @staticmethod
    def _add(families: dict[str, Any], label: str, sample: MetricsSample, returns: int) -> None:
        counters = sample.counters
        for state, n in _states(sample).items():
            families["greenpool_connections"].add_metric([label, state], n)
        families["greenpool_connections_max"].add_metric([label], _max_size(sample))
        families["greenpool_connections_min"].add_metric([label], sample.min_size)
        families["greenpool_pending_requests"].add_metric([label], sample.waiting)
        families["greenpool_acquire_wait_seconds"].add_metric([label], wait_buckets(sample), sample.wait_seconds)
        families["greenpool_connection_use_seconds"].add_metric([label], returns, sample.usage_seconds)
        families["greenpool_connection_create_seconds"].add_metric(
            [label], counters["connections_created"], counters["connections_ms"] / 1000
        )
        for name, key in _COUNTERS.items():
            families[name].add_metric([label], counters[key])
        for reason in CLOSE_REASONS:
            families["greenpool_connections_closed"].add_metric(
                [label, reason], counters[f"connections_closed_{reason}"]
            )


_registered: weakref.WeakKeyDictionary[CollectorRegistry, PoolCollector] = weakref.WeakKeyDictionary()
_registered_lock = threading.Lock()


def register(registry: CollectorRegistry | None = None) -> PoolCollector:
    """Add a `PoolCollector` of every pool, open now or later, to `registry`; return it.

    `registry` defaults to None: prometheus_client's default registry
    (`prometheus_client.REGISTRY`), the one `start_http_server()` serves.
    Registering again in the same registry returns the collector already
    there.
    """
    registry = REGISTRY if registry is None else registry
    with _registered_lock:
        collector = _registered.get(registry)
        if collector is None:
            collector = PoolCollector()
            registry.register(collector)
            _registered[registry] = collector
    return collector


def unregister(registry: CollectorRegistry | None = None) -> None:
    """Remove the collector `register()` added to `registry` (default None: the default registry), if any."""
    registry = REGISTRY if registry is None else registry
    with _registered_lock:
        collector = _registered.pop(registry, None)
    if collector is not None:
        registry.unregister(collector)


# -- prometheus_client's multiprocess mode ---------------------------------------


def multiprocess_dir() -> str | None:
    """`PROMETHEUS_MULTIPROC_DIR` if prometheus_client runs in multiprocess mode, else None.

    Raise `RuntimeError` if the variable is set but prometheus_client was
    imported before it was (the mode is chosen at its import).
    """
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")
    if not path:
        return None
    if not getattr(values.ValueClass, "_multiprocess", False):
        raise RuntimeError(
            "PROMETHEUS_MULTIPROC_DIR is set, but prometheus_client was imported before it was:"
            " set it in the environment the process starts with"
        )
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's
    return True


def mark_dead_processes(path: str | None = None) -> list[int]:
    """Call `mark_process_dead()` for each process whose live gauges remain but that is gone.

    `path` defaults to None: `PROMETHEUS_MULTIPROC_DIR`. A child killed
    (a hard time limit, the OOM killer) never says it stops; this finds it
    from its files. Return the pids marked.
    """
    path = path or os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")
    if not path:
        raise ValueError("no path given and PROMETHEUS_MULTIPROC_DIR is not set")
    dead = set()
    for file in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        pid_text = os.path.basename(file)[: -len(".db")].rpartition("_")[2]
        if pid_text.isdigit() and not _alive(int(pid_text)):
            dead.add(int(pid_text))
    for pid in sorted(dead):
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
    return sorted(dead)


class LiveProcessesCollector(Collector):
    """prometheus_client's `MultiProcessCollector`, first forgetting the live gauges of processes gone.

    For the process that serves a multiprocess-mode directory (a prefork
    worker's parent): `path` defaults to None, `PROMETHEUS_MULTIPROC_DIR`.
    """

    def __init__(self, path: str | None = None) -> None:
        self._collector = multiprocess.MultiProcessCollector(None, path)  # type: ignore[no-untyped-call]
        self._path: str = self._collector._path

    def collect(self) -> Iterable[Metric]:
        """`mark_dead_processes()`, then every process's metrics, merged."""
        mark_dead_processes(self._path)
        return list(self._collector.collect())  # type: ignore[no-untyped-call]


def _observe_many(metric: Any, amount: float, n: int) -> None:
    """`metric.observe(amount)` `n` times: in one step on prometheus_client's values when they are as known."""
    if n <= 0:
        return
    total = getattr(metric, "_sum", None)
    count = getattr(metric, "_count", None)
    buckets = getattr(metric, "_buckets", None)
    bounds = getattr(metric, "_upper_bounds", None)
    if total is not None and count is not None and buckets is None:  # a Summary
        count.inc(n)
        total.inc(amount * n)
    elif total is not None and buckets is not None and bounds is not None and len(bounds) == len(buckets):
        buckets[bisect_left(bounds, amount)].inc(n)  # as observe(): the first bound >= amount
        total.inc(amount * n)
    else:  # pragma: no cover - another prometheus_client's internals
        for _ in range(n):
            metric.observe(amount)


class _Metrics:
    """The multiprocess-mode metrics of this process (made once, not registered anywhere)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram, Summary

        def gauge(name: str, labels: list[str]) -> Any:
            return Gauge(name, _HELP[name], labels, registry=None, multiprocess_mode="livesum")

        self.connections = gauge("greenpool_connections", ["pool", "state"])
        self.max = gauge("greenpool_connections_max", ["pool"])
        self.min = gauge("greenpool_connections_min", ["pool"])
        self.pending = gauge("greenpool_pending_requests", ["pool"])
        self.wait = Histogram(
            "greenpool_acquire_wait_seconds",
            _HELP["greenpool_acquire_wait_seconds"],
            ["pool"],
            registry=None,
            buckets=ACQUIRE_WAIT_BUCKETS,
        )
        self.use = Summary(
            "greenpool_connection_use_seconds", _HELP["greenpool_connection_use_seconds"], ["pool"], registry=None
        )
        self.create = Summary(
            "greenpool_connection_create_seconds",
            _HELP["greenpool_connection_create_seconds"],
            ["pool"],
            registry=None,
        )
        self.counters = {name: Counter(name, _HELP[name], ["pool"], registry=None) for name in _COUNTERS}
        self.closed = Counter(
            "greenpool_connections_closed", _HELP["greenpool_connections_closed"], ["pool", "reason"], registry=None
        )


_metrics: _Metrics | None = None
_metrics_lock = threading.Lock()


def _the_metrics() -> _Metrics:
    global _metrics
    with _metrics_lock:
        if _metrics is None:
            _metrics = _Metrics()
        return _metrics


@dataclass
class _Copied:
    """What `MultiProcessExporter` last copied of one pool."""

    label: str
    generation: int = -1
    counters: dict[str, int] = field(default_factory=dict)
    returns: int = 0
    usage: float = 0.0
    connect_ms: int = 0
    immediate: int = 0  # requests served without queueing
    waited: int = 0  # queued requests whose wait was recorded


class MultiProcessExporter:
    """Copies this process's pools into prometheus_client's multiprocess-mode metrics.

    For a process whose metrics another process serves (a prefork
    worker's child): `export()` sets the gauges (`multiprocess_mode=
    "livesum"`: summed over the processes alive) and adds to the counters,
    the histogram and the summaries what happened since the last copy,
    under the names the single-process `PoolCollector` uses. `start()`
    copies every `interval` seconds (default 5.0) in a background thread;
    `stop()` makes a last copy. `PROMETHEUS_MULTIPROC_DIR` must be set
    before prometheus_client is imported (`RuntimeError` otherwise).

    The histogram's buckets get each queued wait recorded since the last
    copy and one 0 per request served at once.
    """

    def __init__(self, interval: float = 5.0) -> None:
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval > 0:
            raise ValueError(f"interval must be a number of seconds > 0, got {interval!r}")
        if multiprocess_dir() is None:
            raise RuntimeError(
                "MultiProcessExporter needs PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode)"
            )
        self.interval = float(interval)
        self._metrics = _the_metrics()
        self._lock = threading.Lock()
        self._copied: weakref.WeakKeyDictionary[Any, _Copied] = weakref.WeakKeyDictionary()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> MultiProcessExporter:
        """Copy now, then every `interval` seconds in a daemon thread; return self."""
        self.export()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="greenpool-metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the copying thread (if started), then copy a last time."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.interval + 5)
        self.export()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.export()
            except Exception:
                logger.exception("copying the pools' metrics failed")

    def export(self) -> None:
        """Copy the pools' numbers now: the open ones, and a last time those closed since."""
        with self._lock:
            open_pools = dict((pool, label) for label, pool in _labelled(_open_pools()))
            for pool, label in open_pools.items():
                copied = self._copied.get(pool)
                if copied is None:
                    copied = self._copied[pool] = _Copied(label)
                self._copy(pool.metrics_sample(), copied, is_open=True)
            for pool, copied in list(self._copied.items()):
                if pool not in open_pools:
                    self._copy(pool.metrics_sample(), copied, is_open=False)
                    del self._copied[pool]

    def _copy(self, sample: MetricsSample, copied: _Copied, is_open: bool) -> None:
        m = self._metrics
        label = copied.label
        for state, n in _states(sample).items():
            m.connections.labels(label, state).set(n if is_open else 0)
        m.max.labels(label).set(_max_size(sample) if is_open else 0)
        m.min.labels(label).set(sample.min_size if is_open else 0)
        m.pending.labels(label).set(sample.waiting if is_open else 0)

        counters = sample.counters
        if sample.generation != copied.generation:  # first copy, or pop_stats() reset the counters
            copied.generation = sample.generation
            copied.counters = dict.fromkeys(counters, 0)
            copied.returns = copied.connect_ms = copied.immediate = copied.waited = 0
            copied.usage = 0.0
        before = copied.counters
        for name, key in _COUNTERS.items():
            m.counters[name].labels(label).inc(max(0, counters[key] - before[key]))
        for reason in CLOSE_REASONS:
            key = f"connections_closed_{reason}"
            m.closed.labels(label, reason).inc(max(0, counters[key] - before[key]))
        copied.counters = dict(counters)

        # Summaries: a count and a sum; the sum waits for a count to go with it.
        returns = max(copied.returns, sample.returns)
        if returns > copied.returns:
            n = returns - copied.returns
            _observe_many(m.use.labels(label), max(0.0, sample.usage_seconds - copied.usage) / n, n)
            copied.returns, copied.usage = returns, sample.usage_seconds
        created = counters["connections_created"] - before["connections_created"]
        if created > 0:
            _observe_many(
                m.create.labels(label), max(0, counters["connections_ms"] - copied.connect_ms) / 1000 / created, created
            )
            copied.connect_ms = counters["connections_ms"]

        # The histogram: the waits recorded since (the window's newest), and a 0 per request served at once.
        wait = m.wait.labels(label)
        requests, queued = counters["requests_num"], counters["requests_queued"]
        immediate = max(copied.immediate, requests - queued)
        _observe_many(wait, 0.0, immediate - copied.immediate)
        copied.immediate = immediate
        waited = max(copied.waited, queued - sample.waiting)
        new = min(waited - copied.waited, len(sample.waits))
        for seconds in sample.waits[len(sample.waits) - new :]:
            wait.observe(seconds)
        copied.waited = waited


# -- Celery ------------------------------------------------------------------------

_child_exporter: MultiProcessExporter | None = None


def serve_worker_metrics(port: int, task_pool: str | None, addr: str = "0.0.0.0") -> None:
    """Serve the pools' metrics from a Celery worker: what `setup(..., metrics_port=port)` does at worker start.

    `task_pool` is the worker's ("gevent", "threads", "solo", "prefork",
    ...). Except for prefork: `register()` and `start_http_server(port,
    addr)` in the worker process. For prefork, with
    `PROMETHEUS_MULTIPROC_DIR` set: the parent serves a
    `LiveProcessesCollector` on `port`, each child runs a
    `MultiProcessExporter` from `worker_process_init` and marks itself dead
    at `worker_process_shutdown`; without it, a warning and no metrics.
    `addr` defaults to "0.0.0.0", every interface. What it did is logged
    once the worker is ready (Celery's logging is set up by then).
    """
    from celery import signals

    if task_pool != "prefork":
        register()
        prometheus_client.start_http_server(port, addr)
        _announce(logging.INFO, f"greenpool: Prometheus metrics on http://{addr}:{port}/metrics")
        return
    path = multiprocess_dir()
    if path is None:
        _announce(
            logging.WARNING,
            f"greenpool: metrics_port={port} in a prefork worker needs prometheus_client's multiprocess mode:"
            " start the worker with PROMETHEUS_MULTIPROC_DIR set to an empty directory (docs/metrics.md);"
            " no metrics are served",
        )
        return
    registry = CollectorRegistry()
    registry.register(LiveProcessesCollector(path))
    prometheus_client.start_http_server(port, addr, registry=registry)
    signals.worker_process_init.connect(_child_started, weak=False, dispatch_uid="greenpool-prometheus")
    signals.worker_process_shutdown.connect(_child_stopping, weak=False, dispatch_uid="greenpool-prometheus")
    _announce(
        logging.INFO,
        f"greenpool: Prometheus metrics of the prefork children on http://{addr}:{port}/metrics (from {path})",
    )


def _announce(level: int, message: str) -> None:
    """Log `message` once the worker is ready."""
    from celery import signals

    def log(**_: Any) -> None:
        logger.log(level, "%s", message)

    signals.worker_ready.connect(log, weak=False, dispatch_uid="greenpool-prometheus")


def _child_started(**_: Any) -> None:
    """`worker_process_init`: copy this child's pools into the multiprocess-mode metrics."""
    global _child_exporter
    _child_exporter = MultiProcessExporter().start()


def _child_stopping(**_: Any) -> None:
    """`worker_process_shutdown`: a last copy, then this child's live gauges go."""
    global _child_exporter
    exporter, _child_exporter = _child_exporter, None
    if exporter is not None:
        exporter.stop()
    multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

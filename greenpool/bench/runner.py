"""Running contenders: one run (`run_once`), a scenario's rounds (`run_scenario`), and their `RunResult`.

A run opens a contender, warms it up, times it and closes it, within a time
bound. A query's latency runs from asking for a connection to having the
result, so it includes the wait for the pool.
"""

from __future__ import annotations

import faulthandler
import math
import statistics
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gevent

from .backends import CONNECT_KWARGS, Server
from .contenders import CONTENDERS, Contender, ContenderConfig, ContenderSpec
from .errors import describe_error
from .scenarios import Phase, Scenario
from .workload import CLOSE_TIMEOUT, Workload, perf_counter

#: Untimed queries each client greenlet runs before a timed run.
WARMUP_QUERIES = 2
#: Pool `timeout` (getconn) and `open(wait=True)` timeout, in seconds.
POOL_TIMEOUT = 30.0
#: After a run's gevent.Timeout, how long the OS-level watchdog waits before
#: dumping every stack and exiting: it only fires if the gevent hub is blocked
#: (then no gevent.Timeout can fire and the benchmark would hang forever).
WATCHDOG_GRACE = 60.0


@dataclass
class RunResult:
    """Figures of one contender in one phase of one round (latencies in ms)."""

    scenario: str
    phase: str
    contender: str
    round: int
    ok: bool = False
    error: str | None = None
    traceback: str | None = None
    open_s: float | None = None
    queries: int = 0
    seconds: float = 0.0
    qps: float = math.nan
    mean_ms: float = math.nan
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    p99_ms: float = math.nan
    p999_ms: float = math.nan
    max_ms: float = math.nan
    pool_stats: dict[str, Any] | None = None
    #: A scenario's own figures (scaleout: server connections, CPU; see `greenpool.bench.scaleout`).
    extra: dict[str, Any] | None = None


class RunTimedOut(Exception):
    """A contender run exceeded its time bound."""


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _record_latencies(result: RunResult, latencies: Sequence[float]) -> None:
    ordered = sorted(latencies)
    result.queries = len(ordered)
    result.qps = len(ordered) / result.seconds if result.seconds > 0 else math.nan
    if ordered:
        result.mean_ms = statistics.fmean(ordered) * 1000
        for name, fraction in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)):
            setattr(result, f"{name}_ms", _percentile(ordered, fraction) * 1000)
        result.max_ms = ordered[-1] * 1000


def run_once(
    spec: ContenderSpec,
    scenario: Scenario,
    phase: Phase,
    round_no: int,
    config: ContenderConfig,
    time_limit: float,
) -> RunResult:
    """Open, warm up, time and close one contender; never raises (but Ctrl-C).

    The opening and warm-up are not timed. The whole run is bounded by
    `time_limit` seconds (a gevent.Timeout), closing by `CLOSE_TIMEOUT`.
    """
    result = RunResult(scenario.name, phase.name, spec.name, round_no)
    instance: Contender | None = None
    deadline = gevent.Timeout(time_limit)
    # Last resort if the hub itself is blocked: dump all stacks and exit.
    faulthandler.dump_traceback_later(time_limit + CLOSE_TIMEOUT + WATCHDOG_GRACE, exit=True)
    deadline.start()
    try:
        instance = spec.factory(config)
        started = perf_counter()
        instance.open()
        result.open_s = perf_counter() - started

        # Warm-up, untimed: the scenario's greenlets run WARMUP_QUERIES each,
        # so that each connection is past its first queries (server caches,
        # psycopg's prepared statements) and the timed part is steady state.
        warmup = Workload(scenario.sql, scenario.greenlets, WARMUP_QUERIES, None)
        warmup.start()
        instance.drive(warmup)
        instance.reset_stats()

        work = Workload(scenario.sql, scenario.greenlets, scenario.queries_each, scenario.duration)
        work.start()
        started = perf_counter()
        instance.drive(work)
        result.seconds = perf_counter() - started
        _record_latencies(result, work.latencies)
        result.pool_stats = instance.stats()
        result.ok = True
    except gevent.Timeout as exc:
        if exc is not deadline:
            result.error = describe_error(exc)
        else:
            result.error = f"timed out after {time_limit:g} s (--timeout)"
        result.traceback = traceback.format_exc()
    except Exception as exc:  # noqa: BLE001 - a failing contender must not stop the others
        result.error = describe_error(exc)
        result.traceback = traceback.format_exc()
    finally:
        deadline.close()
        if instance is not None:
            _close_bounded(instance, result)
        faulthandler.cancel_dump_traceback_later()
    return result


def _close_bounded(instance: Contender, result: RunResult) -> None:
    """Close `instance` within `CLOSE_TIMEOUT`; a failure there fails the run."""
    try:
        with gevent.Timeout(CLOSE_TIMEOUT, RunTimedOut(f"close took over {CLOSE_TIMEOUT:g} s")):
            instance.close()
    except Exception as exc:  # noqa: BLE001 - report, keep benchmarking
        if result.ok:
            result.ok = False
            result.error = f"closing: {describe_error(exc)}"
            result.traceback = traceback.format_exc()
        else:
            result.error = f"{result.error}; closing also failed: {describe_error(exc)}"


@dataclass(frozen=True)
class Environment:
    """What every run shares: servers (by backend name), connection class, limits."""

    servers: Mapping[str, Server]
    connection_class: type[Any]
    connection_class_name: str
    run_timeout: float
    #: The ``celery`` scenario's broker URL (--broker); None: a throw-away filesystem broker.
    celery_broker: str | None = None


#: Longest error text in a progress line (the report below the scenario has it whole).
PROGRESS_ERROR_CHARS = 100


def progress_line(index: int, total: int, scenario: str, contender: str, phase: str, round_no: int, rounds: int) -> str:
    """What runs next, before it runs: ``[2/14] steady · greenpool · round 1/2 ...``.

    A storm's phase comes after the contender:
    ``[5/38] storm · greenpool · calm · round 1/1 ...``.
    """
    what = [scenario, contender, *([phase] if phase != "run" else []), f"round {round_no}/{rounds}"]
    return f"[{index}/{total}] {' · '.join(what)} ..."


def result_line(result: RunResult) -> str:
    """A run's figures, or its failure, on one short indented line."""
    if not result.ok:
        error = result.error or "(no message)"
        if len(error) > PROGRESS_ERROR_CHARS:
            error = error[: PROGRESS_ERROR_CHARS - 3] + "..."
        return f"    FAILED {error}"
    return (
        f"    {result.qps:.0f} q/s, p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms"
        f" ({result.queries} queries in {result.seconds:.2f} s)"
    )


class Progress:
    """Numbers the runs of a whole benchmark; prints a line before each run and one after it, flushed."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0

    def before(self, scenario: str, contender: str, phase: str, round_no: int, rounds: int) -> None:
        """Announce the next run."""
        self.done += 1
        print(progress_line(self.done, self.total, scenario, contender, phase, round_no, rounds), flush=True)

    def after(self, result: RunResult) -> None:
        """Print `result`'s figures."""
        print(result_line(result), flush=True)

    def skip(self, runs: int) -> None:
        """Count `runs` that won't run (their scenario could not start)."""
        self.done += runs


def run_scenario(
    scenario: Scenario,
    names: Sequence[str],
    rounds: int,
    env: Environment,
    progress: Progress | None = None,
) -> list[RunResult]:
    """All rounds of one scenario; contenders (and phases) alternate between rounds.

    `progress` numbers the runs across scenarios; by default they are
    numbered within this one.
    """
    if progress is None:
        progress = Progress(len(names) * len(scenario.phases) * rounds)
    proxy = None
    server = env.servers[scenario.backend]
    backend, dsn = server.backend, server.dsn
    results: list[RunResult] = []
    if scenario.is_storm:
        try:
            from greenpool.testing.proxy import Proxy

            host, port = backend.tcp_target(server.dsn)
            proxy = Proxy(host, port, connect_delay=scenario.connect_delay)
            proxy.start()
            dsn = backend.via_proxy(server.dsn, proxy.host, proxy.port)
        except Exception as exc:  # noqa: BLE001 - the other scenarios still run
            if proxy is not None:
                proxy.stop()
            error = f"proxy: {describe_error(exc)}"
            print(f"  {error}", flush=True)
            progress.skip(len(names) * len(scenario.phases) * rounds)
            return [
                RunResult(
                    scenario.name,
                    phase.name,
                    name,
                    1,
                    error=error,
                    traceback=traceback.format_exc(),
                )
                for name in names
                for phase in scenario.phases
            ]
    try:
        for round_no in range(1, rounds + 1):
            # Rotate the order so no contender always runs first (cold caches,
            # load from the previous run) or always last.
            shift = (round_no - 1) % len(names)
            order = [*names[shift:], *names[:shift]]
            phases = scenario.phases if round_no % 2 else scenario.phases[::-1]
            for name in order:
                for phase in phases:
                    config = ContenderConfig(
                        dsn=dsn,
                        pool_size=scenario.pool_size,
                        max_lifetime=phase.max_lifetime,
                        connection_class=env.connection_class,
                        connect_kwargs=CONNECT_KWARGS,
                        timeout=POOL_TIMEOUT,
                        backend=backend,
                    )
                    limit = env.run_timeout + (scenario.duration or 0.0)
                    progress.before(scenario.name, name, phase.name, round_no, rounds)
                    result = run_once(CONTENDERS[name], scenario, phase, round_no, config, limit)
                    results.append(result)
                    progress.after(result)
    finally:
        if proxy is not None:
            proxy.stop()
    return results

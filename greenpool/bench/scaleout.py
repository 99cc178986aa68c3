"""The ``scaleout`` scenario: 1, 2 and 4 Celery worker processes, direct and through PgBouncer.

A fleet grows by processes, and direct to the server each process brings
its own connections: N processes with pools of P open N x P. Through
PgBouncer in transaction mode (``default_pool_size`` = P) the server keeps
seeing P, however many processes share them. This scenario measures both:

- Each run starts N real Celery workers (``-P gevent -c G`` on
  `greenpool.bench.celery_worker`, each with a `greenpool.ConnectionPool`
  handed to `greenpool.celery.setup`) consuming one queue on one broker
  (`greenpool.bench.celery_scenario`: ``--broker``, else a throw-away
  filesystem broker), with psycopg's prepared statements off
  (`greenpool.pg.pgbouncer_kwargs()`) on both routes. Their tasks are
  pool-bound (`SCALEOUT_TASK`: 3 x ``select pg_sleep(0.02)`` on one
  borrowed connection), so that server connections, not the workers'
  CPU, set the pace. Direct, a process's pool has P connections; through
  PgBouncer it has G, what the process uses at once (as docs/sizing.md
  sizes pools behind PgBouncer), and PgBouncer shares its P server
  connections among all of them. The parent sends the run's tasks before
  the workers start: more than the connections can run in the scenario's
  duration. Figures cover the steady state, from the moment N x G tasks
  are done (warm-up) to `duration` seconds later (the run is cut there).
- Meanwhile the parent samples the server's ``pg_stat_activity`` every
  `SAMPLE_INTERVAL` seconds for the connections of the run (tagged by
  ``application_name``): their peak is the run's ``server conns``.
- One PgBouncer (`greenpool.testing.PgBouncer`, transaction mode,
  ``default_pool_size`` = P) serves every ``pgbouncer`` run. Without the
  ``pgbouncer`` program those runs are left out with a note, not failed.

Throughput is the tasks all workers finished in the steady state, per
second. The report compares each run with ``direct x1`` (one process, P
server connections) in the same round, and says whether the targets hold:
through PgBouncer the server never sees more than P connections, and
``pgbouncer x4`` keeps at least `TARGET_RATIO` of ``direct x1``'s
throughput. CPU figures say where the machine is the limit: the share of
all CPUs busy during the steady state (``/proc/stat``), and the cores the
workers, PgBouncer, the run's server backends (when the server runs on
this machine) and everything else used.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any

import gevent

from .backends import CONNECT_KWARGS, POSTGRES
from .celery_scenario import (
    Broker,
    CeleryWorker,
    ResultsFile,
    TaskSender,
    Waited,
    celery_installed,
    open_broker,
    process_cpu_seconds,
    result_line,
    steady_state,
    wait_for_tasks,
    worker_config,
)
from .errors import describe_error
from .report import (
    PAIRED_LEGEND,
    OverviewRow,
    Summary,
    _error_lines,
    _fmt,
    _qps_ratio,
    _table,
    good_runs,
    median_extra,
    median_ratio,
    paired_ratios,
    ratio_range,
    summarize,
)
from .runner import Environment, Progress, RunResult, _record_latencies
from .scenarios import SCALEOUT_ROUTES, SCALEOUT_TASK, Scenario

#: Seconds between two samples of the server's connections.
SAMPLE_INTERVAL = 0.02
#: ``pgbouncer x<most processes>`` over ``direct x1``: the throughput PgBouncer should keep.
TARGET_RATIO = 0.9
#: Machine CPU busy above which a run counts as CPU-bound.
CPU_BOUND = 0.9
#: The run every other is compared with.
BASELINE = "direct x1"
#: The only contender (the workers' pool).
CONTENDER = "greenpool"


def route_of(phase: str) -> tuple[str, int]:
    """``"pgbouncer x4"`` -> ``("pgbouncer", 4)``."""
    route, _, count = phase.partition(" x")
    return route, int(count)


# ---------------------------------------------------------------- CPU figures


def _machine_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # up to steal; guest time is in user already
    return total - idle, total


def _server_seconds(pids: Sequence[int]) -> dict[int, float] | None:
    """CPU seconds of each of the server's backends `pids`, if the server runs on this machine; else None."""
    seconds = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8") as comm:
                if not comm.read().startswith("postgres"):
                    return None  # another machine's (or container's) pids
        except OSError:
            continue  # gone since the sample, or not ours to see
        used = process_cpu_seconds(pid)
        if used is not None:
            seconds[pid] = used
    return seconds or None


# ---------------------------------------------------------------- one run


class _Sampler:
    """Samples, in a greenlet, the server connections carrying `tag`; keeps their peak and latest pids."""

    def __init__(self, env: Environment, dsn: str, tag: str) -> None:
        self.peak = 0
        self.samples = 0
        #: The server pids of the latest sample.
        self.pids: list[int] = []
        self._running = True
        self._conn = env.connection_class.connect(dsn, **CONNECT_KWARGS)
        self._greenlet = gevent.spawn(self._run, tag)

    def _run(self, tag: str) -> None:
        while self._running:
            rows = self._conn.execute("select pid from pg_stat_activity where application_name = %s", [tag]).fetchall()
            self.pids = [int(row[0]) for row in rows]
            self.peak = max(self.peak, len(rows))
            self.samples += 1
            gevent.sleep(SAMPLE_INTERVAL)

    def stop(self) -> None:
        """Stop after the sample under way, and close the connection."""
        self._running = False
        try:
            self._greenlet.join(timeout=10)
            self._greenlet.kill(block=True, timeout=5)
        finally:
            self._conn.close()


def _backlog(scenario: Scenario, route: str, processes: int) -> int:
    """Tasks to send a run: its warm-up and drain, and 1.5 x what its connections can do in `duration`."""
    connections = scenario.pool_size * (processes if route == "direct" else 1)
    most = connections / (SCALEOUT_TASK.queries * SCALEOUT_TASK.query_seconds) * (scenario.duration or 0.0)
    return 2 * processes * scenario.greenlets + math.ceil(1.5 * most)


def run_once(
    scenario: Scenario,
    phase: str,
    round_no: int,
    dsn: str,
    tag: str,
    env: Environment,
    broker: Broker,
    sender: TaskSender,
    bouncer_pid: int | None = None,
) -> RunResult:
    """One run: `phase`'s Celery workers on `dsn`, whose server connections carry `tag`; never raises (but Ctrl-C)."""
    from ..pg.pgbouncer import pgbouncer_kwargs

    route, processes = route_of(phase)
    result = RunResult(scenario.name, phase, CONTENDER, round_no)
    # Direct, each process's P connections are the server's; through
    # PgBouncer a process's pool holds what it uses at once (G, as
    # docs/sizing.md says), and PgBouncer shares its P server connections.
    pool_size = scenario.pool_size if route == "direct" else scenario.greenlets
    queue = f"greenpool-bench-{secrets.token_hex(4)}"
    folder = tempfile.mkdtemp(prefix="greenpool-bench-scaleout-")
    results = [ResultsFile(os.path.join(folder, f"results-{i}")) for i in range(processes)]
    kwargs = {**CONNECT_KWARGS, **pgbouncer_kwargs()}
    configs = [worker_config(broker, queue, CONTENDER, dsn, pool_size, kwargs, file.path) for file in results]
    warm, total = processes * scenario.greenlets, _backlog(scenario, route, processes)
    workers: list[CeleryWorker] = []
    sampler: _Sampler | None = None
    waited = Waited()
    limit = env.run_timeout + (scenario.duration or 0.0)
    try:
        with gevent.Timeout(limit, RuntimeError(f"timed out after {limit:g} s (--timeout)")):
            sampler = _Sampler(env, env.servers[POSTGRES].dsn, tag)
            sender.send(queue, scenario.sql, SCALEOUT_TASK.queries, total)
            workers = [CeleryWorker(config, scenario.greenlets) for config in configs]
            backends: list[int] = []
            load1 = math.nan

            def snapshot() -> tuple[Any, ...]:
                nonlocal load1
                if not backends:  # at the first snapshot: the run's server backends then
                    backends.extend(sampler.pids if sampler is not None else ())
                    load1 = os.getloadavg()[0]
                return (
                    _machine_ticks(),
                    process_cpu_seconds(bouncer_pid),
                    _server_seconds(backends),
                    sum(worker.cpu_seconds() or 0.0 for worker in workers),
                )

            deadline = time.monotonic() + limit
            waited = wait_for_tasks(workers, results, total, warm, scenario.duration or math.inf, deadline, snapshot)
            steady = steady_state([t for file in results for t in file.times], warm, waited.cut_at)
    except Exception as exc:  # noqa: BLE001 - a failing run must not stop the others
        result.error = describe_error(exc)
        result.traceback = traceback.format_exc()
        return result
    finally:
        if sampler is not None:
            sampler.stop()
        for worker in workers:
            worker.stop(cold=True)  # the backlog left is not worth waiting for
        sender.delete(queue)
        shutil.rmtree(folder, ignore_errors=True)
    result.seconds = steady.seconds
    _record_latencies(result, [t[3] - t[0] for t in steady.tasks])
    result.queries, result.qps = steady.done, steady.done / steady.seconds
    per_process = [sum(steady.begin < t[3] <= steady.end for t in file.times) / steady.seconds for file in results]
    (*before, workers_before), (*after, workers_after) = waited.first, waited.last
    result.extra = {
        "route": route,
        "processes": processes,
        "client_pool_size": pool_size,
        "server_peak": sampler.peak,
        "server_cap": scenario.pool_size * (processes if route == "direct" else 1),
        "samples": sampler.samples,
        "per_process_tps": per_process,
        "queries_per_task": SCALEOUT_TASK.queries,
        "cut": waited.cut_at is not None,
        "cpus": os.cpu_count(),
        "load1": load1,
        **_cpu_figures(tuple(before), tuple(after), waited.seconds or math.nan, workers_after - workers_before),
    }
    result.ok = True
    return result


def _cpu_figures(before: tuple[Any, ...], after: tuple[Any, ...], seconds: float, workers_s: float) -> dict[str, Any]:
    """The steady state's CPU: machine busy share, and cores used by the workers, PgBouncer, the server, the rest."""
    (machine, bouncer, server), (machine_end, bouncer_end, server_end) = before, after
    figures: dict[str, Any] = {"workers_cores": workers_s / seconds}
    busy = None
    if machine is not None and machine_end is not None and machine_end[1] > machine[1]:
        busy = (machine_end[0] - machine[0]) / (machine_end[1] - machine[1])
    figures["cpu_busy"] = busy
    figures["pgbouncer_cores"] = (bouncer_end - bouncer) / seconds if bouncer is not None and bouncer_end else None
    server_cores = None
    if server is not None and server_end is not None:
        server_cores = sum(server_end[pid] - used for pid, used in server.items() if pid in server_end) / seconds
    figures["server_cores"] = server_cores
    figures["other_cores"] = None
    if busy is not None and server_cores is not None:
        used = figures["workers_cores"] + (figures["pgbouncer_cores"] or 0.0) + server_cores
        figures["other_cores"] = max(0.0, busy * (os.cpu_count() or 1) - used)
    return figures


def extra_line(result: RunResult) -> str:
    """A run's server connections and CPU figures, on one indented line."""
    extra = result.extra or {}
    parts = [f"server connections: peak {extra.get('server_peak')} (cap {extra.get('server_cap')})"]
    cpu = [f"machine {_percent(extra.get('cpu_busy'))} busy"]
    for key in ("workers", "pgbouncer", "server", "other"):
        if extra.get(f"{key}_cores") is not None:
            cpu.append(f"{key} {_fmt(_number(extra.get(f'{key}_cores')), '.2f')}")
    parts.append("CPU: " + ", ".join(cpu) + " cores")
    parts.append(f"load {_fmt(_number(extra.get('load1')), '.2f')}")
    return "    " + "; ".join(parts)


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def _percent(value: Any) -> str:
    return "-" if value is None else f"{float(value) * 100:.0f} %"


# ---------------------------------------------------------------- the scenario


def run_scaleout(
    scenario: Scenario,
    names: Sequence[str],
    rounds: int,
    env: Environment,
    progress: Progress | None = None,
) -> list[RunResult]:
    """All rounds of a scale-out scenario; the phases' order alternates between rounds.

    Same signature as `greenpool.bench.runner.run_scenario`; `names` is
    ``("greenpool",)`` or empty.
    """
    phases = [phase.name for phase in scenario.phases]
    if progress is None:
        progress = Progress(len(names) * len(phases) * rounds)
    if not names:
        return []
    if not celery_installed():
        progress.skip(len(phases) * rounds)
        return []
    dsn = env.servers[POSTGRES].dsn
    from psycopg.conninfo import make_conninfo

    from ..testing.pgbouncer import PgBouncer

    run_tag = f"gp-scaleout-{secrets.token_hex(4)}"
    bouncer: PgBouncer | None = None
    try:
        bouncer = PgBouncer(
            dsn,
            default_pool_size=scenario.pool_size,
            max_client_conn=max(scenario.processes) * scenario.greenlets + 20,
            application_name=f"{run_tag}-pgbouncer",
        ).start()
        print(
            f"  PgBouncer {'.'.join(map(str, bouncer.version or ()))} on port {bouncer.port}:"
            f" pool_mode transaction, default_pool_size {scenario.pool_size}",
            flush=True,
        )
    except Exception as exc:  # noqa: BLE001 - the direct runs still run
        bouncer = None
        print(f"  pgbouncer runs: not run ({describe_error(exc)})", flush=True)
    broker = open_broker(env.celery_broker)
    print(f"  broker: {broker.describe()}", flush=True)
    results: list[RunResult] = []
    try:
        sender = TaskSender(broker)
        for round_no in range(1, rounds + 1):
            order = phases if round_no % 2 else phases[::-1]
            for phase in order:
                route, _ = route_of(phase)
                if route == "pgbouncer" and bouncer is None:
                    progress.skip(1)
                    continue
                progress.before(scenario.name, CONTENDER, phase, round_no, rounds)
                if route == "pgbouncer" and bouncer is not None:
                    tag = bouncer.application_name
                    client_dsn = make_conninfo(bouncer.dsn(dsn), application_name=tag)
                    result = run_once(scenario, phase, round_no, client_dsn, tag, env, broker, sender, bouncer.pid)
                else:
                    # A tag of its own: the previous run's backends may still be exiting.
                    tag = f"{run_tag}-{phase.replace(' ', '')}-{round_no}"
                    client_dsn = make_conninfo(dsn, application_name=tag)
                    result = run_once(scenario, phase, round_no, client_dsn, tag, env, broker, sender)
                results.append(result)
                print(result_line(result), flush=True)
                if result.ok:
                    print(extra_line(result), flush=True)
    finally:
        broker.close()
        if bouncer is not None:
            bouncer.close()
    return results


# ---------------------------------------------------------------- report


def _peak(runs: Sequence[RunResult]) -> int | None:
    peaks = [int(r.extra["server_peak"]) for r in runs if r.extra and r.extra.get("server_peak") is not None]
    return max(peaks) if peaks else None


def report_scaleout(
    scenario: Scenario,
    results: Sequence[RunResult],
    names: Sequence[str],
    skipped: dict[str, str] | None = None,
) -> str:
    """Table of a scale-out scenario: per route and process count, tasks/s against ``direct x1``, server
    connections and CPU; then whether the targets hold, and why not."""
    headers = [
        "route",
        "processes",
        "server conns",
        "tasks/s",
        f"vs {BASELINE}",
        "rounds",
        "p50 ms",
        "p99 ms",
        "CPU busy",
        "workers",
        "pgbouncer",
        "server",
        "other",
        "load",
        "",
    ]
    rows: list[list[str]] = []
    summaries: list[Summary] = []
    for phase in scenario.phases:
        route, processes = route_of(phase.name)
        s = summarize(results, CONTENDER, phase.name)
        if s.rounds == 0:
            rows.append([route, str(processes), "not run"])
            continue
        summaries.append(s)
        runs = good_runs(results, CONTENDER, phase.name)
        if not runs:
            rows.append([route, str(processes), f"ERROR {s.errors[0] if s.errors else ''}"])
            continue
        ratios = paired_ratios(results, CONTENDER, phase.name, CONTENDER, BASELINE, _qps_ratio)
        cap = runs[0].extra["server_cap"] if runs[0].extra else "?"
        rows.append(
            [
                route,
                str(processes),
                f"{_peak(runs)} / {cap}",
                _fmt(s.qps, ".0f"),
                _fmt(median_ratio(ratios), ".2f", "x"),
                ratio_range(ratios) if phase.name != BASELINE else "-",
                _fmt(s.p50_ms, ".2f"),
                _fmt(s.p99_ms, ".2f"),
                _percent(median_extra(runs, "cpu_busy")),
                _fmt(median_extra(runs, "workers_cores"), ".2f"),
                _fmt(median_extra(runs, "pgbouncer_cores"), ".2f"),
                _fmt(median_extra(runs, "server_cores"), ".2f"),
                _fmt(median_extra(runs, "other_cores"), ".2f"),
                _fmt(median_extra(runs, "load1"), ".1f"),
                "" if s.rounds_ok == s.rounds else f"{s.rounds_ok}/{s.rounds} rounds ok",
            ]
        )
    lines = [_table(headers, rows, left=(0, 14))]
    lines += verdict(scenario, results)
    lines.append(
        "server conns: the most connections of the run pg_stat_activity showed (sampled every"
        f" {SAMPLE_INTERVAL * 1000:g} ms) / what the route allows (direct: processes x P; PgBouncer:"
        " default_pool_size)"
    )
    lines.append(
        f"CPU busy: share of the machine's {os.cpu_count()} CPUs busy in the steady state; workers, pgbouncer,"
        " server (the run's backends, when the server is local), other (the rest of the machine): cores used;"
        " load: 1-minute load average at the start of the steady state"
    )
    lines.append(PAIRED_LEGEND)
    lines += _error_lines(summaries)
    return "\n".join(lines)


def verdict(scenario: Scenario, results: Sequence[RunResult]) -> list[str]:
    """Whether the targets hold: PgBouncer caps the server's connections, and keeps the throughput."""
    lines = []
    bouncer_runs = [r for r in results if r.ok and r.extra and r.extra.get("route") == "pgbouncer"]
    if not bouncer_runs:
        return ["targets: unknown (no PgBouncer run)"]
    peak = _peak(bouncer_runs)
    held = peak is not None and peak <= scenario.pool_size
    lines.append(
        f"target: through PgBouncer the server saw at most {peak} connections"
        f" (default_pool_size {scenario.pool_size}): {'met' if held else 'NOT met'}"
    )
    most = f"pgbouncer x{max(scenario.processes)}"
    ratio = median_ratio(paired_ratios(results, CONTENDER, most, CONTENDER, BASELINE, _qps_ratio))
    if math.isnan(ratio):
        lines.append(f"target: {most} >= {TARGET_RATIO:g} x {BASELINE}: unknown (no paired rounds)")
        return lines
    met = "met" if ratio >= TARGET_RATIO else "NOT met"
    text = f"target: {most} / {BASELINE} = {ratio:.2f} (>= {TARGET_RATIO:g}): {met}"
    runs = good_runs(results, CONTENDER, most)
    busy = median_extra(runs, "cpu_busy")
    if ratio < TARGET_RATIO and not math.isnan(busy) and busy >= CPU_BOUND:
        where = ", ".join(
            f"{key} {median_extra(runs, f'{key}_cores'):.2f}"
            for key in ("workers", "pgbouncer", "server", "other")
            if not math.isnan(median_extra(runs, f"{key}_cores"))
        )
        text += f"; the machine's {os.cpu_count()} CPUs were {busy * 100:.0f} % busy ({where} cores): CPU-bound"
    lines.append(text)
    return lines


def overview_rows(scenario: Scenario, results: Sequence[RunResult], names: Sequence[str]) -> list[OverviewRow]:
    """The closing table's rows of a scale-out scenario: each route and process count against ``direct x1``."""
    rows = []
    for phase in scenario.phases:
        s = summarize(results, CONTENDER, phase.name)
        if s.rounds == 0:
            continue
        ratio = median_ratio(paired_ratios(results, CONTENDER, phase.name, CONTENDER, BASELINE, _qps_ratio))
        rows.append(
            OverviewRow(
                scenario.name, CONTENDER, phase.name, s.qps, s.p50_ms, s.p99_ms, ratio, BASELINE, s.rounds_ok, s.rounds
            )
        )
    return rows


__all__ = [
    "BASELINE",
    "SAMPLE_INTERVAL",
    "SCALEOUT_ROUTES",
    "TARGET_RATIO",
    "extra_line",
    "overview_rows",
    "report_scaleout",
    "route_of",
    "run_once",
    "run_scaleout",
    "verdict",
]

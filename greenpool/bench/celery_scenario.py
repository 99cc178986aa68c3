"""The ``celery`` scenario: each contender in a real Celery worker (``-P gevent``), light and pool-bound tasks.

What greenpool is for, measured the way it runs: a worker process started
with ``python -m celery ... worker -P gevent -c G`` on the Celery app
`greenpool.bench.celery_worker`, whose tasks borrow one connection from
the contender's pool of P and run their queries on it
(`greenpool.bench.scenarios.CELERY_SETTINGS`):

- ``light``: 3 x 2 ms queries per task; the pool has room to spare, Celery
  itself (receiving, scheduling, acknowledging tasks) is the ceiling. The
  same worker with no database (`CEILING`, tasks with no query) measures
  that ceiling for the broker in use, in every round.
- ``pool-bound``: 3 x 20 ms queries per task through P connections: the
  capacity is P / (3 x 20 ms) tasks/s (~166 for P = 10), and with G tasks
  in the worker at once a task takes G / throughput by Little's law.

Each run is one worker for one contender and one kind of task. Before it
starts, the parent sends G + N tasks (3 N light ones) to a queue of the
run's own, so sending is not part of the measure; the worker opens its pool full at start, works
through the queue, and appends each task's times to a file
(`greenpool.bench.celery_worker`). The figures cover the steady state:
from the moment the first G tasks are done (warm-up) to the moment only G
are left (drain). Throughput is the tasks done in it over its length; a
task's latency runs from its start in the worker to its end (queueing in
the broker left out: the backlog was sent up front), for the tasks run
wholly in it. A run still going `duration` seconds after its warm-up is
cut there (one shared connection does ~16 pool-bound tasks/s): its figures
cover the steady state up to the cut.

The broker is ``--broker`` (or ``$CELERY_BROKER_URL``), else a throw-away
filesystem broker (kombu's ``filesystem://`` transport) in a temporary
folder, so that the scenario runs where no broker server is. That transport
lists its folder for every message it takes, a cost in the worker that
grows with the backlog: the ceiling row shows what is left for the tasks,
and figures worth keeping are taken with Redis (docs/benchmarks.md).

The workers, the sender, the results files, the wait and the steady state
serve the ``scaleout`` scenario too (`greenpool.bench.scaleout`).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gevent

from .backends import CONNECT_KWARGS, POSTGRES
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
from .runner import POOL_TIMEOUT, Environment, Progress, RunResult, _record_latencies
from .scenarios import CELERY_SETTINGS, Scenario, TaskSetting

#: The environment variable holding a worker's configuration (JSON; see `greenpool.bench.celery_worker`).
CONFIG_VARIABLE = "GREENPOOL_BENCH_CELERY"
#: The task's name, as the scenario sends it.
TASK_NAME = "greenpool.bench.run"
#: The worker configuration's `contender` for tasks that touch no database.
NO_DATABASE = "none"
#: The row of a worker whose tasks run no query: Celery's and the broker's own ceiling.
CEILING = "no database"
#: Pool-bound tasks/s over the capacity P / (queries x query time) that greenpool should reach.
CAPACITY_TARGET = 0.95
#: Most pool-bound task p99 over Little's law's G / throughput that greenpool should show.
P99_TARGET = 1.2
#: In light runs, a greenpool contender over another in the same round at or above which
#: "no contender is faster" holds (the rounds of one run differ by a few percent).
LIGHT_TOLERANCE = 0.97
#: The contenders the targets are about, each with those it must not be slower than in light
#: runs: the others with the same API (psycopg's, Peewee's), as a user would switch between them.
RIVALS = {"greenpool": ("psycopg_pool", "shared"), "peewee-greenpool": ("peewee-playhouse",)}
#: Seconds between two polls of the filesystem broker's folder (kombu's default is 1 s).
FILESYSTEM_POLL = 0.005
#: Seconds between two reads of the results file.
RESULTS_POLL = 0.05
#: Queries timed on an idle connection to measure each kind of task's query time.
QUERY_SAMPLES = 20
#: Seconds a worker gets to exit on SIGTERM before it is killed.
STOP_TIMEOUT = 10.0

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------- broker


@dataclass
class Broker:
    """The broker the workers and the sender use."""

    url: str
    #: Where the URL came from (for the report).
    source: str
    transport_options: dict[str, Any] = field(default_factory=dict)
    #: The filesystem broker's folder, removed by `close()`.
    folder: str | None = None

    def describe(self) -> str:
        """One line: which broker, from where."""
        if self.folder:
            return f"filesystem:// in {self.folder} ({self.source})"
        from kombu.utils.url import maybe_sanitize_url

        return f"{maybe_sanitize_url(self.url)} ({self.source})"

    def close(self) -> None:
        """Remove the filesystem broker's folder, if any."""
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)


def open_broker(url: str | None) -> Broker:
    """The broker `url` names, else ``$CELERY_BROKER_URL``'s, else a throw-away filesystem broker."""
    if url:
        return Broker(url, "--broker")
    if os.environ.get("CELERY_BROKER_URL"):
        return Broker(os.environ["CELERY_BROKER_URL"], "$CELERY_BROKER_URL")
    folder = tempfile.mkdtemp(prefix="greenpool-bench-broker-")
    options = {
        "data_folder_in": folder,
        "data_folder_out": folder,
        # Exchange bindings; kombu's default is ./control, in the working directory.
        "control_folder": os.path.join(folder, "control"),
        "polling_interval": FILESYSTEM_POLL,
    }
    return Broker("filesystem://", "no --broker: kombu's filesystem transport", options, folder)


class TaskSender:
    """Sends the runs' tasks through a Celery app of its own; deletes a run's queue afterwards."""

    def __init__(self, broker: Broker) -> None:
        from celery import Celery

        self.app = Celery("greenpool-bench-sender", broker=broker.url, set_as_current=False)
        self.app.conf.broker_transport_options = broker.transport_options

    def _queue(self, name: str) -> Any:
        from kombu.entity import Exchange, Queue

        # Celery's own binding of a queue named in send_task(queue=...).
        return Queue(name, Exchange(name, type="direct"), routing_key=name)  # type: ignore[no-untyped-call]

    def send(self, queue: str, sql: str, queries: int, count: int) -> None:
        """Declare `queue` and send it `count` tasks of `queries` x `sql`."""
        with self.app.connection_for_write() as conn:
            self._queue(queue)(conn.default_channel).declare()
            with self.app.producer_or_acquire() as producer:
                for _ in range(count):
                    self.app.send_task(TASK_NAME, args=(sql, queries), queue=queue, producer=producer)

    def delete(self, queue: str) -> None:
        """Delete `queue` with what is left in it (a cut run's tasks); never raises."""
        try:
            with self.app.connection_for_write() as conn:
                bound = self._queue(queue)(conn.default_channel)
                # kombu deletes only the bindings this connection knows: declare, then delete.
                bound.declare()
                bound.delete()
        except Exception:  # noqa: BLE001 - a leftover queue costs nothing here
            pass


# ---------------------------------------------------------------- one worker


class ResultsFile:
    """The lines a worker appends to its results file, read as they come: (start, acquired, released, end) each."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.times: list[tuple[float, ...]] = []
        self._offset = 0
        self._partial = b""

    def read(self) -> None:
        """Take in the complete lines written since the last read."""
        try:
            with open(self.path, "rb") as file:
                file.seek(self._offset)
                data = file.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        self.times += [tuple(float(t) for t in line.split()) for line in lines]


def process_cpu_seconds(pid: int | None) -> float | None:
    """CPU seconds (user + system) process `pid` used so far, from /proc; None if unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CeleryWorker:
    """A Celery worker process on the benchmark's app, with its output in a temporary file."""

    def __init__(self, config: dict[str, Any], concurrency: int) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH", "")) if p)
        env[CONFIG_VARIABLE] = json.dumps(config)
        self.output = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "greenpool.bench.celery_worker",
                "worker",
                "-P",
                "gevent",
                "-c",
                str(concurrency),
                "-Q",
                config["queue"],
                "-n",
                f"{config['queue']}@%h",
                "-l",
                "warning",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.output,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def check_alive(self) -> None:
        """`RuntimeError`, with the end of its output, if the worker has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"the worker exited ({self.proc.returncode}){self._tail()}")

    def cpu_seconds(self) -> float | None:
        """CPU seconds (user + system) the worker used so far; None if unknown."""
        return process_cpu_seconds(self.proc.pid)

    def _tail(self) -> str:
        try:
            self.output.seek(0)
            lines = self.output.read().decode("utf-8", "replace").strip().splitlines()
        except (OSError, ValueError):
            return ""
        # Celery's banner and its warning about running as root say nothing about the failure.
        return ("\n" + "\n".join(lines[-15:])) if lines else ""

    def stop(self, cold: bool) -> None:
        """SIGTERM (warm shutdown), or SIGQUIT (cold: a cut run's backlog is not worth waiting for); then kill."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT if cold else signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.output.close()


@dataclass
class Waited:
    """How a wait for a run's tasks ended: when it was cut (None: every task done), and two snapshots."""

    cut_at: float | None = None
    #: `snapshot()` when the warm-up tasks were seen done, and at the end; the seconds between them.
    first: Any = None
    last: Any = None
    seconds: float | None = None


def wait_for_tasks(
    workers: Sequence[CeleryWorker],
    results: Sequence[ResultsFile],
    total: int,
    warm: int,
    cap: float,
    deadline: float,
    snapshot: Callable[[], Any],
) -> Waited:
    """Wait until the workers have done `total` tasks, or `cap` seconds after their first `warm` (then cut).

    `snapshot()` (CPU counters, say) is taken once the `warm` tasks are
    seen done and again at the end. `RuntimeError` if a worker exits, or
    at `deadline` (monotonic).
    """
    waited = Waited()
    steady_since = None
    while True:
        gevent.sleep(RESULTS_POLL)
        for file in results:
            file.read()
        done = sum(len(file.times) for file in results)
        now = time.monotonic()
        if done >= warm and steady_since is None:
            steady_since, waited.first = now, snapshot()
        if done >= total or (steady_since is not None and now - steady_since >= cap):
            waited.last = snapshot()
            waited.cut_at = now if done < total else None
            waited.seconds = now - steady_since if steady_since is not None else None
            return waited
        for worker in workers:
            worker.check_alive()
        if now > deadline:
            raise RuntimeError(f"{done} of {total} tasks done when the run's time was up (--timeout)")


@dataclass
class SteadyState:
    """A run's steady state: from `begin` to `end` (monotonic seconds), the tasks run wholly in it."""

    begin: float
    end: float
    #: (start, acquired, released, end) of the tasks that started and ended in it.
    tasks: list[tuple[float, ...]]
    #: Tasks that ended in it (started in it or not): its throughput's count.
    done: int

    @property
    def seconds(self) -> float:
        """Its length."""
        return self.end - self.begin


def steady_state(times: Sequence[tuple[float, ...]], warm: int, cut_at: float | None) -> SteadyState:
    """The steady state of tasks' (start, acquired, released, end) `times`.

    It starts when the first `warm` tasks are done (warm-up: the workers
    were starting, their pools opening) and ends when only `warm` are left
    (drain: fewer than that running), or at `cut_at`. `RuntimeError` if no
    more than `warm` tasks were done.
    """
    ends = sorted(t[3] for t in times)
    if len(ends) <= warm:
        raise RuntimeError(f"only {len(ends)} tasks done in the time allowed (warm-up: {warm})")
    begin = ends[warm - 1]
    end = cut_at if cut_at is not None else ends[len(ends) - warm - 1]
    return SteadyState(
        begin,
        end,
        [t for t in times if t[0] >= begin and t[3] <= end],
        sum(begin < e <= end for e in ends),
    )


def worker_config(
    broker: Broker, queue: str, contender: str, dsn: str, pool_size: int, kwargs: dict[str, Any], results: str
) -> dict[str, Any]:
    """The configuration of a worker on `greenpool.bench.celery_worker` (see there)."""
    return {
        "broker": broker.url,
        "transport_options": broker.transport_options,
        "queue": queue,
        "contender": contender,
        "dsn": dsn,
        "pool_size": pool_size,
        "kwargs": kwargs,
        "timeout": POOL_TIMEOUT,
        "results": results,
    }


def run_once(
    scenario: Scenario,
    setting: TaskSetting,
    name: str,
    round_no: int,
    env: Environment,
    broker: Broker,
    sender: TaskSender,
) -> RunResult:
    """One worker for contender `name` (or `CEILING`) running `setting`'s tasks; never raises (but Ctrl-C)."""
    assert scenario.tasks is not None
    concurrency, total = scenario.greenlets, scenario.greenlets + scenario.tasks * setting.tasks_scale
    queries = 0 if name == CEILING else setting.queries
    result = RunResult(scenario.name, setting.name, name, round_no)
    queue = f"greenpool-bench-{secrets.token_hex(4)}"
    folder = tempfile.mkdtemp(prefix="greenpool-bench-celery-")
    contender = NO_DATABASE if name == CEILING else name
    results = ResultsFile(os.path.join(folder, "results"))
    config = worker_config(
        broker, queue, contender, env.servers[POSTGRES].dsn, scenario.pool_size, dict(CONNECT_KWARGS), results.path
    )
    worker: CeleryWorker | None = None
    waited = Waited()
    try:
        sender.send(queue, setting.sql, queries, total)
        deadline = time.monotonic() + env.run_timeout + (scenario.duration or 0.0)
        worker = CeleryWorker(config, concurrency)
        waited = wait_for_tasks(
            [worker], [results], total, concurrency, scenario.duration or math.inf, deadline, worker.cpu_seconds
        )
        _record_run(result, results.times, scenario, setting, queries, waited)
    except Exception as exc:  # noqa: BLE001 - a failing run must not stop the others
        result.error = describe_error(exc)
        result.traceback = traceback.format_exc()
        return result
    finally:
        if worker is not None:
            worker.stop(cold=waited.cut_at is not None or result.error is not None)
        sender.delete(queue)
        shutil.rmtree(folder, ignore_errors=True)
    result.extra["broker"] = broker.describe()  # type: ignore[index]
    result.ok = True
    return result


def _record_run(
    result: RunResult,
    times: Sequence[tuple[float, ...]],
    scenario: Scenario,
    setting: TaskSetting,
    queries: int,
    waited: Waited,
) -> None:
    """Fill `result` from the tasks' (start, acquired, released, end) times, over the run's `steady_state`."""
    G, P = scenario.greenlets, scenario.pool_size
    steady = steady_state(times, G, waited.cut_at)
    begin, end = steady.begin, steady.end
    result.seconds = steady.seconds
    _record_latencies(result, [t[3] - t[0] for t in steady.tasks])
    # Throughput: every task done in the steady state, not only those started in it.
    result.queries = steady.done
    result.qps = steady.done / steady.seconds
    lent = sum(max(0.0, min(t[2], end) - max(t[1], begin)) for t in times)
    cpu = (waited.first, waited.last)
    result.extra = {
        "concurrency": G,
        "pool_size": P,
        "queries_per_task": queries,
        "tasks_done": len(times),
        "cut": waited.cut_at is not None,
        "hold_ms": statistics.fmean(t[2] - t[1] for t in steady.tasks) * 1000 if queries and steady.tasks else None,
        # Share of the P connections' time lent to tasks in the steady state.
        "busy": lent / (P * steady.seconds) if queries else None,
        "capacity": P / (setting.queries * setting.query_seconds),
        # Little's law: G tasks in the worker at once, each taking G / throughput.
        "ideal_ms": G / result.qps * 1000 if result.qps > 0 else None,
        "worker_cores": (cpu[1] - cpu[0]) / waited.seconds if None not in cpu and waited.seconds else None,
    }


def measure_query_ms(env: Environment) -> dict[str, float]:
    """Each kind of task's query, timed `QUERY_SAMPLES` times on an idle connection: name -> median ms."""
    times: dict[str, float] = {}
    with env.connection_class.connect(env.servers[POSTGRES].dsn, **CONNECT_KWARGS) as conn:
        for setting in CELERY_SETTINGS:
            samples = []
            for _ in range(QUERY_SAMPLES):
                started = time.perf_counter()
                conn.execute(setting.sql).fetchall()
                samples.append(time.perf_counter() - started)
            times[setting.name] = statistics.median(samples) * 1000
    return times


def celery_installed() -> bool:
    """Whether Celery can be imported; if not, print a line saying how to install it."""
    try:
        import celery  # noqa: F401 - only to know it is there
    except ImportError:
        print("  not run: Celery is not installed (pip install 'greenpool[celery]')", flush=True)
        return False
    return True


def run_celery(
    scenario: Scenario,
    names: Sequence[str],
    rounds: int,
    env: Environment,
    progress: Progress | None = None,
) -> list[RunResult]:
    """All rounds of a Celery scenario: per round, the ceiling and each contender in each kind of task.

    Same signature as `greenpool.bench.runner.run_scenario`. Contenders
    rotate between rounds and the kinds of task alternate. Without Celery
    installed, nothing runs (one line says how to install it).
    """
    runs_per_round = len(names) * len(CELERY_SETTINGS) + 1  # + the ceiling
    if progress is None:
        progress = Progress(runs_per_round * rounds)
    if not names:
        return []
    if not celery_installed():
        progress.skip(runs_per_round * rounds)
        return []
    broker = open_broker(env.celery_broker)
    print(f"  broker: {broker.describe()}", flush=True)
    results: list[RunResult] = []
    try:
        sender = TaskSender(broker)
        query_ms = measure_query_ms(env)
        print(
            "  query time on an idle connection: "
            + ", ".join(f"{s.name} {query_ms[s.name]:.2f} ms (`{s.sql}`)" for s in CELERY_SETTINGS),
            flush=True,
        )
        light = CELERY_SETTINGS[0]
        for round_no in range(1, rounds + 1):
            shift = (round_no - 1) % len(names)
            order = [*names[shift:], *names[:shift]]
            settings = CELERY_SETTINGS if round_no % 2 else CELERY_SETTINGS[::-1]
            plan = [(CEILING, light), *((name, setting) for name in order for setting in settings)]
            for name, setting in plan:
                progress.before(scenario.name, name, setting.name, round_no, rounds)
                result = run_once(scenario, setting, name, round_no, env, broker, sender)
                if result.extra is not None:
                    result.extra["query_ms"] = query_ms[setting.name]
                results.append(result)
                print(result_line(result), flush=True)
    finally:
        broker.close()
    return results


def result_line(result: RunResult) -> str:
    """A run's figures, or its failure, on one indented line."""
    if not result.ok or result.extra is None:
        from .runner import result_line as generic

        return generic(result)
    extra = result.extra
    parts = [
        f"{result.qps:.1f} tasks/s",
        f"task p50 {result.p50_ms:.0f} ms, p99 {result.p99_ms:.0f} ms",
        f"{result.queries} tasks in {result.seconds:.2f} s" + (" (cut)" if extra.get("cut") else ""),
    ]
    if extra.get("busy") is not None:
        parts.append(f"connections busy {extra['busy'] * 100:.0f} %, held {extra['hold_ms']:.1f} ms a task")
    if extra.get("worker_cores") is not None:
        parts.append(f"worker CPU {extra['worker_cores']:.2f} cores")
    return "    " + "; ".join(parts)


# ---------------------------------------------------------------- report


def _p99_over_ideal(runs: Sequence[RunResult]) -> float:
    """Median over `runs` of task p99 over Little's law's ideal."""
    values = [r.p99_ms / r.extra["ideal_ms"] for r in runs if r.extra and r.extra.get("ideal_ms")]
    return statistics.median(values) if values else math.nan


def _capacity_ratio(run: RunResult, _: RunResult) -> float:
    capacity = (run.extra or {}).get("capacity")
    return run.qps / capacity if capacity else math.nan


def _ratios(results: Sequence[RunResult], name: str, phase: str) -> tuple[list[float], str]:
    """Per-round ratios of `name` in `phase` to its bound, and the bound's name."""
    if phase == CELERY_SETTINGS[0].name:
        return paired_ratios(results, name, phase, CEILING, phase, _qps_ratio), CEILING
    return paired_ratios(results, name, phase, name, phase, _capacity_ratio), "capacity"


def report_celery(
    scenario: Scenario,
    results: Sequence[RunResult],
    names: Sequence[str],
    skipped: dict[str, str] | None = None,
) -> str:
    """Table of a Celery scenario per kind of task and contender, then whether the targets hold."""
    headers = [
        "tasks",
        "contender",
        "tasks/s",
        "ratio",
        "rounds",
        "p50 ms",
        "p99 ms",
        "p99/ideal",
        "held ms",
        "busy",
        "worker CPU",
        "",
    ]
    rows: list[list[str]] = []
    summaries: list[Summary] = []
    for setting in CELERY_SETTINGS:
        contenders = [*([CEILING] if setting is CELERY_SETTINGS[0] else []), *names]
        for name in contenders:
            s = summarize(results, name, setting.name)
            if s.rounds == 0:
                continue
            summaries.append(s)
            runs = good_runs(results, name, setting.name)
            if not runs:
                rows.append([setting.name, name, f"ERROR {s.errors[0] if s.errors else ''}"])
                continue
            ratios, _ = _ratios(results, name, setting.name) if name != CEILING else ([], "")
            cut = sum(bool(r.extra and r.extra.get("cut")) for r in runs)
            notes = [f"{s.rounds_ok}/{s.rounds} rounds ok"] if s.rounds_ok != s.rounds else []
            notes += [f"cut at {scenario.duration:g} s in {cut}/{len(runs)} rounds"] if cut else []
            rows.append(
                [
                    setting.name,
                    name,
                    _fmt(s.qps, ".1f"),
                    _fmt(median_ratio(ratios), ".2f", "x") if ratios else "-",
                    ratio_range(ratios),
                    _fmt(s.p50_ms, ".0f"),
                    _fmt(s.p99_ms, ".0f"),
                    _fmt(_p99_over_ideal(runs), ".2f", "x") if name != CEILING else "-",
                    _fmt(median_extra(runs, "hold_ms"), ".1f"),
                    _fmt(median_extra(runs, "busy") * 100, ".0f", " %"),
                    _fmt(median_extra(runs, "worker_cores"), ".2f"),
                    ", ".join(notes),
                ]
            )
    lines = [_table(headers, rows, left=(0, 1, 11))]
    lines += verdict(scenario, results, names)
    capacity = scenario.pool_size / (CELERY_SETTINGS[1].queries * CELERY_SETTINGS[1].query_seconds)
    lines += [
        f"ratio: light: tasks/s over the {CEILING!r} worker's (tasks with no query: Celery's and the broker's"
        f" ceiling) in the same round; pool-bound: tasks/s over the capacity P / (queries x query time)"
        f" = {capacity:.1f} tasks/s",
        f"p99/ideal: task p99 over Little's law's G / throughput (G = {scenario.greenlets} tasks in the worker);"
        " a task's time runs from its start in the worker to its end",
        "held ms: how long a task held its connection; busy: share of the P connections' time lent to tasks;"
        " worker CPU: cores the worker process used (one process: at most 1.00)",
        PAIRED_LEGEND,
    ]
    lines += _error_lines(summaries)
    return "\n".join(lines)


def verdict(scenario: Scenario, results: Sequence[RunResult], names: Sequence[str]) -> list[str]:
    """Whether the targets hold for greenpool's contenders, and where the rest goes when not."""
    light, bound = CELERY_SETTINGS
    lines = []
    for name in (n for n in RIVALS if n in names):
        runs = good_runs(results, name, bound.name)
        ratio = median_ratio(_ratios(results, name, bound.name)[0])
        if runs and not math.isnan(ratio):
            p99 = _p99_over_ideal(runs)
            met = ratio >= CAPACITY_TARGET and p99 <= P99_TARGET
            text = (
                f"target: {name} pool-bound >= {CAPACITY_TARGET:g} x capacity with p99 <= {P99_TARGET:g} x ideal:"
                f" {ratio:.2f}x, p99 {p99:.2f}x: {'met' if met else 'NOT met'}"
            )
            if not met:
                query_ms, held = median_extra(runs, "query_ms"), median_extra(runs, "hold_ms")
                busy = median_extra(runs, "busy")
                queries_ms = bound.queries * query_ms
                # The server's own pace: the capacity at the query time measured on an idle connection.
                measured = statistics.median(r.qps for r in runs) / (scenario.pool_size / queries_ms * 1000)
                text += (
                    f"; where the rest goes: a query takes {query_ms:.2f} ms on an idle connection, not"
                    f" {bound.query_seconds * 1000:g} ({bound.query_seconds * 1000 * bound.queries / queries_ms:.2f}x"
                    f" capacity at most; {measured:.2f}x of that reached); a task held its connection {held:.1f} ms"
                    f" for {queries_ms:.1f} ms of queries (the woken task waiting for the worker's busy event loop:"
                    f" {held / queries_ms:.3f}x); connections busy {busy * 100:.1f} % of the time"
                )
            lines.append(text)
        pairs = {
            other: median_ratio(paired_ratios(results, name, light.name, other, light.name, _qps_ratio))
            for other in RIVALS[name]
            if other in names
        }
        pairs = {k: v for k, v in pairs.items() if not math.isnan(v)}
        if pairs:
            slowest = min(pairs, key=lambda k: pairs[k])
            met = pairs[slowest] >= LIGHT_TOLERANCE
            lines.append(
                f"target: {name} light: no contender with its API faster"
                f" (>= {LIGHT_TOLERANCE:g}x each in the same round): lowest {pairs[slowest]:.2f}x,"
                f" vs {slowest}: {'met' if met else 'NOT met'}"
            )
    return lines


def overview_rows(scenario: Scenario, results: Sequence[RunResult], names: Sequence[str]) -> list[OverviewRow]:
    """The closing table's rows: each contender and kind of task against its bound (ceiling or capacity)."""
    rows = []
    for setting in CELERY_SETTINGS:
        for name in names:
            s = summarize(results, name, setting.name)
            if s.rounds == 0:
                continue
            ratios, bound = _ratios(results, name, setting.name)
            rows.append(
                OverviewRow(
                    scenario.name,
                    name,
                    setting.name,
                    s.qps,
                    s.p50_ms,
                    s.p99_ms,
                    median_ratio(ratios),
                    bound,
                    s.rounds_ok,
                    s.rounds,
                )
            )
    return rows


__all__ = [
    "CAPACITY_TARGET",
    "CEILING",
    "P99_TARGET",
    "Broker",
    "measure_query_ms",
    "open_broker",
    "overview_rows",
    "report_celery",
    "run_celery",
    "run_once",
    "verdict",
]

"""The Celery integration, with real worker processes, real brokers and PostgreSQL.

Each test starts `celery -A celery_worker_app worker` as a subprocess on a
queue of its own (Redis or RabbitMQ as the broker, Redis for results) and
sends it tasks from this process. Servers: ``GREENPOOL_TEST_DSN`` (see
conftest), ``GREENPOOL_TEST_REDIS`` (default ``redis://127.0.0.1:6379/0``),
``GREENPOOL_TEST_AMQP`` (default ``amqp://guest:guest@127.0.0.1:5672//``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import REPO_ROOT, skip_or_fail, tcp_reachable
from helpers import unique, wait_until

celery = pytest.importorskip("celery")

HERE = Path(__file__).resolve().parent
REDIS = os.environ.get("GREENPOOL_TEST_REDIS", "redis://127.0.0.1:6379/0")
AMQP = os.environ.get("GREENPOOL_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
#: A worker not ready this long after its start failed to start.
START_TIMEOUT = 60.0


def _require(url: str, what: str, variable: str) -> None:
    parts = urlsplit(url)
    error = tcp_reachable(parts.hostname or "127.0.0.1", parts.port or (6379 if parts.scheme == "redis" else 5672))
    if error is not None:
        skip_or_fail(f"needs {what} at {url}: set {variable} ({error})")


class Worker:
    """A `celery worker` subprocess of `celery_worker_app`, and a client app to send it tasks."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args = args
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: Any = None

    def start(self, wait: bool = True) -> Worker:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "celery_worker_app", "worker", *self.args],
                env=self.env,
                cwd=str(HERE),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if wait:
            self.wait_ready()
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while "ready." not in self.output():
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"the worker exited ({self.proc.returncode}):\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the worker wasn't ready after {START_TIMEOUT} s:\n{self.output()[-4000:]}")
            time.sleep(0.1)

    def task(self, name: str) -> Any:
        return self.client.signature(f"celery_worker_app.{name}", queue=self.env["GP_QUEUE"])

    def run(self, name: str, *args: Any, timeout: float = 60, **options: Any) -> Any:
        return self.task(name).apply_async(args, **options).get(timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"the worker ignored signal {sig} for {timeout} s:\n{self.output()[-4000:]}")
        return self.proc.returncode


@pytest.fixture
def start_worker(pg_dsn: str, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """`start_worker(*args, broker=REDIS, wait=True, **env)`: a worker of its own queue."""
    workers: list[Worker] = []

    def start(*args: str, broker: str = REDIS, wait: bool = True, **extra_env: str) -> Worker:
        _require(REDIS, "Redis", "GREENPOOL_TEST_REDIS")
        if broker != REDIS:
            _require(broker, "RabbitMQ", "GREENPOOL_TEST_AMQP")
        tag = uuid.uuid4().hex[:10]
        env = dict(os.environ)
        env.update(
            GREENPOOL_TEST_DSN=pg_dsn,
            CELERY_BROKER_URL=broker,
            CELERY_RESULT_BACKEND=REDIS,
            GP_QUEUE=f"gp_{tag}",
            GP_APP_NAME=f"gp_celery_{tag}",
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p),
        )
        env.pop(  # a re-executed parent's marker must not reach a fresh worker
            "GREENPOOL_CELERY_REEXECUTED", None
        )
        env.update(extra_env)
        worker = Worker(
            [
                *args,
                "--loglevel=INFO",
                "-n",
                f"gp_{tag}@%h",
                "--without-heartbeat",
                "--without-mingle",
                "--without-gossip",
            ],
            env,
            tmp_path / f"worker_{tag}.log",
        )
        client = celery.Celery("gp_celery_test_client", broker=broker, backend=REDIS)
        worker.client = client
        workers.append(worker)
        return worker.start(wait=wait)

    yield start
    for worker in workers:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.stop()
        worker.client.close()


def server_connections(monitor: Any, app_name: str) -> int:
    row = monitor.execute("select count(*) from pg_stat_activity where application_name = %s", [app_name]).fetchone()
    return int(row[0])


class PeakConnections:
    """Samples the server's connections of `app_name` in a thread, keeping the most seen."""

    def __init__(self, dsn: str, app_name: str) -> None:
        import psycopg

        self.conn = psycopg.connect(dsn, autocommit=True)
        self.app_name = app_name
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, server_connections(self.conn, self.app_name))
            time.sleep(0.02)

    def __enter__(self) -> PeakConnections:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.conn.close()


def fifty_holds(worker: Worker, pg_dsn: str) -> tuple[float, int]:
    """50 tasks each holding a connection for 0.2 s: (seconds for all, the server's peak connections)."""
    with PeakConnections(pg_dsn, worker.env["GP_APP_NAME"]) as peak:
        start = time.monotonic()
        results = [worker.task("hold").delay(0.2) for _ in range(50)]
        for result in results:
            result.get(timeout=60)
        elapsed = time.monotonic() - start
    return elapsed, peak.peak


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_gevent_worker_runs_tasks_concurrently_within_the_pool(
    start_worker: Callable[..., Worker], pg_dsn: str, broker: str
) -> None:
    """-P gevent -c 50, a pool of 10: 50 holds of 0.2 s take about 5 x 0.2 s, not 50 x 0.2 s."""
    worker = start_worker("-P", "gevent", "-c", "50", broker=REDIS if broker == "redis" else AMQP)
    elapsed, peak = fifty_holds(worker, pg_dsn)
    assert elapsed < 5.0, f"50 x 0.2 s through 10 connections took {elapsed:.1f} s: serialized"
    assert peak <= 10
    state = worker.run("pool_state")
    assert (state["task_pool"], state["concurrency"], state["patched"]) == ("gevent", 50, True)


def test_worker_pool_gevent_in_the_configuration_runs_patched(start_worker: Callable[..., Worker], pg_dsn: str) -> None:
    """`worker_pool = "gevent"` and no -P: greenpool re-executes the worker with --pool=gevent."""
    worker = start_worker("-c", "50", GP_CONFIG_POOL="gevent")
    elapsed, peak = fifty_holds(worker, pg_dsn)
    assert elapsed < 5.0, f"50 x 0.2 s through 10 connections took {elapsed:.1f} s: serialized"
    assert peak <= 10
    state = worker.run("pool_state")
    assert (state["task_pool"], state["patched"]) == ("gevent", True)
    assert "running the worker again with --pool=gevent" in worker.output()
    assert worker.stop() == 0  # and SIGTERM ends it


def test_worker_main_with_worker_pool_gevent_stops_with_the_fix(run_python: Callable[..., Any]) -> None:
    """An embedding program's `app.worker_main()` can't be re-executed: it stops, saying what to do."""
    _require(REDIS, "Redis", "GREENPOOL_TEST_REDIS")
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "import celery_worker_app as m\n"
        "m.app.worker_main(['worker', '-c', '5', '--loglevel=WARNING'])\n"
    )
    result = run_python(
        code,
        env={
            "CELERY_BROKER_URL": REDIS,
            "CELERY_RESULT_BACKEND": REDIS,
            "GP_QUEUE": f"gp_{uuid.uuid4().hex[:10]}",
            "GP_CONFIG_POOL": "gevent",
        },
    )
    assert result.returncode != 0
    assert "not monkey-patched by gevent" in result.stderr + result.stdout
    assert "-P gevent" in result.stderr + result.stdout


def test_time_limit_and_revoke_leave_every_connection_usable(start_worker: Callable[..., Worker], monitor: Any) -> None:
    """A hard time limit cutting a query, and a revoke(terminate=True): afterwards the
    pool has all its connections and the server runs none of the cut queries."""
    worker = start_worker("-P", "gevent", "-c", "20", GP_POOL_SIZE="4")
    limited = [worker.task("hold").apply_async([30], time_limit=0.5) for _ in range(4)]
    for result in limited:
        with pytest.raises(Exception):  # noqa: B017 - TimeLimitExceeded, as Celery reports it
            result.get(timeout=30)
    revoked = worker.task("peewee_hold").delay(30)
    time.sleep(1.0)  # it runs
    worker.client.control.revoke(revoked.id, terminate=True)
    with pytest.raises(Exception):  # noqa: B017 - TaskRevokedError
        revoked.get(timeout=30)

    app_name = worker.env["GP_APP_NAME"]

    def cut_queries() -> int:
        row = monitor.execute(
            "select count(*) from pg_stat_activity where application_name = %s and query like '%%pg_sleep%%'"
            " and state = 'active'",
            [app_name],
        ).fetchone()
        return int(row[0])

    deadline = time.monotonic() + 15
    while cut_queries() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cut_queries() == 0
    # The pool of 4 serves 4 holds at once, all of its connections usable.
    pids = [worker.task("hold").delay(0.5) for _ in range(4)]
    assert len({r.get(timeout=30) for r in pids}) == 4
    state = worker.run("pool_state")
    assert state["pool"]["returns_reset"] >= 4
    assert state["pool"]["requests_errors"] == 0


@pytest.mark.parametrize("pool", ["gevent", "threads", "solo"])
def test_what_a_task_leaves_held_is_given_back(start_worker: Callable[..., Worker], pool: str) -> None:
    """A Peewee autoconnect never closed and a getconn() never put back are given back after the task."""
    worker = start_worker("-P", pool, "-c", "4", GP_POOL_SIZE="2")
    for _ in range(3):  # more than the pools hold: each must come back
        assert worker.run("peewee_autoconnect") == 1
        worker.run("getconn_and_forget")
    state = worker.run("pool_state")
    assert state["pool"]["pool_available"] == state["pool"]["pool_size"]
    assert state["db"]["pool_available"] == state["db"]["pool_size"]
    assert state["reclaimed"] >= 3  # getconn() leaks (Peewee's under gevent go back when the greenlet ends)
    assert "ended holding" in worker.output()


def test_prefork_children_use_connections_of_their_own(start_worker: Callable[..., Worker], tmp_path: Path) -> None:
    """A pool opened at import in the prefork parent: the children forget its
    connections (never closing them) and make their own."""
    pids_file = tmp_path / "parent_pids"
    worker = start_worker("-P", "prefork", "-c", "4", GP_OPEN_AT_IMPORT="1", GP_PARENT_PIDS=str(pids_file))
    parent_backends = {int(p) for p in pids_file.read_text().split()}
    used = {worker.run("hold", 0.05) for _ in range(20)}
    assert used and not (used & parent_backends)
    state = worker.run("pool_state")
    assert state["task_pool"] == "prefork" and state["pid"] != worker.proc.pid  # type: ignore[union-attr]


def test_warm_shutdown_finishes_tasks_and_closes_every_connection(
    start_worker: Callable[..., Worker], monitor: Any
) -> None:
    """SIGTERM while tasks run: they finish, the pools close, the server keeps no connection."""
    worker = start_worker("-P", "gevent", "-c", "10")
    results = [worker.task("hold").delay(1.0) for _ in range(5)] + [worker.task("peewee_hold").delay(1.0)]
    time.sleep(0.5)  # they run
    assert worker.stop(signal.SIGTERM) == 0
    assert all(isinstance(r.get(timeout=10), int) for r in results)
    assert server_connections(monitor, worker.env["GP_APP_NAME"]) == 0


def test_the_example_app_runs(start_worker: Callable[..., Worker], pg_dsn: str, tmp_path: Path) -> None:
    """examples/celery_app.py, as its docstring says to run it."""
    _require(REDIS, "Redis", "GREENPOOL_TEST_REDIS")
    queue = f"gp_{uuid.uuid4().hex[:10]}"
    env = dict(
        os.environ,
        GREENPOOL_DSN=pg_dsn,
        GREENPOOL_EXAMPLE_QUEUE=queue,
        CELERY_BROKER_URL=REDIS,
        CELERY_RESULT_BACKEND=REDIS,
    )
    env.pop("GREENPOOL_CELERY_REEXECUTED", None)
    log = tmp_path / "example.log"
    worker = Worker(["-c", "20", "--loglevel=INFO", "-n", f"{queue}@%h"], env, log)
    with open(log, "wb") as out:
        worker.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "examples.celery_app", "worker", *worker.args],
            env=env,
            cwd=str(REPO_ROOT),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        worker.wait_ready()
        client = celery.Celery("example_client", broker=REDIS, backend=REDIS)
        try:
            note = client.signature("examples.celery_app.add_note", queue=queue).delay("hello").get(timeout=30)
            count = client.signature("examples.celery_app.count_notes", queue=queue).delay().get(timeout=30)
        finally:
            client.close()
        assert isinstance(note, int) and count >= 1
        assert "greenpool: 2 pool(s) in a gevent worker" in worker.output()
    finally:
        worker.stop()
        import psycopg

        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("drop table if exists greenpool_celery_note")


def test_the_start_check_asks_the_server_on_one_of_the_pools_connections(pg_dsn: str, monitor: Any) -> None:
    """The start line's connection limit comes through a pooled connection: never one past `max_size`.

    The role may open 2 connections, the pool has 2: a third connection for
    the question would be refused, and the limit unknown.
    """
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from greenpool import ConnectionPool
    from greenpool.integrations.celery import Member

    role = unique("gp_two")
    monitor.execute(f"create role {role} login connection limit 2")
    params = conninfo_to_dict(pg_dsn)
    params.pop("password", None)
    pool = ConnectionPool(make_conninfo("", **{**params, "user": role}), min_size=2, max_size=2, open=False)
    try:
        pool.open(wait=True, timeout=10)
        expected = monitor.execute(
            "select current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int"
        ).fetchone()[0]
        assert Member(pool).server_limit() == expected
        # The connection comes back (rolled back in the background first).
        wait_until(lambda: pool.get_stats()["pool_available"] == 2, 10, "the connection to come back")
        pool.close()
        # A pool kept empty (min_size 0) stays so: the question's connection is closed.
        pool = ConnectionPool(make_conninfo("", **{**params, "user": role}), min_size=0, max_size=2, open=True)
        assert Member(pool).server_limit() == expected
        assert pool.get_stats()["pool_size"] == 0
    finally:
        pool.close()
        monitor.execute("select pg_terminate_backend(pid) from pg_stat_activity where usename = %s", [role])
        monitor.execute(f"drop role {role}")

"""The benchmark's plumbing (`greenpool.bench`, ``python -m greenpool bench``).

No figures are checked here: CI runs ``python -m greenpool bench`` itself.
These tests cover what decides which contenders run where (and the default
run's size), the MySQL URL handling, the reports, progress lines, the JSON
document, its Markdown and plot, the skip of an absent MySQL server and the
isolation of a failing contender, none of which needs a database server; and,
on PostgreSQL, that the `bare-pool` reference is a correct FIFO pool and that a
small run ends with its closing table.

The pytest process is never monkey-patched: anything running greenlets
against the benchmark runner does so in a subprocess.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from greenpool.bench import backends, contenders, planning, report, runner, scenarios

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python <args>`` with this checkout first on the path, no DSN set."""
    env = dict(os.environ)
    for name in (backends.DSN_ENV, backends.MYSQL_ENV, "GREENPOOL_BENCH_REEXECUTED"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO_ROOT),
    )


# ---------------------------------------------------------------- who runs where


def _plan(scenario: str, requested: list[str] | None = None, quick: bool = False) -> tuple[list[str], dict[str, str]]:
    names = planning.selected(requested, list(contenders.CONTENDERS), "contender")
    return planning.plan(scenarios.SCENARIOS[scenario].of("quick" if quick else "full"), names, requested)


def test_postgres_scenarios_run_every_postgres_contender() -> None:
    names, skipped = _plan("steady")
    assert names == [
        "greenpool",
        "psycopg_pool",
        "peewee-greenpool",
        "peewee-playhouse",
        "bare-pool",
        "dedicated",
        "peewee-dedicated",
        "shared",
    ]
    assert skipped == {}


def test_mysql_scenarios_run_only_contenders_supporting_mysql() -> None:
    for scenario in ("mysql-steady", "mysql-overhead"):
        assert scenarios.SCENARIOS[scenario].full.backend == backends.MYSQL
        assert _plan(scenario) == (
            ["peewee-greenpool", "peewee-playhouse", "bare-pool", "dedicated", "peewee-dedicated"],
            {},
        )


@pytest.mark.parametrize("scenario", ["steady", "overhead", "scale", "mysql-steady", "mysql-overhead"])
@pytest.mark.parametrize("quick", [False, True])
def test_peewee_dedicated_runs_in_every_fixed_work_scenario(scenario: str, quick: bool) -> None:
    assert "peewee-dedicated" in _plan(scenario, quick=quick)[0]
    assert _plan(scenario, ["peewee-dedicated"], quick=quick) == (["peewee-dedicated"], {})


def test_storms_run_only_storm_contenders_of_their_backend() -> None:
    assert _plan("storm")[0] == ["greenpool", "psycopg_pool", "peewee-greenpool", "peewee-playhouse"]
    assert _plan("mysql-storm")[0] == ["peewee-greenpool", "peewee-playhouse"]
    # The no-pool bounds have no lifetime to expire, not even when named.
    assert _plan("storm", ["dedicated", "peewee-dedicated"]) == ([], {})


@pytest.mark.parametrize("quick", [False, True])
def test_scale_leaves_shared_out_unless_asked_for(quick: bool) -> None:
    names, skipped = _plan("scale", quick=quick)
    assert "shared" not in names
    assert "shared" in skipped
    assert _plan("scale", ["shared"], quick=quick) == (["shared"], {})
    # Naming another contender does not bring shared back.
    assert _plan("scale", ["greenpool"], quick=quick) == (["greenpool"], {})


def _config(backend: str, dsn: str) -> contenders.ContenderConfig:
    return contenders.ContenderConfig(
        dsn=dsn,
        pool_size=2,
        max_lifetime=scenarios.CALM_LIFETIME,
        connection_class=object,
        connect_kwargs=backends.CONNECT_KWARGS,
        timeout=1.0,
        backend=backends.BACKENDS[backend],
    )


def test_peewee_dedicated_postgres_database_is_plain_psycopg3_through_gevent_connection() -> None:
    pytest.importorskip("psycopg")
    import peewee

    from greenpool.peewee.postgres import gevent_adapter

    config = _config(backends.POSTGRES, "host=127.0.0.1 port=5432 user=postgres dbname=test")
    db: Any = contenders.PeeweeDedicated(config).database()
    assert type(db._adapter) is gevent_adapter(peewee.Psycopg3Adapter)
    assert type(db) is peewee.PostgresqlDatabase  # no pool, not even greenpool's
    assert (db.database, db.connect_params["host"], db.connect_params["port"]) == ("test", "127.0.0.1", "5432")
    assert (db.thread_safe, db.autoconnect, db.is_closed()) == (False, False, True)


def test_peewee_dedicated_mysql_database_is_plain() -> None:
    pytest.importorskip("pymysql")
    import peewee

    config = _config(backends.MYSQL, "mysql://me:pw@db.example:3307/name")
    db: Any = contenders.PeeweeDedicated(config).database()
    assert type(db) is peewee.MySQLDatabase
    assert (db.database, db.connect_params["host"], db.connect_params["port"]) == ("name", "db.example", 3307)
    assert (db.thread_safe, db.autoconnect) == (False, False)


def test_peewee_dedicated_shares_dedicated_runner_and_queries_without_connection_context() -> None:
    assert contenders.CONTENDERS["peewee-dedicated"].factory is contenders.PeeweeDedicated
    assert contenders.PeeweeDedicated.drive is contenders.DedicatedConnections.drive  # one runner for both bounds

    class FakeDatabase:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def execute_sql(self, sql: str) -> FakeDatabase:
            self.calls.append(sql)
            return self

        def fetchall(self) -> list[object]:
            self.calls.append("fetchall")
            return []

        def connection_context(self) -> None:  # pragma: no cover - must not be called
            raise AssertionError("peewee-dedicated keeps its connection")

    db = FakeDatabase()
    contenders.PeeweeDedicated(_config(backends.MYSQL, backends.MYSQL_DEFAULT_URL)).execute(db, "select 1")
    assert db.calls == ["select 1", "fetchall"]


def test_contender_backends_are_checked() -> None:
    with pytest.raises(ValueError, match="backends"):
        contenders.contender("nowhere", storm=False, backends=("oracle",))
    assert "nowhere" not in contenders.CONTENDERS


# ---------------------------------------------------------------- MySQL URLs


def test_mysql_url_to_connect_params() -> None:
    backend = backends.BACKENDS[backends.MYSQL]
    url = "mysql://u%40x:p%3Aw@db.example:3307/name?ssl_disabled=true&read_timeout=5&init_command=x"
    database, params = backend.peewee_params(url)
    assert database == "name"
    assert params == {
        "host": "db.example",
        "port": 3307,
        "user": "u@x",
        "password": "p:w",
        "connect_timeout": backends.MYSQL_CONNECT_TIMEOUT,
        "ssl_disabled": True,
        "read_timeout": 5,
        "init_command": "x",
    }
    assert backend.tcp_target(url) == ("db.example", 3307)
    assert "p%3Aw" not in backend.masked(url)
    assert backend.masked(url).startswith("mysql://u%40x:***@db.example:3307/name")


def test_mysql_url_defaults() -> None:
    database, params = backends.BACKENDS[backends.MYSQL].peewee_params(backends.MYSQL_DEFAULT_URL)
    assert database == "test"
    assert params == {
        "host": "127.0.0.1",
        "port": 3306,
        "user": "root",
        "connect_timeout": backends.MYSQL_CONNECT_TIMEOUT,
    }


@pytest.mark.parametrize("url", ["postgresql://u@h/db", "mysql://root@127.0.0.1:3306"])
def test_bad_mysql_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        backends.BACKENDS[backends.MYSQL].peewee_params(url)


def test_mysql_url_through_the_proxy() -> None:
    backend = backends.BACKENDS[backends.MYSQL]
    proxied = backend.via_proxy("mysql://me:secret@10.0.0.1:3306/test?ssl_disabled=1", "127.0.0.1", 40000)
    assert proxied == "mysql://me:secret@127.0.0.1:40000/test?ssl_disabled=1"
    assert backend.via_proxy("mysql://10.0.0.1/test", "127.0.0.1", 40000) == "mysql://127.0.0.1:40000/test"


def test_postgres_dsn_to_peewee_params() -> None:
    pytest.importorskip("psycopg")
    backend = backends.BACKENDS[backends.POSTGRES]
    dsn = "host=127.0.0.1 port=5432 user=postgres dbname=test password=pw"
    assert backend.peewee_params(dsn) == (
        "test",
        {"host": "127.0.0.1", "port": "5432", "user": "postgres", "password": "pw", "prefer_psycopg3": True},
    )
    proxied = backend.via_proxy(dsn, "127.0.0.1", 40000)
    assert backend.peewee_params(proxied)[1]["port"] == "40000"
    assert "pw" not in backend.masked(dsn)


# ---------------------------------------------------------------- reports


def _result(contender: str, **figures: object) -> runner.RunResult:
    result = runner.RunResult("steady", "run", contender, 1)
    for key, value in figures.items():
        setattr(result, key, value)
    return result


def _rows(text: str) -> dict[str, str]:
    """Table rows by contender (error lines below a table are indented)."""
    return {line.split()[0]: line for line in text.splitlines() if line and not line[0].isspace()}


def _cells(text: str) -> dict[str, dict[str, str]]:
    """Cells of the table's result rows, by contender and column (columns are 2+ spaces apart)."""
    lines = text.splitlines()
    headers = re.split(r"\s{2,}", lines[0].strip())
    return {
        cells[0]: dict(zip(headers, cells, strict=False))
        for line in lines[1:]
        if line and not line[0].isspace()
        for cells in [re.split(r"\s{2,}", line.strip())]
        if len(cells) > 2
    }


def test_fixed_report_compares_peewee_rows_with_peewee_dedicated() -> None:
    scenario = scenarios.SCENARIOS["steady"].full  # G/P = 200/20 = 10
    results = [
        _result("greenpool", ok=True, qps=900.0, p50_ms=15.0, p99_ms=30.0, max_ms=40.0),
        _result("peewee-greenpool", ok=True, qps=600.0, p50_ms=20.0, p99_ms=50.0, max_ms=60.0),
        _result("dedicated", ok=True, qps=1000.0, p50_ms=2.0, p99_ms=4.0, max_ms=5.0),
        _result("peewee-dedicated", ok=True, qps=800.0, p50_ms=2.5, p99_ms=5.0, max_ms=6.0),
    ]
    names = ["greenpool", "peewee-greenpool", "dedicated", "peewee-dedicated"]
    text = report.report_fixed(scenario, results, names)
    columns = ["q/s vs dedicated", "q/s vs peewee-dedicated", "p99 vs FIFO ideal", "p99 vs peewee FIFO ideal"]
    cells = _cells(text)
    assert [cells["greenpool"][c] for c in columns] == ["0.90x", "-", "1.50x", "-"]
    assert [cells["peewee-greenpool"][c] for c in columns] == ["0.60x", "0.75x", "2.50x", "2.00x"]
    assert [cells["dedicated"][c] for c in columns] == ["1.00x", "-", "-", "-"]
    assert [cells["peewee-dedicated"][c] for c in columns] == ["0.80x", "1.00x", "-", "-"]
    assert "FIFO ideal p99 = G/P x dedicated median latency = 200/20 x 2.00 ms = 20.0 ms" in text.splitlines()
    assert (
        "peewee FIFO ideal p99 = G/P x peewee-dedicated median latency = 200/20 x 2.50 ms = 25.0 ms"
        in text.splitlines()
    )


def test_ratios_are_medians_of_each_rounds_own_ratio() -> None:
    """The machine drifts between rounds: a round's contender is compared
    with the same round's bound, not with the bound's median."""
    scenario = scenarios.SCENARIOS["steady"].full
    figures = [(900.0, 1000.0), (800.0, 1000.0), (450.0, 500.0)]  # per round: pool, bound
    results = []
    for round_no, (pool_qps, bound_qps) in enumerate(figures, 1):
        for name, qps in (("greenpool", pool_qps), ("dedicated", bound_qps)):
            result = _result(name, ok=True, qps=qps, p50_ms=2.0, p99_ms=30.0, max_ms=40.0)
            result.round = round_no
            results.append(result)
    text = report.report_fixed(scenario, results, ["greenpool", "dedicated"])
    cells = _cells(text)["greenpool"]
    assert cells["q/s"] == "800"  # the median, where 800 / 1000 would say 0.80x
    assert cells["q/s vs dedicated"] == "0.90x"
    assert cells["rounds vs dedicated"] == "0.80-0.90"
    assert _cells(text)["dedicated"]["rounds vs dedicated"] == "-"
    assert report.PAIRED_LEGEND in text.splitlines()
    # Storm: each round's storm phase over the same round's calm phase.
    storm = []
    for round_no, (storm_qps, calm_qps) in enumerate(figures, 1):
        for phase, qps in (("storm", storm_qps), ("calm", calm_qps)):
            result = _result("greenpool", ok=True, qps=qps, p50_ms=2.0, p99_ms=30.0, max_ms=qps / 10)
            result.round, result.phase = round_no, phase
            storm.append(result)
    row = _cells(report.report_storm(scenarios.SCENARIOS["storm"].full, storm, ["greenpool"]))["greenpool"]
    assert row["storm/calm q/s"] == "0.90"
    assert row["rounds"] == "0.80-0.90"
    assert row["storm/calm max"] == "0.90x"


def test_fixed_report_without_peewee_dedicated() -> None:
    scenario = scenarios.SCENARIOS["steady"].full
    results = [
        _result("greenpool", ok=True, qps=900.0, p50_ms=15.0, p99_ms=30.0, max_ms=40.0),
        _result("peewee-greenpool", ok=True, qps=600.0, p50_ms=20.0, p99_ms=50.0, max_ms=60.0),
        _result("dedicated", ok=True, qps=1000.0, p50_ms=2.0, p99_ms=4.0, max_ms=5.0),
        _result("peewee-dedicated", error="OperationalError: refused"),
    ]
    # A failed peewee-dedicated: its columns stay empty, its ideal unknown.
    text = report.report_fixed(scenario, results, ["peewee-greenpool", "dedicated", "peewee-dedicated"])
    assert _cells(text)["peewee-greenpool"]["q/s vs peewee-dedicated"] == "-"
    assert _cells(text)["peewee-greenpool"]["p99 vs peewee FIFO ideal"] == "-"
    assert _cells(text)["peewee-greenpool"]["q/s vs dedicated"] == "0.60x"
    assert "peewee FIFO ideal p99: unknown (needs a successful `peewee-dedicated` run)" in text
    assert "ERROR round 1: OperationalError: refused" in _rows(text)["peewee-dedicated"]
    # No Peewee row: no Peewee ideal.
    text = report.report_fixed(scenario, results, ["greenpool", "dedicated"])
    assert "peewee FIFO ideal" not in text.split("\n", 1)[1]
    assert _cells(text)["greenpool"]["q/s vs peewee-dedicated"] == "-"


def test_fixed_report_rows() -> None:
    scenario = scenarios.SCENARIOS["scale"].full
    results = [
        _result("dedicated", ok=True, qps=1000.0, p50_ms=2.0, p99_ms=4.0, max_ms=5.0),
        _result("peewee-greenpool", ok=True, qps=500.0, p50_ms=50.0, p99_ms=100.0, max_ms=120.0),
        _result("peewee-playhouse", error="MaxConnectionsExceeded: timed out"),
    ]
    names = ["peewee-greenpool", "peewee-playhouse", "dedicated", "shared"]
    text = report.report_fixed(scenario, results, names, {"shared": "too slow"})
    rows = _rows(text)
    assert "0.50x" in rows["peewee-greenpool"]
    assert "ERROR round 1: MaxConnectionsExceeded: timed out" in rows["peewee-playhouse"]
    assert "not run: too slow" in rows["shared"]
    assert "peewee-playhouse failed, round 1: MaxConnectionsExceeded: timed out" in text


# ---------------------------------------------------------------- MySQL absent


def test_absent_default_mysql_is_a_note(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pymysql")
    monkeypatch.delenv(backends.MYSQL_ENV, raising=False)
    monkeypatch.setattr(backends, "MYSQL_DEFAULT_URL", "mysql://root@127.0.0.1:1/test")
    assert backends.connect_mysql(None) is None
    assert capsys.readouterr().out == f"MySQL scenarios skipped: no server (set {backends.MYSQL_ENV})\n"


@pytest.mark.parametrize(
    "options, error",
    [
        (["--mysql", "mysql://root@127.0.0.1:1/test"], "no MySQL server at mysql://root@127.0.0.1:1/test (--mysql): "),
        (["--mysql", "postgres://u@h/db"], "no MySQL server at postgres://u@h/db (--mysql): ValueError"),
        (["--dsn", "host=127.0.0.1 port=1 dbname=test"], "no PostgreSQL at "),
        (["--timeout", "nan"], "--timeout must be a number of seconds > 0, got nan"),
        (["--timeout", "0"], "--timeout must be a number of seconds > 0, got 0.0"),
        (["--json", "/nonexistent-dir/figures.json"], "--json: can't write /nonexistent-dir/figures.json"),
    ],
)
def test_cli_refuses_bad_options_in_one_line(options: list[str], error: str) -> None:
    """Options given that can't work end the run at once, with one line
    naming them, before any scenario runs: a mistyped --mysql must not pass
    for a green run that skipped its scenarios."""
    pytest.importorskip("pymysql")
    scenario = "mysql-overhead" if "--mysql" in options else "overhead"
    done = _run(["-m", "greenpool", "bench", "--quick", "--scenario", scenario, *options])
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.startswith(error), done.stderr
    assert "Traceback" not in done.stderr and "== " not in done.stdout


def test_cli_list() -> None:
    done = _run(["-m", "greenpool", "bench", "--list"])
    assert done.returncode == 0, done.stderr
    for name in ("mysql-steady", "mysql-overhead", "mysql-storm", "peewee-greenpool", "peewee-playhouse"):
        assert name in done.stdout
    assert "without shared" in done.stdout
    contenders = done.stdout.split("contenders:\n", 1)[1]
    assert "  peewee-dedicated P greenlets each owning a connected, non-pooled Peewee database" in contenders
    assert "[PostgreSQL, MySQL; not in storm]" in contenders.split("peewee-dedicated", 1)[1].splitlines()[0]
    bounds = done.stdout.split("upper bounds (fixed-work reports):\n", 1)[1].splitlines()
    assert bounds[0].split()[:3] == ["dedicated", "every", "contender:"]
    assert bounds[1].split()[:3] == ["peewee-dedicated", "the", "peewee-*"]


# ---------------------------------------------------------------- failures stay in their row


def test_a_failing_contender_does_not_stop_the_run() -> None:
    """Raising, hanging past --timeout, and working contenders in one run (no database)."""
    code = textwrap.dedent(
        """
        from gevent import monkey
        monkey.patch_all()
        import gevent
        from greenpool.bench import backends, contenders, report, runner, scenarios

        class Fake(contenders.Contender):
            def open(self): pass
            def close(self): pass
            def drive(self, work):
                work.latencies.extend([0.001] * (work.greenlets * (work.queries_each or 1)))

        @contenders.contender("dedicated", storm=False, backends=("postgres", "mysql"))
        class Fine(Fake):
            '''works'''

        @contenders.contender("boom", storm=False, backends=("mysql",))
        class Boom(Fake):
            '''raises'''
            def open(self): raise RuntimeError("boom")

        @contenders.contender("hang", storm=False, backends=("mysql",))
        class Hang(Fake):
            '''hangs'''
            def drive(self, work): gevent.sleep(30)

        scenario = scenarios.Scenario("t", greenlets=4, pool_size=2, sql="x", queries_each=2, backend="mysql")
        server = backends.Server(backends.BACKENDS["mysql"], "mysql://root@127.0.0.1:1/t", "test",
                              {"version": "-", "max_connections": 10, "client_connections": 0})
        env = runner.Environment({"mysql": server}, object, "-", run_timeout=0.5)
        names = ["boom", "hang", "dedicated"]
        results = runner.run_scenario(scenario, names, 2, env)
        print(report.report_fixed(scenario, results, names))
        """
    )
    done = _run(["-c", code])
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _rows(done.stdout)
    assert "ERROR round 1: RuntimeError: boom" in rows["boom"]
    assert "ERROR round 1: timed out after 0.5 s (--timeout)" in rows["hang"]
    assert "1.00x" in rows["dedicated"]
    # Each run is announced, then its figures (or failure) follow on the next line.
    lines = done.stdout.splitlines()
    announced = [i for i, line in enumerate(lines) if line.startswith("[")]
    assert [lines[i] for i in announced] == [
        f"[{n}/6] t · {name} · round {r}/2 ..."
        for n, (r, name) in enumerate(
            [(1, "boom"), (1, "hang"), (1, "dedicated"), (2, "hang"), (2, "dedicated"), (2, "boom")], 1
        )
    ]
    assert lines[announced[0] + 1] == "    FAILED RuntimeError: boom"
    assert lines[announced[1] + 1] == "    FAILED timed out after 0.5 s (--timeout)"
    assert re.fullmatch(
        r"    \d+ q/s, p50 1\.00 ms, p99 1\.00 ms \(8 queries in \d+\.\d\d s\)", lines[announced[2] + 1]
    )


# ---------------------------------------------------------------- the bare-pool reference


def test_bare_pool_lends_each_connection_to_one_greenlet_at_a_time(pg_dsn: str) -> None:
    """The reference pool is a correct (if featureless) FIFO pool, on the real server."""
    code = textwrap.dedent(
        """
        from gevent import monkey
        monkey.patch_all()
        import sys, gevent
        from greenpool.bench import backends, contenders, report, runner, scenarios
        from greenpool.pg import GeventConnection

        config = contenders.ContenderConfig(
            dsn=sys.argv[1], pool_size=3, max_lifetime=scenarios.CALM_LIFETIME,
            connection_class=GeventConnection, connect_kwargs=backends.CONNECT_KWARGS, timeout=10.0,
        )
        pool = contenders.CONTENDERS["bare-pool"].factory(config)
        pool.open()
        in_use, served, most = set(), [], 0

        def client(i):
            global most
            for _ in range(3):
                with pool.borrow() as conn:
                    assert conn not in in_use
                    in_use.add(conn)
                    most = max(most, len(in_use))
                    served.append(i)
                    conn.execute("select pg_sleep(0.01)").fetchall()
                    in_use.discard(conn)

        gevent.joinall([gevent.spawn(client, i) for i in range(12)], raise_error=True)
        assert sorted(served) == sorted(list(range(12)) * 3), served
        # FIFO: every client is served once before any is served a second time.
        assert set(served[:12]) == set(range(12)), served
        assert most == 3 and len(pool.idle) == 3 and not pool.waiters
        pool.close()
        assert all(conn.closed for conn in pool.conns)
        print("ok")
        """
    )
    done = _run(["-c", code, pg_dsn])
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "ok"


# ---------------------------------------------------------------- what the default run runs


def test_default_plan_is_steady_overhead_and_a_short_storm() -> None:
    """Pins the default run's size: it must fit in ~2 minutes (CI runs it)."""
    plan = planning.make_plan(planning.DEFAULT)
    sizes = [
        (e.scenario.name, e.scenario.greenlets, e.scenario.pool_size, e.scenario.queries_each, e.scenario.duration)
        for e in plan
    ]
    assert sizes == [("steady", 200, 20, 50, None), ("overhead", 200, 20, 50, None), ("storm", 300, 100, None, 4.0)]
    storm = plan[2].scenario
    assert (storm.storm_lifetime, storm.connect_delay) == (3.0, 0.03)
    assert [e.rounds for e in plan] == [2, 2, 1]
    pools = ["greenpool", "psycopg_pool", "peewee-greenpool", "peewee-playhouse"]
    bounds = ["bare-pool", "dedicated", "peewee-dedicated"]
    assert [list(e.contenders) for e in plan] == [pools + bounds, [*pools, *bounds, "shared"], pools]
    assert list(plan[0].skipped) == ["shared"]  # ~25 s a round in steady; overhead shows it
    assert [e.runs for e in plan] == [14, 16, 8]
    assert sum(e.runs for e in plan) == 38


def test_full_and_quick_plans_run_everything() -> None:
    full = planning.make_plan(planning.FULL)
    assert [e.scenario for e in full] == [sizes.full for sizes in scenarios.SCENARIOS.values()]
    assert {e.rounds for e in full} == {3}
    assert "shared" in full[0].contenders  # full steady keeps it
    quick = planning.make_plan(planning.QUICK)
    assert [e.scenario for e in quick] == [sizes.quick for sizes in scenarios.SCENARIOS.values()]
    assert {e.rounds for e in quick} == {1}
    # Contenders: every one taking part, as before the default run existed.
    assert [list(e.contenders) for e in full] == [_plan(e.scenario.name)[0] for e in full]


def test_options_override_the_default_plan() -> None:
    plan = planning.make_plan(planning.DEFAULT, rounds=1)
    assert [e.rounds for e in plan] == [1, 1, 1]
    plan = planning.make_plan(planning.DEFAULT, scenarios=["scale", "steady"], contenders=["greenpool", "shared"])
    # Catalogue order, default sizes, rounds of the mode; naming shared brings it back.
    assert [(e.scenario.name, e.rounds, list(e.contenders)) for e in plan] == [
        ("steady", 2, ["greenpool", "shared"]),
        ("scale", 2, ["greenpool", "shared"]),
    ]
    assert plan[0].scenario == scenarios.SCENARIOS["steady"].default
    plan = planning.make_plan(planning.FULL, scenarios=["storm"])
    assert [(e.scenario.duration, e.rounds) for e in plan] == [(10.0, 3)]


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: planning.make_plan(planning.DEFAULT, rounds=0), "--rounds must be at least 1, got 0"),
        (lambda: planning.make_plan(planning.DEFAULT, scenarios=["nope"]), "unknown scenario: nope (known: steady,"),
        (lambda: planning.make_plan(planning.FULL, contenders=["nope"]), "unknown contender: nope (known: greenpool,"),
    ],
)
def test_bad_plans_are_refused(call: Any, error: str) -> None:
    with pytest.raises(SystemExit) as raised:
        call()
    assert str(raised.value).startswith(error)


# ---------------------------------------------------------------- progress


def test_progress_lines() -> None:
    assert (
        runner.progress_line(2, 14, "steady", "greenpool", "run", 1, 2) == "[2/14] steady · greenpool · round 1/2 ..."
    )
    assert (
        runner.progress_line(5, 38, "storm", "psycopg_pool", "calm", 1, 1)
        == "[5/38] storm · psycopg_pool · calm · round 1/1 ..."
    )
    ok = runner.RunResult(
        "steady", "run", "greenpool", 1, ok=True, queries=10000, seconds=1.5, qps=6666.6, p50_ms=29.123, p99_ms=57.49
    )
    assert runner.result_line(ok) == "    6667 q/s, p50 29.12 ms, p99 57.49 ms (10000 queries in 1.50 s)"
    failed = runner.RunResult("steady", "run", "greenpool", 1, error="OperationalError: " + "x" * 200)
    line = runner.result_line(failed)
    assert line.startswith("    FAILED OperationalError: xxx") and line.endswith("...")
    assert len(line) == len("    FAILED ") + runner.PROGRESS_ERROR_CHARS


def test_progress_numbers_runs_across_scenarios(capsys: pytest.CaptureFixture[str]) -> None:
    progress = runner.Progress(5)
    progress.before("steady", "greenpool", "run", 1, 1)
    progress.skip(3)  # a storm whose proxy did not start
    progress.before("overhead", "dedicated", "run", 1, 1)
    progress.after(runner.RunResult("overhead", "run", "dedicated", 1, error="boom"))
    assert capsys.readouterr().out.splitlines() == [
        "[1/5] steady · greenpool · round 1/1 ...",
        "[5/5] overhead · dedicated · round 1/1 ...",
        "    FAILED boom",
    ]


# ---------------------------------------------------------------- closing table, JSON, Markdown, plot


def _run_result(scenario: str, phase: str, name: str, round_no: int, qps: float, p99: float) -> runner.RunResult:
    return runner.RunResult(
        scenario, phase, name, round_no, ok=True, queries=1000, seconds=1000 / qps, qps=qps, p50_ms=p99 / 2, p99_ms=p99
    )


def _document() -> dict[str, Any]:
    """A document as --json writes it: two rounds of steady, one of storm (a failed run in each)."""
    from dataclasses import asdict

    steady = scenarios.SCENARIOS["steady"].default
    storm = scenarios.SCENARIOS["storm"].default
    steady_runs = [
        _run_result("steady", "run", "greenpool", 1, 900.0, 30.0),
        _run_result("steady", "run", "dedicated", 1, 1000.0, 4.0),
        _run_result("steady", "run", "greenpool", 2, 800.0, 40.0),
        _run_result("steady", "run", "dedicated", 2, 1000.0, 6.0),
        runner.RunResult("steady", "run", "peewee-playhouse", 1, error="MaxConnectionsExceeded: x"),
        _run_result("steady", "run", "peewee-playhouse", 2, 300.0, 1500.0),
    ]
    storm_runs = [
        _run_result("storm", "calm", "greenpool", 1, 6000.0, 80.0),
        _run_result("storm", "storm", "greenpool", 1, 5400.0, 100.0),
        _run_result("storm", "calm", "peewee-playhouse", 1, 1500.0, 5000.0),
        runner.RunResult("storm", "storm", "peewee-playhouse", 1, error="timed out"),
    ]

    def entry(scenario: scenarios.Scenario, runs: list[runner.RunResult], names: list[str]) -> dict[str, Any]:
        return {
            "scenario": asdict(scenario),
            "backend": scenario.backend,
            "rounds": max(r.round for r in runs),
            "contenders": names,
            "skipped": dict(scenario.skip),
            "runs": [asdict(r) for r in runs],
        }

    return {
        "meta": {
            "started": "2026-05-04T09:08:07+00:00",
            "mode": "default",
            "rounds": {"steady": 2, "storm": 1},
            "dsn_source": "embedded throw-away pgserver",
            "server": {"version": "16.2", "max_connections": 100, "client_connections": 0},
            "versions": {"python": "3.11.7", "greenpool": "0.1.0", "gevent": "26.9.0"},
            "commit": "abc1234",
            "machine": {"cpus": 2, "cpu_model": "AMD EPYC", "architecture": "x86_64", "system": "Linux 6.1"},
            "cpus": 2,
            "load_start": [0.25, 0.5, 0.75],
            "load_end": [1.5, 1.0, 0.8],
            "seconds": 121.4,
        },
        "scenarios": {
            "steady": entry(steady, steady_runs, ["greenpool", "peewee-playhouse", "dedicated"]),
            "storm": entry(storm, storm_runs, ["greenpool", "peewee-playhouse"]),
            "mysql-steady": {"scenario": asdict(scenarios.SCENARIOS["mysql-steady"].default), "skipped": "no server"},
        },
    }


MARKDOWN = """\
### Benchmark of 2026-05-04 09:08 UTC

- machine: 2 CPUs, AMD EPYC, x86_64, Linux 6.1; load average 0.25 at start, 1.50 at end
- versions: python 3.11.7, greenpool 0.1.0, gevent 26.9.0
- server: PostgreSQL 16.2 (embedded throw-away pgserver)
- run: default mode, rounds: steady x2, storm x1, 121 s, greenpool commit abc1234
- not run: mysql-steady (no server)

| scenario | contender | q/s | p99 ms | ratio | bound |
|:--|:--|--:|--:|--:|:--|
| steady | greenpool | 850 | 35.0 | 0.85x | dedicated |
| steady | peewee-playhouse (1/2 rounds ok) | 300 | 1500.0 | 0.30x | dedicated |
| steady | dedicated | 1000 | 5.0 | 1.00x | dedicated |
| storm | greenpool [calm] | 6000 | 80.0 | - | - |
| storm | greenpool [storm] | 5400 | 100.0 | 0.90x | its calm phase |
| storm | peewee-playhouse [calm] | 1500 | 5000.0 | - | - |
| storm | peewee-playhouse [storm] (failed) | - | - | - | its calm phase |
"""


def test_overview_rows_and_table() -> None:
    from greenpool.bench import document

    rows = document.overview_of(_document())
    assert [(r.scenario, r.label, round(r.ratio, 2) if r.ratio == r.ratio else None, r.bound) for r in rows] == [
        ("steady", "greenpool", 0.85, "dedicated"),
        ("steady", "peewee-playhouse", 0.3, "dedicated"),
        ("steady", "dedicated", 1.0, "dedicated"),
        ("storm", "greenpool [calm]", None, ""),
        ("storm", "greenpool [storm]", 0.9, report.CALM_BOUND),
        ("storm", "peewee-playhouse [calm]", None, ""),
        ("storm", "peewee-playhouse [storm]", None, report.CALM_BOUND),
    ]
    assert (
        report.overview_table(rows)
        == textwrap.dedent(
            """\
        scenario  contender                  q/s   p50 ms   p99 ms  ratio  bound
        steady    greenpool                  850    17.50    35.00  0.85x  dedicated
        steady    peewee-playhouse           300   750.00  1500.00  0.30x  dedicated       1/2 rounds ok
        steady    dedicated                 1000     2.50     5.00  1.00x  dedicated
        storm     greenpool [calm]          6000    40.00    80.00      -  -
        storm     greenpool [storm]         5400    50.00   100.00  0.90x  its calm phase
        storm     peewee-playhouse [calm]   1500  2500.00  5000.00      -  -
        storm     peewee-playhouse [storm]     -        -        -      -  its calm phase  failed
        """
        )
        + report.OVERVIEW_LEGEND
    )


def test_markdown_renders_a_saved_json_file(tmp_path: Path) -> None:
    from greenpool.bench import document

    path = tmp_path / "figures.json"
    document.write_json(str(path), _document())
    done = _run(["-m", "greenpool", "bench", "--markdown", str(path)])
    assert done.returncode == 0, done.stderr
    assert done.stdout == MARKDOWN + "\n" + report.OVERVIEW_LEGEND + "\n"


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")  # in CI (the test extra has it) a skip fails the session
    from greenpool.bench import document

    saved, png = tmp_path / "figures.json", tmp_path / "ratios.png"
    document.write_json(str(saved), _document())
    done = _run(["-m", "greenpool", "bench", "--markdown", str(saved), "--plot", str(png)])
    assert done.returncode == 0, done.stderr
    assert done.stdout == MARKDOWN + "\n" + report.OVERVIEW_LEGEND + "\n"  # the note goes to stderr
    assert done.stderr == f"plot of 4 ratios written to {png}\n"  # storm phases, not calm ones
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 5000


def test_plot_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from greenpool.bench import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec() then says: not installed
    with pytest.raises(SystemExit) as raised:
        plot.require_matplotlib()
    assert str(raised.value) == (
        "--plot needs matplotlib, which is not installed: pip install -e '.[plot]' (or pip install matplotlib)"
    )


@pytest.mark.parametrize(
    "options, error",
    [
        (["--quick", "--full"], "--quick and --full: choose one"),
        (["--rounds", "0"], "--rounds must be at least 1, got 0"),
        (["--scenario", "nope"], "unknown scenario: nope (known: steady, overhead, scale, storm,"),
        (["--contender", "nope"], "unknown contender: nope (known: greenpool, psycopg_pool,"),
        (["--plot", "/nonexistent-dir/ratios.png"], "--plot: can't write /nonexistent-dir/ratios.png"),
        (["--markdown", "/nonexistent-dir/figures.json"], "--markdown: can't read /nonexistent-dir/figures.json"),
        (["--markdown", str(REPO_ROOT / "setup.cfg")], f"--markdown: {REPO_ROOT / 'setup.cfg'} is not JSON"),
        (["--markdown", "x.json", "--quick", "--rounds", "2"], "--markdown renders a saved run: it takes no run"),
        (["--plot", "x.png", "--markdown", "setup.py"], "--plot needs matplotlib"),
    ],
)
def test_cli_refuses_bad_new_options_in_one_line(options: list[str], error: str) -> None:
    pre = "import sys; sys.modules['matplotlib'] = None; " if error.startswith("--plot needs") else ""
    code = f"{pre}import sys; from greenpool.__main__ import main; sys.exit(main(sys.argv[1:]))"
    done = _run(["-c", code, "bench", *options])
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.startswith(error), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_importing_the_bench_imports_no_driver() -> None:
    """greenpool.__main__ imports the package after monkey-patching; nothing in it may bind a driver before."""
    code = (
        "import sys, greenpool.bench, greenpool.bench.plot; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'psycopg', 'psycopg_pool', 'peewee', 'playhouse', 'pymysql', 'pgserver', 'matplotlib'}))"
    )
    done = _run(["-c", code])
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"


def test_a_small_run_ends_with_one_table_and_writes_dated_json(pg_dsn: str, tmp_path: Path) -> None:
    """The whole CLI on the real server: progress, the closing table last, the JSON's date, machine and versions."""
    import json

    saved = tmp_path / "figures.json"
    options = ["--quick", "--scenario", "overhead", "--contender", "greenpool", "--contender", "dedicated"]
    done = _run(["-m", "greenpool", "bench", *options, "--dsn", pg_dsn, "--json", str(saved)], timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "plan: quick run, overhead (1 round): 2 runs" in lines
    first = lines.index("[1/2] overhead · greenpool · round 1/1 ...")
    assert re.fullmatch(r"    \d+ q/s, p50 [\d.]+ ms, p99 [\d.]+ ms \(1000 queries in [\d.]+ s\)", lines[first + 1])
    assert lines[first + 2] == "[2/2] overhead · dedicated · round 1/1 ..."
    summary = lines.index(next(line for line in lines if line.startswith("== summary: 2 runs in ")))
    assert lines[summary + 1].split()[:2] == ["scenario", "contender"]
    assert [line.split()[:2] for line in lines[summary + 2 : summary + 4]] == [
        ["overhead", "greenpool"],
        ["overhead", "dedicated"],
    ]
    assert lines[summary + 3].split()[-2:] == ["1.00x", "dedicated"]
    assert "\n".join(lines[summary + 4 :]) == report.OVERVIEW_LEGEND  # the table ends the output

    meta = json.loads(saved.read_text())["meta"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", meta["started"])
    assert meta["finished"] >= meta["started"] and meta["seconds"] > 0
    assert meta["machine"]["cpus"] == os.cpu_count() and meta["machine"]["architecture"]
    assert {"python", "greenpool", "gevent", "psycopg"} <= set(meta["versions"])
    assert len(meta["load_start"]) == len(meta["load_end"]) == 3
    assert (meta["mode"], meta["rounds"]) == ("quick", {"overhead": 1})
    rendered = _run(["-m", "greenpool", "bench", "--markdown", str(saved)])
    assert rendered.returncode == 0, rendered.stderr
    assert "| overhead | dedicated | " in rendered.stdout and "| 1.00x | dedicated |" in rendered.stdout

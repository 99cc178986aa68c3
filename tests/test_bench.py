"""The benchmark's plumbing (`greenpool.bench`, ``python -m greenpool bench``).

No figures are checked here: CI runs ``python -m greenpool bench --quick``
itself. These tests cover what decides which contenders run where, the
MySQL URL handling, the reports, the skip of an absent MySQL server and the
isolation of a failing contender; none needs a database server.

The pytest process is never monkey-patched: anything running greenlets
against the benchmark runner does so in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from greenpool import bench

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python <args>`` with this checkout first on the path, no DSN set."""
    env = dict(os.environ)
    for name in (bench.DSN_ENV, bench.MYSQL_ENV, "GREENPOOL_BENCH_REEXECUTED"):
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
    names = bench._selected(requested, list(bench.CONTENDERS), "contender")
    return bench.plan(bench.SCENARIOS[scenario][1 if quick else 0], names, requested)


def test_postgres_scenarios_run_every_postgres_contender() -> None:
    names, skipped = _plan("steady")
    assert names == ["greenpool", "psycopg_pool", "peewee-greenpool", "peewee-playhouse", "dedicated", "shared"]
    assert skipped == {}


def test_mysql_scenarios_run_only_contenders_supporting_mysql() -> None:
    for scenario in ("mysql-steady", "mysql-overhead"):
        assert bench.SCENARIOS[scenario][0].backend == bench.MYSQL
        assert _plan(scenario) == (["peewee-greenpool", "peewee-playhouse", "dedicated"], {})


def test_storms_run_only_storm_contenders_of_their_backend() -> None:
    assert _plan("storm")[0] == ["greenpool", "psycopg_pool", "peewee-greenpool", "peewee-playhouse"]
    assert _plan("mysql-storm")[0] == ["peewee-greenpool", "peewee-playhouse"]


@pytest.mark.parametrize("quick", [False, True])
def test_scale_leaves_shared_out_unless_asked_for(quick: bool) -> None:
    names, skipped = _plan("scale", quick=quick)
    assert "shared" not in names
    assert "shared" in skipped
    assert _plan("scale", ["shared"], quick=quick) == (["shared"], {})
    # Naming another contender does not bring shared back.
    assert _plan("scale", ["greenpool"], quick=quick) == (["greenpool"], {})


def test_contender_backends_are_checked() -> None:
    with pytest.raises(ValueError, match="backends"):
        bench.contender("nowhere", storm=False, backends=("oracle",))
    assert "nowhere" not in bench.CONTENDERS


# ---------------------------------------------------------------- MySQL URLs


def test_mysql_url_to_connect_params() -> None:
    backend = bench.BACKENDS[bench.MYSQL]
    url = "mysql://u%40x:p%3Aw@db.example:3307/name?ssl_disabled=true&read_timeout=5&init_command=x"
    database, params = backend.peewee_params(url)
    assert database == "name"
    assert params == {
        "host": "db.example",
        "port": 3307,
        "user": "u@x",
        "password": "p:w",
        "connect_timeout": bench.MYSQL_CONNECT_TIMEOUT,
        "ssl_disabled": True,
        "read_timeout": 5,
        "init_command": "x",
    }
    assert backend.tcp_target(url) == ("db.example", 3307)
    assert "p%3Aw" not in backend.masked(url)
    assert backend.masked(url).startswith("mysql://u%40x:***@db.example:3307/name")


def test_mysql_url_defaults() -> None:
    database, params = bench.BACKENDS[bench.MYSQL].peewee_params(bench.MYSQL_DEFAULT_URL)
    assert database == "test"
    assert params == {"host": "127.0.0.1", "port": 3306, "user": "root", "connect_timeout": bench.MYSQL_CONNECT_TIMEOUT}


@pytest.mark.parametrize("url", ["postgresql://u@h/db", "mysql://root@127.0.0.1:3306"])
def test_bad_mysql_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        bench.BACKENDS[bench.MYSQL].peewee_params(url)


def test_mysql_url_through_the_proxy() -> None:
    backend = bench.BACKENDS[bench.MYSQL]
    proxied = backend.via_proxy("mysql://me:secret@10.0.0.1:3306/test?ssl_disabled=1", "127.0.0.1", 40000)
    assert proxied == "mysql://me:secret@127.0.0.1:40000/test?ssl_disabled=1"
    assert backend.via_proxy("mysql://10.0.0.1/test", "127.0.0.1", 40000) == "mysql://127.0.0.1:40000/test"


def test_postgres_dsn_to_peewee_params() -> None:
    pytest.importorskip("psycopg")
    backend = bench.BACKENDS[bench.POSTGRES]
    dsn = "host=127.0.0.1 port=5432 user=postgres dbname=test password=pw"
    assert backend.peewee_params(dsn) == (
        "test",
        {"host": "127.0.0.1", "port": "5432", "user": "postgres", "password": "pw", "prefer_psycopg3": True},
    )
    proxied = backend.via_proxy(dsn, "127.0.0.1", 40000)
    assert backend.peewee_params(proxied)[1]["port"] == "40000"
    assert "pw" not in backend.masked(dsn)


# ---------------------------------------------------------------- reports


def _result(contender: str, **figures: object) -> bench.RunResult:
    result = bench.RunResult("steady", "run", contender, 1)
    for key, value in figures.items():
        setattr(result, key, value)
    return result


def _rows(text: str) -> dict[str, str]:
    """Table rows by contender (error lines below a table are indented)."""
    return {line.split()[0]: line for line in text.splitlines() if line and not line[0].isspace()}


def test_fixed_report_rows() -> None:
    scenario = bench.SCENARIOS["scale"][0]
    results = [
        _result("dedicated", ok=True, qps=1000.0, p50_ms=2.0, p99_ms=4.0, max_ms=5.0),
        _result("peewee-greenpool", ok=True, qps=500.0, p50_ms=50.0, p99_ms=100.0, max_ms=120.0),
        _result("peewee-playhouse", error="MaxConnectionsExceeded: timed out"),
    ]
    names = ["peewee-greenpool", "peewee-playhouse", "dedicated", "shared"]
    text = bench.report_fixed(scenario, results, names, {"shared": "too slow"})
    rows = _rows(text)
    assert "0.50x" in rows["peewee-greenpool"]
    assert "ERROR round 1: MaxConnectionsExceeded: timed out" in rows["peewee-playhouse"]
    assert "not run: too slow" in rows["shared"]
    assert "peewee-playhouse failed, round 1: MaxConnectionsExceeded: timed out" in text


# ---------------------------------------------------------------- MySQL absent


def test_absent_default_mysql_is_a_note(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pymysql")
    monkeypatch.delenv(bench.MYSQL_ENV, raising=False)
    monkeypatch.setattr(bench, "MYSQL_DEFAULT_URL", "mysql://root@127.0.0.1:1/test")
    assert bench.connect_mysql(None) is None
    assert capsys.readouterr().out == f"MySQL scenarios skipped: no server (set {bench.MYSQL_ENV})\n"


def test_cli_skips_mysql_scenarios_without_a_server() -> None:
    pytest.importorskip("pymysql")
    done = _run(
        [
            "-m",
            "greenpool",
            "bench",
            "--quick",
            "--scenario",
            "mysql-overhead",
            "--mysql",
            "mysql://root@127.0.0.1:1/test",
        ]
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "MySQL scenarios skipped: no server at mysql://root@127.0.0.1:1/test (--mysql)" in done.stdout
    assert "== mysql-overhead" not in done.stdout
    assert "load average at end" in done.stdout


def test_cli_list() -> None:
    done = _run(["-m", "greenpool", "bench", "--list"])
    assert done.returncode == 0, done.stderr
    for name in ("mysql-steady", "mysql-overhead", "mysql-storm", "peewee-greenpool", "peewee-playhouse"):
        assert name in done.stdout
    assert "without shared" in done.stdout


# ---------------------------------------------------------------- failures stay in their row


def test_a_failing_contender_does_not_stop_the_run() -> None:
    """Raising, hanging past --timeout, and working contenders in one run (no database)."""
    code = textwrap.dedent(
        """
        from gevent import monkey
        monkey.patch_all()
        import gevent
        from greenpool import bench

        class Fake(bench.Contender):
            def open(self): pass
            def close(self): pass
            def drive(self, work):
                work.latencies.extend([0.001] * (work.greenlets * (work.queries_each or 1)))

        @bench.contender("dedicated", storm=False, backends=("postgres", "mysql"))
        class Fine(Fake):
            '''works'''

        @bench.contender("boom", storm=False, backends=("mysql",))
        class Boom(Fake):
            '''raises'''
            def open(self): raise RuntimeError("boom")

        @bench.contender("hang", storm=False, backends=("mysql",))
        class Hang(Fake):
            '''hangs'''
            def drive(self, work): gevent.sleep(30)

        scenario = bench.Scenario("t", greenlets=4, pool_size=2, sql="x", queries_each=2, backend="mysql")
        server = bench.Server(bench.BACKENDS["mysql"], "mysql://root@127.0.0.1:1/t", "test",
                              {"version": "-", "max_connections": 10, "client_connections": 0})
        env = bench.Environment({"mysql": server}, object, "-", run_timeout=0.5)
        names = ["boom", "hang", "dedicated"]
        results = bench.run_scenario(scenario, names, 2, env)
        print(bench.report_fixed(scenario, results, names))
        """
    )
    done = _run(["-c", code])
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _rows(done.stdout)
    assert "ERROR round 1: RuntimeError: boom" in rows["boom"]
    assert "ERROR round 1: timed out after 0.5 s (--timeout)" in rows["hang"]
    assert "1.00x" in rows["dedicated"]
    assert done.stdout.count("round 2/2 dedicated: ") == 1

"""`python -m greenpool doctor` on good and broken setups.

Each check runs in a fresh interpreter, so the import order is the real one:
either the CLI (`python -m greenpool doctor`, which may patch or re-execute
itself as a worker would) or a `python -c` prelude that imports and patches in
a given order, then calls the CLI's `main()` in that process. The server is the
real PostgreSQL of `GREENPOOL_TEST_DSN` (and MariaDB for `--mysql`); limits are
exceeded by making a pool huge, never by changing the server.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import REPO_ROOT

pytest.importorskip("celery")

MAIN = "import sys\nfrom greenpool.__main__ import main\nsys.exit(main(sys.argv[1:]))\n"


def run_doctor(
    *args: str, cwd: Path = REPO_ROOT, prelude: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `doctor args` in a fresh interpreter: the CLI, or `prelude` then the CLI's main() in-process."""
    child_env = dict(os.environ)
    for name in ("GREENPOOL_DSN", "GREENPOOL_MYSQL", "GREENPOOL_DOCTOR_REEXECUTED", "GREENPOOL_CELERY_REEXECUTED"):
        child_env.pop(name, None)
    child_env.update(env or {})
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), str(cwd), child_env.get("PYTHONPATH", "")) if p
    )
    if prelude is None:
        command = [sys.executable, "-m", "greenpool", "doctor", *args]
    else:
        command = [sys.executable, "-c", prelude + "\n" + MAIN, "doctor", *args]
    return subprocess.run(command, cwd=str(cwd), env=child_env, capture_output=True, text=True, timeout=180)


def lines(result: subprocess.CompletedProcess[str], level: str | None = None) -> list[str]:
    """The finding lines of a text report (those of `level` only, if given)."""
    found = [line for line in result.stdout.splitlines() if line.split(" ", 1)[0] in ("ok", "warn", "FAIL")]
    return [line for line in found if level is None or line.split(" ", 1)[0] == level]


def report(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.stdout.lstrip().startswith("{"), result.stdout + result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def findings(document: dict[str, Any], check: str, level: str | None = None) -> list[dict[str, Any]]:
    return [f for f in document["findings"] if f["check"] == check and (level is None or f["level"] == level)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_app(path: Path, name: str, dsn: str, *, pool_size: int, concurrency: int, extra: str = "") -> None:
    """A Celery app module configured with worker_pool = "gevent", a psycopg pool and a Peewee database."""
    (path / f"{name}.py").write_text(
        f"""
from celery import Celery
from psycopg.conninfo import conninfo_to_dict

import greenpool.celery
from greenpool import ConnectionPool
from greenpool.peewee import PooledPostgresqlDatabase

DSN = {dsn!r}
app = Celery({name!r}, broker="redis://127.0.0.1:6379/0")
app.conf.worker_pool = "gevent"
app.conf.worker_concurrency = {concurrency}
pool = ConnectionPool(DSN, min_size=1, max_size={pool_size}, open=False, name="tasks")
params = conninfo_to_dict(DSN)
db = PooledPostgresqlDatabase(params.pop("dbname"), max_connections=2, **params)
{extra or "greenpool.celery.setup(app, pool, db)"}
"""
    )


def usable_connections(monitor: Any) -> int:
    row = monitor.execute(
        "select current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int"
        " - coalesce(current_setting('reserved_connections', true), '0')::int"
    ).fetchone()
    return int(row[0])


# ---------------------------------------------------------------- gevent and import order


def test_patched_first_is_all_ok(pg_dsn: str) -> None:
    result = run_doctor(
        "--dsn",
        pg_dsn,
        "--strict",
        prelude="from gevent import monkey\nmonkey.patch_all()\nimport psycopg, peewee, pymysql",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines(result, "warn") == lines(result, "FAIL") == []
    out = result.stdout
    assert "ok   gevent: the process is monkey-patched" in out
    assert "ok   psycopg: imported after gevent patched the process" in out
    assert "ok   peewee: imported after gevent patched the process" in out
    assert "ok   pymysql: sockets patched by gevent" in out
    assert "ok   pgbouncer: not detected" in out
    assert out.rstrip().endswith("no problem found")


def test_patched_first_by_gevent_monkey_module(pg_dsn: str) -> None:
    """`python -m gevent.monkey --module greenpool doctor`: doctor's own imports come after the patch."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "gevent.monkey", "--module", "greenpool", "doctor", "--dsn", pg_dsn, "--strict"],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO_ROOT),
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok   gevent: the process is monkey-patched" in result.stdout


def test_psycopg_imported_before_patching_warns_with_the_fix() -> None:
    prelude = "import psycopg, peewee\nfrom gevent import monkey\nmonkey.patch_all()"
    result = run_doctor(prelude=prelude)
    assert result.returncode == 0, result.stdout + result.stderr  # warnings alone don't fail
    (psycopg_line,) = [line for line in lines(result, "warn") if line.startswith("warn psycopg:")]
    assert "psycopg.waiting.wait is wait_c" in psycopg_line
    assert "greenpool's connections wait cooperatively anyway" in psycopg_line
    assert "fix: call gevent.monkey.patch_all() before anything else is imported" in psycopg_line
    (peewee_line,) = [line for line in lines(result, "warn") if line.startswith("warn peewee:")]
    assert "unpatched threading.local" in peewee_line and "per-greenlet state anyway" in peewee_line
    assert lines(result, "FAIL") == []

    strict = run_doctor("--strict", prelude=prelude)
    assert strict.returncode == 1
    assert "2 problem(s)" in strict.stdout


def test_import_order_as_json() -> None:
    result = run_doctor("--json", prelude="import psycopg\nfrom gevent import monkey\nmonkey.patch_all()")
    document = report(result)
    assert document["exit_status"] == 0 and result.returncode == 0
    (trap,) = findings(document, "psycopg", "warn")
    assert trap["data"] == {"trap": True} and trap["fix"]
    assert findings(document, "gevent")[0]["data"] == {"patched": True}


def test_unpatched_process_is_fine_without_gevent() -> None:
    result = run_doctor("--strict", prelude="import psycopg, pymysql")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok   gevent: the process is not monkey-patched" in result.stdout
    assert "ok   pymysql: pymysql is imported and gevent has not patched the socket module" in result.stdout


def test_celery_start_up_line_uses_the_same_checks() -> None:
    """The integration's patch_state() and doctor share `greenpool._runtime.import_order`."""
    code = (
        "import psycopg, peewee\nfrom gevent import monkey\nmonkey.patch_all()\n"
        "from greenpool.integrations.celery import patch_state\nprint(patch_state())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        timeout=60,
    )
    assert result.stdout.strip() == (
        "patched by gevent; psycopg imported before patching (greenpool's connections wait cooperatively anyway);"
        " peewee imported before patching (greenpool's databases keep per-greenlet state anyway)"
    ), result.stderr


# ---------------------------------------------------------------- servers


def test_unreachable_dsn_fails() -> None:
    port = free_port()
    result = run_doctor("--dsn", f"host=127.0.0.1 port={port} user=postgres dbname=test connect_timeout=3")
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = lines(result, "FAIL")
    assert line.startswith("FAIL server: --dsn ") and f"port={port}" in line
    assert "unreachable: OperationalError" in line and "fix: check that the server runs" in line
    assert "1 problem(s)" in result.stdout


def test_server_facts(pg_dsn: str, monitor: Any) -> None:
    document = report(run_doctor("--dsn", pg_dsn, "--json"))
    assert document["exit_status"] == 0
    facts = findings(document, "server")[0]["data"]
    assert facts["max_connections"] == int(monitor.execute("show max_connections").fetchone()[0])
    assert facts["available"] == usable_connections(monitor)
    assert facts["version"] == monitor.execute("show server_version").fetchone()[0]
    assert facts["round_trip_ms"] > 0 and facts["connect_ms"] > 0
    assert findings(document, "pgbouncer")[0]["data"] == {"detected": False}


def test_dsn_from_the_environment(pg_dsn: str) -> None:
    result = run_doctor(env={"GREENPOOL_DSN": pg_dsn})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok   server: $GREENPOOL_DSN " in result.stdout


def test_mysql_basics(mysql_params: dict[str, Any]) -> None:
    url = os.environ.get("GREENPOOL_TEST_MYSQL", "").strip() or "mysql://root@127.0.0.1:3306/test"
    document = report(run_doctor("--mysql", url, "--json"))
    assert document["exit_status"] == 0, document
    first = findings(document, "mysql")[0]
    assert first["level"] == "ok" and first["data"]["max_connections"] > 0
    assert first["data"]["address"] == f"{mysql_params['host']}:{urlsplit(url).port or 3306}"


def test_unreachable_mysql_fails() -> None:
    result = run_doctor("--mysql", f"mysql://root@127.0.0.1:{free_port()}/test")
    assert result.returncode == 1
    (line,) = lines(result, "FAIL")
    assert line.startswith("FAIL mysql: --mysql mysql://root@127.0.0.1:") and "unreachable" in line


# ---------------------------------------------------------------- Celery apps


def test_gevent_app_with_a_pool_larger_than_the_server_allows_fails(pg_dsn: str, monitor: Any, tmp_path: Path) -> None:
    huge = 100_000
    write_app(tmp_path, "doctor_big_app", pg_dsn, pool_size=huge, concurrency=50)
    result = run_doctor("--app", "doctor_big_app", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    usable = usable_connections(monitor)
    (line,) = lines(result, "FAIL")
    assert line.startswith(f"FAIL server: one worker's pools may open {huge + 2} connections")
    assert f"accepts {usable} (max_connections " in line
    assert f"lower max_size (at most {usable} in all per process, for this worker alone" in line
    # It checked the worker as it would run: re-executed with --pool gevent, patched before the app.
    assert "ok   gevent: the process is monkey-patched (worker_pool = 'gevent' in the configuration" in result.stdout
    assert "ok   psycopg: imported after gevent patched the process" in result.stdout
    assert f"warn pool: 'tasks' may open {huge} connections, but a gevent worker of concurrency 50" in result.stdout

    document = report(run_doctor("--app", "doctor_big_app", "--json", cwd=tmp_path))
    (fail,) = [f for f in document["findings"] if f["level"] == "FAIL"]
    assert fail["data"]["planned"] == huge + 2 and fail["data"]["available"] == usable


def test_good_gevent_app_is_ok(pg_dsn: str, tmp_path: Path) -> None:
    write_app(tmp_path, "doctor_good_app", pg_dsn, pool_size=5, concurrency=10)
    result = run_doctor("--app", "doctor_good_app", "--strict", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines(result, "warn") == lines(result, "FAIL") == []
    out = result.stdout
    assert "ok   celery: app 'doctor_good_app': task pool gevent" in out and "concurrency 10" in out
    assert "ok   pool: 'tasks' (psycopg, 1-5) on postgresql, registered" in out
    assert "(peewee, 0-2) on postgresql, registered" in out
    assert "ok   pool: one worker may open 7 connections" in out
    assert "ok   server: one worker's pools may open 7 of the " in out


def test_prefork_plans_a_pool_per_child(pg_dsn: str, tmp_path: Path) -> None:
    write_app(tmp_path, "doctor_prefork_app", pg_dsn, pool_size=1, concurrency=10)
    document = report(run_doctor("--app", "doctor_prefork_app", "--pool", "prefork", "-c", "4", "--json", cwd=tmp_path))
    celery = findings(document, "celery")[0]["data"]
    assert (celery["task_pool"], celery["concurrency"], celery["processes"]) == ("prefork", 4, 4)
    planned = [f for f in findings(document, "pool") if "planned" in f["data"]]
    assert planned[0]["data"]["planned"] == 4 * (1 + 2)
    # The Peewee database's max_connections=2 is more than a prefork child uses at once.
    assert any("uses at most 1 at once per process" in f["message"] for f in findings(document, "pool", "warn"))


def test_mysql_database_of_an_app(pg_dsn: str, mysql_params: dict[str, Any], tmp_path: Path) -> None:
    """A pooled MySQL database is checked against its own server, apart from the PostgreSQL pools."""
    params = {k: v for k, v in mysql_params.items() if k != "database"}
    extra = (
        "from greenpool.peewee import PooledMySQLDatabase\n"
        f"mdb = PooledMySQLDatabase({mysql_params.get('database', 'test')!r}, max_connections=3, **{params!r})\n"
        "greenpool.celery.setup(app, pool, db, mdb)"
    )
    write_app(tmp_path, "doctor_mysql_app", pg_dsn, pool_size=5, concurrency=10, extra=extra)
    document = report(run_doctor("--app", "doctor_mysql_app", "--json", "--strict", cwd=tmp_path))
    assert document["exit_status"] == 0, document
    assert "pymysql: sockets patched by gevent: cooperative" in [
        f"pymysql: {f['message']}" for f in findings(document, "pymysql")
    ]
    capacity = [f for f in findings(document, "mysql") if "planned" in f["data"]]
    assert [f["data"]["planned"] for f in capacity] == [3]
    postgres = [f for f in findings(document, "server") if "planned" in f["data"]]
    assert [f["data"]["planned"] for f in postgres] == [5 + 2]


def test_gevent_in_the_configuration_without_setup_fails(pg_dsn: str, tmp_path: Path) -> None:
    write_app(tmp_path, "doctor_bare_app", pg_dsn, pool_size=5, concurrency=10, extra="# no setup()")
    result = run_doctor("--app", "doctor_bare_app", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = lines(result, "FAIL")
    assert line.startswith("FAIL gevent: the worker runs the gevent task pool") and "-P gevent" in line
    assert "greenpool.celery.setup() was not called" in result.stdout
    assert "'tasks' (psycopg, 1-5) on postgresql is in the app's module but not registered" in result.stdout


def test_an_app_that_cannot_be_imported_fails(tmp_path: Path) -> None:
    result = run_doctor("--app", "doctor_no_such_module", cwd=tmp_path)
    assert result.returncode == 1
    (line,) = lines(result, "FAIL")
    assert line.startswith("FAIL celery: --app doctor_no_such_module: can't load the app: ModuleNotFoundError")


def test_integration_registry() -> None:
    code = """
from celery import Celery
from greenpool.celery import setup
from greenpool.integrations.celery import integration_for
from greenpool.engine import Pool
from tests.fake_driver import FakeDriver

app, other = Celery("a"), Celery("b")
pool = Pool(FakeDriver(), min_size=0, max_size=2)
assert integration_for(app) is None
first = setup(app, pool)
assert integration_for(app) is first and integration_for(other) is None
second = setup(app)
assert integration_for(app) is second
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=str(REPO_ROOT),
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        timeout=60,
    )
    assert result.stdout.strip() == "ok", result.stderr


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--concurrency", "0"], "--concurrency"),
        (["-c", "many"], "--concurrency"),
        (["--pool", "fibers"], "--pool"),
        (["--timeout", "-1"], "--timeout"),
        (["--dsn", "host=x = ="], "--dsn"),
        (["--mysql", "http://127.0.0.1/test"], "--mysql"),
        (["--mysql", "mysql://root@127.0.0.1:port/test"], "--mysql"),
    ],
)
def test_bad_input_is_one_line_naming_the_option(args: list[str], option: str) -> None:
    result = run_doctor(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("python -m greenpool doctor: error: ") and option in line


def test_bad_dsn_in_the_environment_names_it() -> None:
    result = run_doctor(env={"GREENPOOL_DSN": "nonsense = ="})
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert "$GREENPOOL_DSN is not a libpq connection string" in line

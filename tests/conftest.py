"""Shared fixtures: database endpoints, the fault-injection proxy, and
a subprocess runner for import-order tests.

Environment variables (all optional):

``GREENPOOL_TEST_DSN``
    libpq DSN of a PostgreSQL to test against. Unset: an embedded server
    (``greenpool.testing.embedded``, needs ``pip install 'greenpool[embedded]'``).
``GREENPOOL_TEST_MYSQL``
    ``mysql://user:password@host:port/db``; default probes
    ``mysql://root@127.0.0.1:3306/test``.
``GREENPOOL_TEST_REDIS``, ``GREENPOOL_TEST_AMQP``
    the Celery tests' brokers; default ``redis://127.0.0.1:6379/0`` and
    ``amqp://guest:guest@127.0.0.1:5672//``.
``CI``
    when true, a missing service fails the test instead of skipping it, and
    any skipped test fails the session: CI must exercise everything.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

import pytest
from helpers import unique

from greenpool.testing.proxy import Proxy, parse_dsn_host_port

REPO_ROOT = Path(__file__).resolve().parent.parent

_PG_HINT = "needs PostgreSQL: set GREENPOOL_TEST_DSN or pip install 'greenpool[embedded]'"


def in_ci() -> bool:
    """True when running under CI (``CI`` set to a true value, as CI systems do)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test locally; fail it in CI, where every service must be there."""
    if in_ci():
        pytest.fail(f"{reason} (failing instead of skipping because CI is set)", pytrace=False)
    pytest.skip(reason)


def tcp_reachable(host: str, port: int, timeout: float = 3.0) -> str | None:
    """None if a TCP connect succeeds, else the error text."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return str(exc) or type(exc).__name__


def _redact(url: str) -> str:
    """*url* with its password masked, for messages that end up in CI logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _redact_dsn(dsn: str) -> str:
    """libpq *dsn* with its password masked."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - only used to build an error message
        return "<unparsable DSN>"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo("", **params)


# --------------------------------------------------------------------------
# Services
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """libpq DSN of the PostgreSQL under test (``GREENPOOL_TEST_DSN`` or embedded)."""
    dsn = os.environ.get("GREENPOOL_TEST_DSN", "").strip()
    try:
        import psycopg
    except ImportError:
        skip_or_fail(f"{_PG_HINT} (psycopg is not installed)")
    if not dsn:
        from greenpool.testing.embedded import embedded_dsn

        try:
            return embedded_dsn()
        except RuntimeError as exc:
            skip_or_fail(f"{_PG_HINT} ({exc})")
    try:
        # Probe once here so a wrong DSN yields one clear message instead of
        # an error in every test.
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            conn.execute("select 1")
    except psycopg.Error as exc:
        skip_or_fail(f"{_PG_HINT} (GREENPOOL_TEST_DSN={_redact_dsn(dsn)!r} does not work: {exc})")
    return dsn


@pytest.fixture
def monitor(pg_dsn: str) -> Iterator[Any]:
    """A plain autocommit psycopg connection to ``pg_dsn``, outside any pool."""
    import psycopg

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def read_only_role(monitor: Any) -> Iterator[str]:
    """A role whose sessions are read-only, as on a standby or a demoted primary."""
    role = unique("gp_ro")
    monitor.execute(f"create role {role} login")
    monitor.execute(f"alter role {role} set default_transaction_read_only = on")
    monitor.execute(f"grant create, usage on schema public to {role}")
    yield role
    monitor.execute("select pg_terminate_backend(pid) from pg_stat_activity where usename = %s", [role])
    monitor.execute(f"drop owned by {role}")
    monitor.execute(f"drop role {role}")


def _mysql_params_from_url(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    if parts.scheme not in ("mysql", "mariadb", "mysql+pymysql"):
        raise ValueError(f"GREENPOOL_TEST_MYSQL must be a mysql:// URL, not {_redact(url)!r}")
    params: dict[str, Any] = {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 3306,
        "user": unquote(parts.username) if parts.username else "root",
        "password": unquote(parts.password) if parts.password else "",
    }
    database = parts.path.lstrip("/")
    if database:
        params["database"] = unquote(database)
    return params


@pytest.fixture(scope="session")
def mysql_params() -> dict[str, Any]:
    """``pymysql.connect()`` keyword arguments for the MariaDB/MySQL under test."""
    url = os.environ.get("GREENPOOL_TEST_MYSQL", "").strip() or "mysql://root@127.0.0.1:3306/test"
    hint = "needs MariaDB/MySQL: start one on 127.0.0.1:3306 (root, db test) or set GREENPOOL_TEST_MYSQL"
    try:
        import pymysql
    except ImportError:
        skip_or_fail(f"{hint} (pymysql is not installed)")
    try:
        params = _mysql_params_from_url(url)
    except ValueError as exc:
        skip_or_fail(str(exc))
    try:
        pymysql.connect(connect_timeout=5, **params).close()
    except pymysql.Error as exc:
        skip_or_fail(f"{hint} ({_redact(url)}: {exc})")
    return params


# --------------------------------------------------------------------------
# Fault-injection proxy
# --------------------------------------------------------------------------


@pytest.fixture
def make_proxy(pg_dsn: str) -> Iterator[Callable[..., Proxy]]:
    """Factory: ``make_proxy(connect_delay=0.0)`` starts a :class:`Proxy` in
    front of ``pg_dsn``'s server; ``proxy.dsn(pg_dsn)`` connects through it.
    All proxies are stopped at teardown."""
    host, port = parse_dsn_host_port(pg_dsn)
    proxies: list[Proxy] = []

    def factory(connect_delay: float = 0.0) -> Proxy:
        proxy = Proxy(host, port, connect_delay=connect_delay)
        proxies.append(proxy)
        return proxy.start()

    yield factory
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def proxy(make_proxy: Callable[..., Proxy]) -> Proxy:
    """A started :class:`Proxy` (no connect delay) in front of ``pg_dsn``'s server."""
    return make_proxy()


# --------------------------------------------------------------------------
# Subprocess runner
# --------------------------------------------------------------------------


@pytest.fixture
def run_python(request: pytest.FixtureRequest) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_python(code, env=None, timeout=60)``: run ``python -c code`` in a
    fresh interpreter (for import-order / monkey-patching tests).

    The child imports greenpool from this checkout, gets ``GREENPOOL_TEST_DSN``
    set to ``pg_dsn`` (resolved lazily, so tests not touching PostgreSQL don't
    need it: pass ``env={"GREENPOOL_TEST_DSN": ""}`` to opt out), and *env*
    entries override the inherited environment (``None`` values remove
    variables). Returns the :class:`subprocess.CompletedProcess` with text
    ``stdout``/``stderr``; the exit status is not checked.
    """

    def run(
        code: str, env: Mapping[str, str | None] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        child_env = dict(os.environ)
        overrides = dict(env or {})
        if "GREENPOOL_TEST_DSN" not in overrides:
            child_env["GREENPOOL_TEST_DSN"] = request.getfixturevalue("pg_dsn")
        for key, value in overrides.items():
            if value is None:
                child_env.pop(key, None)
            else:
                child_env[key] = value
        # Same greenpool as this process, installed or not.
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), child_env.get("PYTHONPATH", "")) if p)
        return subprocess.run(
            [sys.executable, "-c", code],
            env=child_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(REPO_ROOT),
        )

    return run


# --------------------------------------------------------------------------
# CI: no skipped tests
# --------------------------------------------------------------------------

_skipped: list[str] = []


def _record_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    # xfail outcomes are reported as "skipped" too, but they are expected.
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid or "<collection>")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count skips at setup/call time (``pytest.skip``, skip markers, fixtures)."""
    _record_skip(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """Count skips at collection time (module-level ``pytest.importorskip``)."""
    _record_skip(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI, turn a session with skipped tests into a failure."""
    if not in_ci() or not _skipped:
        return
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"CI is set and {len(_skipped)} test(s) were skipped; failing the session:"]
    lines += [f"  {nodeid}" for nodeid in _skipped]
    if reporter is not None:
        reporter.ensure_newline()
        reporter.section("skipped tests are failures in CI", sep="=", red=True, bold=True)
        for line in lines:
            reporter.write_line(line, red=True)
    else:
        print("\n".join(lines), file=sys.stderr)

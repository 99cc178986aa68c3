"""Tests for greenpool.testing.proxy: relaying, connect delay, connection kills,
pause/resume, DSN rewriting, and the controller under gevent monkey-patching."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from greenpool.testing.proxy import Proxy, parse_dsn_host_port

REPO_ROOT = Path(__file__).resolve().parent.parent

MakeProxy = Callable[..., Proxy]
RunPython = Callable[..., "subprocess.CompletedProcess[str]"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _process_gone(pid: int) -> bool:
    """True if *pid* has exited (a zombie nobody reaped counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Field 3 is the state; the command name before it may contain spaces.
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _process_gone(pid):
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------
# Relaying
# --------------------------------------------------------------------------


def test_relays_queries(proxy: Proxy, pg_dsn: str) -> None:
    with psycopg.connect(proxy.dsn(pg_dsn)) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        # Big payloads both ways exercise buffering and flow control.
        blob = "x" * 3_000_000
        assert conn.execute("select length(%s::text)", (blob,)).fetchone() == (len(blob),)
        row = conn.execute("select repeat('y', 5000000)").fetchone()
        assert row is not None and len(row[0]) == 5_000_000
        assert conn.execute("select inet_server_port()").fetchone() == (parse_dsn_host_port(pg_dsn)[1],)
    assert proxy.stats()["accepted"] == 1


def test_many_concurrent_connections(proxy: Proxy, pg_dsn: str) -> None:
    conns = [psycopg.connect(proxy.dsn(pg_dsn)) for _ in range(5)]
    try:
        for i, conn in enumerate(conns):
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
        assert proxy.stats()["active"] == 5
    finally:
        for conn in conns:
            conn.close()


def test_target_down_fails_fast() -> None:
    with Proxy("127.0.0.1", _free_port()) as proxy:
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(f"host=127.0.0.1 port={proxy.port} user=x dbname=x connect_timeout=10")
        assert time.monotonic() - started < 5


# --------------------------------------------------------------------------
# Fault injection
# --------------------------------------------------------------------------


def test_connect_delay(make_proxy: MakeProxy, pg_dsn: str) -> None:
    proxy = make_proxy(connect_delay=0.3)
    started = time.monotonic()
    with psycopg.connect(proxy.dsn(pg_dsn)) as conn:
        assert time.monotonic() - started >= 0.3
        # Only connecting is delayed, not traffic on an established connection.
        started = time.monotonic()
        conn.execute("select 1")
        assert time.monotonic() - started < 0.25


def test_set_connect_delay(proxy: Proxy, pg_dsn: str) -> None:
    proxy.set_connect_delay(0.4)
    assert proxy.connect_delay == 0.4
    started = time.monotonic()
    psycopg.connect(proxy.dsn(pg_dsn)).close()
    assert time.monotonic() - started >= 0.4
    proxy.set_connect_delay(0)
    started = time.monotonic()
    psycopg.connect(proxy.dsn(pg_dsn)).close()
    assert time.monotonic() - started < 0.4
    with pytest.raises(ValueError):
        proxy.set_connect_delay(-1)


def test_kill_connections(proxy: Proxy, pg_dsn: str) -> None:
    conn = psycopg.connect(proxy.dsn(pg_dsn))
    try:
        conn.execute("select 1")
        assert proxy.kill_connections() == 1
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
        assert conn.broken or conn.closed
    finally:
        conn.close()
    # The proxy itself keeps working.
    with psycopg.connect(proxy.dsn(pg_dsn)) as conn2:
        assert conn2.execute("select 2").fetchone() == (2,)
    stats = proxy.stats()
    assert stats["killed"] == 1 and stats["active"] == 0
    assert proxy.kill_connections() == 0


def test_kill_sends_rst_and_covers_delayed_clients(make_proxy: MakeProxy) -> None:
    proxy = make_proxy(connect_delay=30)
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
        # The client is accepted but still waiting out the delay.
        deadline = time.monotonic() + 5
        while proxy.stats()["active"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.kill_connections() == 1
        with pytest.raises(ConnectionResetError):
            sock.recv(1)


def test_pause_resume(proxy: Proxy, pg_dsn: str) -> None:
    dsn = proxy.dsn(pg_dsn)
    port = proxy.port
    established = psycopg.connect(dsn)
    try:
        proxy.pause()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((proxy.host, port), timeout=5).close()
        with pytest.raises(psycopg.OperationalError, match="(?i)refused"):
            psycopg.connect(dsn, connect_timeout=5)
        # Pausing refuses new connections only.
        assert established.execute("select 1").fetchone() == (1,)
        proxy.resume()
        assert proxy.port == port
        with psycopg.connect(dsn) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        proxy.resume()  # resuming a listening proxy is harmless
        proxy.pause()
        proxy.pause()  # so is pausing twice
        proxy.resume()
        psycopg.connect(dsn).close()
    finally:
        established.close()


# --------------------------------------------------------------------------
# Lifecycle
# --------------------------------------------------------------------------


def test_lifecycle() -> None:
    proxy = Proxy("127.0.0.1", 9)
    with pytest.raises(RuntimeError):
        proxy.port  # noqa: B018 - the property access is the test
    with pytest.raises(RuntimeError):
        proxy.kill_connections()
    with proxy as started:
        assert started is proxy and proxy.running
        assert proxy.start() is proxy  # no second child
        port = proxy.port
        pid = proxy._child.pid  # type: ignore[union-attr]
    assert not proxy.running
    assert _wait_gone(pid, 5)
    proxy.stop()  # idempotent
    assert proxy.port == port  # still known, e.g. for error messages
    with pytest.raises(RuntimeError):
        proxy.pause()
    assert "stopped" in repr(proxy)


def test_cli() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "greenpool.testing.proxy", "--target-host", "127.0.0.1", "--target-port", "9"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().startswith("ok port=")
        proc.stdin.write("ping\nbogus\nquit\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "ok pong\n"
        assert proc.stdout.readline().startswith("err unknown command")
        assert proc.stdout.readline() == "ok bye\n"
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_child_exits_when_parent_dies(run_python: RunPython) -> None:
    code = """
        import os
        from greenpool.testing.proxy import Proxy
        p = Proxy("127.0.0.1", 9).start()
        print(p._child.pid, flush=True)
        os._exit(0)  # no stop(), no atexit: only the pipe EOF is left
    """
    result = run_python(textwrap.dedent(code), env={"GREENPOOL_TEST_DSN": ""})
    assert result.returncode == 0, result.stderr
    assert _wait_gone(int(result.stdout.strip()), 5)


def test_child_exits_when_parent_dies_after_forking(run_python: RunPython) -> None:
    # A forked grandchild (celery prefork, multiprocessing) inherits the
    # control pipe, so EOF never comes; the parent-pid watch must catch it.
    code = """
        import os, time
        from greenpool.testing.proxy import Proxy
        p = Proxy("127.0.0.1", 9).start()
        pid = os.fork()
        if pid == 0:
            # Let go of the output pipes so run_python() returns right away.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            time.sleep(30)
            os._exit(0)
        print(p._child.pid, pid, flush=True)
        os._exit(0)
    """
    result = run_python(textwrap.dedent(code), env={"GREENPOOL_TEST_DSN": ""})
    assert result.returncode == 0, result.stderr
    proxy_pid, grandchild_pid = map(int, result.stdout.split())
    try:
        assert _wait_gone(proxy_pid, 8)
    finally:
        try:
            os.kill(grandchild_pid, 9)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------
# gevent
# --------------------------------------------------------------------------

# Nothing that imports ssl (psycopg imports asyncio, which does) may run
# before the patch, or gevent rightly warns; so the target comes in via env.
_GEVENT_SCRIPT = """
import os, time
{before}
from greenpool.testing.proxy import Proxy

proxy = Proxy(os.environ["TARGET_HOST"], int(os.environ["TARGET_PORT"])).start()
{after}
import gevent
import psycopg
from gevent import monkey
assert monkey.is_module_patched("socket")
dsn = proxy.dsn(os.environ["GREENPOOL_TEST_DSN"])

def query(i):
    with psycopg.connect(dsn) as conn:
        for _ in range(20):
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
            gevent.sleep(0)

def poke():
    for _ in range(20):
        proxy.stats()
        gevent.sleep(0)

gevent.joinall([gevent.spawn(query, i) for i in range(3)] + [gevent.spawn(poke)], raise_error=True)

conn = psycopg.connect(dsn)
assert proxy.kill_connections() == 1
try:
    conn.execute("select 1")
except psycopg.OperationalError:
    pass
else:
    raise AssertionError("query on a killed connection succeeded")

proxy.set_connect_delay(0.2)
t = time.monotonic()
psycopg.connect(dsn).close()
assert time.monotonic() - t >= 0.2
proxy.set_connect_delay(0)
proxy.pause()
try:
    psycopg.connect(dsn, connect_timeout=5)
except psycopg.OperationalError:
    pass
else:
    raise AssertionError("connected to a paused proxy")
proxy.resume()
psycopg.connect(dsn).close()
proxy.stop()
print("OK")
"""


@pytest.mark.parametrize("when", ["before-start", "after-start"])
def test_controller_under_gevent(run_python: RunPython, pg_dsn: str, when: str) -> None:
    patch = "from gevent import monkey; monkey.patch_all()"
    if when == "before-start":
        code = _GEVENT_SCRIPT.format(before=patch, after="")
    else:  # started in a plain process, used after patching
        code = _GEVENT_SCRIPT.format(before="", after=patch)
    host, port = parse_dsn_host_port(pg_dsn)
    result = run_python(code, env={"TARGET_HOST": host, "TARGET_PORT": str(port)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("OK")
    # Importing greenpool.testing.proxy must not import ssl behind gevent's back.
    assert "MonkeyPatchWarning" not in result.stderr, result.stderr


# --------------------------------------------------------------------------
# DSN helpers
# --------------------------------------------------------------------------

_HOST_PORT_CASES = [
    ("host=db.example port=6543 dbname=x", ("db.example", 6543)),
    ("host=db.example dbname='a b'", ("db.example", 5432)),
    ("postgresql://u:p@h:5433/db?sslmode=disable", ("h", 5433)),
    ("postgres://h/db", ("h", 5432)),
    ("postgresql://u@[::1]:7000/db", ("::1", 7000)),
    ("postgresql:///db?host=qh&port=7001", ("qh", 7001)),
    ("host=a,b port=1,2", ("a", 1)),
    ("hostaddr=10.0.0.1 host=name port=99", ("10.0.0.1", 99)),
]


@pytest.fixture(params=["psycopg", "fallback"])
def dsn_parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run DSN tests with libpq's parser and with the pure-Python fallback."""
    if request.param == "fallback":
        # A None entry makes `from psycopg.conninfo import ...` raise ImportError.
        monkeypatch.setitem(sys.modules, "psycopg.conninfo", None)
    return str(request.param)


@pytest.mark.parametrize(("dsn", "expected"), _HOST_PORT_CASES)
def test_parse_dsn_host_port(dsn_parser: str, dsn: str, expected: tuple[str, int]) -> None:
    assert parse_dsn_host_port(dsn) == expected


def test_parse_dsn_host_port_defaults(dsn_parser: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGHOST", raising=False)
    monkeypatch.delenv("PGPORT", raising=False)
    assert parse_dsn_host_port("dbname=x") == ("localhost", 5432)
    monkeypatch.setenv("PGHOST", "envhost")
    monkeypatch.setenv("PGPORT", "6000")
    assert parse_dsn_host_port("dbname=x") == ("envhost", 6000)
    assert parse_dsn_host_port("host=h dbname=x") == ("h", 6000)
    with pytest.raises(ValueError):
        parse_dsn_host_port("host=/var/run/postgresql")


def test_dsn_rewrite(dsn_parser: str) -> None:
    with Proxy("127.0.0.1", 9) as proxy:
        for base in (
            "host=db.example port=6543 user=u dbname='my db' application_name=x",
            "postgresql://u@db.example:6543/my%20db?application_name=x",
            "hostaddr=10.1.1.1 host=db.example port=6543 user=u dbname='my db' application_name=x",
        ):
            rewritten = proxy.dsn(base)
            assert parse_dsn_host_port(rewritten) == ("127.0.0.1", proxy.port)
            assert "hostaddr" not in rewritten
            # Round-trip through libpq's parser when we have it.
            if dsn_parser == "psycopg":
                params = psycopg.conninfo.conninfo_to_dict(rewritten)
                assert params == {
                    "host": "127.0.0.1",
                    "port": str(proxy.port),
                    "user": "u",
                    "dbname": "my db",
                    "application_name": "x",
                }

"""Tests for greenpool.testing.embedded: DSN resolution and the throw-away server's
lifecycle (TCP, cleanup at exit, cleanup when the owner is killed, gevent)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from greenpool.testing import embedded

RunPython = Callable[..., "subprocess.CompletedProcess[str]"]

pytest.importorskip("psycopg")


# --------------------------------------------------------------------------
# resolve_dsn / missing pgserver (no server started)
# --------------------------------------------------------------------------


def test_resolve_dsn_prefers_explicit_then_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "embedded_dsn", lambda: "EMBEDDED")
    monkeypatch.setenv("GP_TEST_VAR", "host=from-env")
    assert embedded.resolve_dsn("host=explicit", "GP_TEST_VAR") == "host=explicit"
    assert embedded.resolve_dsn(None, "GP_TEST_VAR") == "host=from-env"
    assert embedded.resolve_dsn("", "GP_TEST_VAR") == "host=from-env"
    monkeypatch.setenv("GP_TEST_VAR", "  ")
    assert embedded.resolve_dsn(None, "GP_TEST_VAR") == "EMBEDDED"
    monkeypatch.delenv("GP_TEST_VAR")
    assert embedded.resolve_dsn(None, "GP_TEST_VAR") == "EMBEDDED"


def test_missing_pgserver_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend no server is running yet and pgserver is not importable.
    monkeypatch.setattr(embedded, "_server", None)
    monkeypatch.setitem(sys.modules, "pgserver", None)
    monkeypatch.delenv("GP_TEST_VAR", raising=False)
    with pytest.raises(RuntimeError) as excinfo:
        embedded.resolve_dsn(None, "GP_TEST_VAR")
    message = str(excinfo.value)
    assert "GP_TEST_VAR" in message
    assert "pip install 'greenpool[embedded]'" in message
    with pytest.raises(RuntimeError, match=r"pip install 'greenpool\[embedded\]'"):
        embedded.embedded_dsn()
    assert embedded._server is None


# --------------------------------------------------------------------------
# Real servers, each in its own interpreter so cleanup at exit is observable
# --------------------------------------------------------------------------

_REPORT = """
import json, os, time, psycopg
from greenpool.testing import embedded
started = time.monotonic()
dsn = embedded.embedded_dsn()
elapsed = time.monotonic() - started
assert embedded.embedded_dsn() == dsn
with psycopg.connect(dsn) as conn:
    addr, version = conn.execute("select host(inet_server_addr()), current_setting('server_version')").fetchone()
server = embedded._server
print(json.dumps({
    "dsn": dsn, "addr": addr, "version": version, "elapsed": elapsed,
    "dir": server.base_dir, "supervisor": server.child.pid,
    "data_uid": os.stat(os.path.join(server.base_dir, "data")).st_uid,
}), flush=True)
"""


def _run_embedded(run_python: RunPython, code: str) -> dict[str, object]:
    import json

    # An empty GREENPOOL_TEST_DSN keeps run_python from resolving pg_dsn,
    # which would start an embedded server in *this* process for nothing.
    result = run_python(code, env={"GREENPOOL_TEST_DSN": ""}, timeout=180)
    assert result.returncode in (0, -9), result.stdout + result.stderr
    info: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return info


def _gone(path: object, pid: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(str(path)).exists() and not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.05)
    return False


def test_embedded_server_lifecycle(run_python: RunPython) -> None:
    info = _run_embedded(run_python, _REPORT)
    assert info["addr"] == "127.0.0.1"  # TCP, so a proxy can sit in front of it
    assert str(info["dsn"]).startswith("host=127.0.0.1 port=")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        assert info["data_uid"] != 0  # postgres refuses root; we must have switched users
    # The cold start is part of every test session and benchmark run.
    assert float(str(info["elapsed"])) < 30
    print(f"embedded cold start: {float(str(info['elapsed'])):.2f}s")
    # Normal exit: atexit stopped the server and deleted its directory.
    assert _gone(info["dir"], info["supervisor"], 5)


def test_embedded_server_cleaned_up_when_owner_is_killed(run_python: RunPython) -> None:
    code = _REPORT + "import signal; os.kill(os.getpid(), signal.SIGKILL)\n"
    info = _run_embedded(run_python, code)
    assert _gone(info["dir"], info["supervisor"], 20)


@pytest.mark.parametrize("when", ["before-import", "after-start"])
def test_embedded_server_under_gevent(run_python: RunPython, when: str) -> None:
    patch = "from gevent import monkey; monkey.patch_all()\n"
    if when == "before-import":
        code = patch + _REPORT
    else:
        # Started in a plain process, stopped at exit in a patched one.
        code = (
            _REPORT
            + patch
            + textwrap.dedent("""
            import gevent
            gevent.joinall([gevent.spawn(embedded.embedded_dsn) for _ in range(3)], raise_error=True)
        """)
        )
    info = _run_embedded(run_python, code)
    assert _gone(info["dir"], info["supervisor"], 5)

"""`python -m greenpool plan`: the sizing formula (`greenpool.tools.plan`) and its command line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from greenpool.__main__ import main
from greenpool.tools.plan import (
    connections_at_once,
    default_reserved,
    plan_pools,
    planned_connections,
    processes_per_worker,
)

# ---------------------------------------------------------------- the formula


def test_worked_example_direct() -> None:
    """docs/sizing.md: 4 machines x 2 processes x -c 200 gevent against max_connections=100."""
    plan = plan_pools(8, 200, 100)
    assert (plan.reserved, plan.available, plan.processes, plan.at_once) == (10, 90, 8, 200)
    assert (plan.max_size, plan.client_connections, plan.server_connections) == (11, 88, 88)
    assert plan.ok and plan.default_pool_size is None and plan.max_client_conn is None
    assert any("200 tasks share 11 connection(s)" in note for note in plan.notes)


def test_worked_example_behind_pgbouncer() -> None:
    plan = plan_pools(8, 200, 100, pgbouncer=True)
    assert plan.ok
    assert (plan.max_size, plan.client_connections) == (200, 1600)
    assert (plan.max_client_conn, plan.default_pool_size, plan.server_connections) == (1610, 90, 90)
    assert any("1600 tasks share 90 server connections" in note for note in plan.notes)


def test_a_small_fleet_gets_what_it_uses_at_once() -> None:
    plan = plan_pools(1, 10, 400)
    assert (plan.max_size, plan.client_connections, plan.notes) == (10, 10, [])
    assert plan_pools(2, 10, 400, task_pool="threads").max_size == 10
    # Behind PgBouncer, the server never needs more than the tasks running at once.
    assert plan_pools(1, 10, 400, pgbouncer=True).default_pool_size == 10


def test_prefork_children_have_pools_of_their_own() -> None:
    plan = plan_pools(2, 8, 100, task_pool="prefork")
    assert (plan.processes, plan.at_once, plan.max_size, plan.client_connections) == (16, 1, 1, 16)
    assert plan.ok
    too_many = plan_pools(8, 20, 100, task_pool="prefork")
    assert not too_many.ok and too_many.client_connections == 160
    assert "160 process(es) x max_size 1 = 160 connections exceed the 90" in too_many.problems[0]
    assert "even one connection per process is too many" in too_many.problems[0]
    behind = plan_pools(8, 20, 100, task_pool="prefork", pgbouncer=True)
    assert behind.ok and (behind.max_size, behind.max_client_conn, behind.default_pool_size) == (1, 170, 90)


def test_a_given_max_size_is_checked() -> None:
    plan = plan_pools(8, 200, 100, max_size=20)
    assert not plan.ok and plan.client_connections == 160
    assert "lower max_size to 11" in plan.problems[0]
    assert plan_pools(8, 200, 100, max_size=11).ok
    wasteful = plan_pools(1, 10, 400, max_size=50)
    assert wasteful.ok and "max_size = 10 is enough" in wasteful.notes[0]


def test_reserved() -> None:
    assert [default_reserved(m) for m in (1, 20, 30, 31, 100, 400)] == [3, 3, 3, 4, 10, 40]
    plan = plan_pools(8, 200, 100, reserved=4)
    assert (plan.available, plan.max_size) == (96, 12)
    assert plan_pools(1, 1, 10, reserved=0).available == 10


def test_shared_helpers() -> None:
    assert processes_per_worker("prefork", 8) == 8 and processes_per_worker("gevent", 200) == 1
    assert connections_at_once("prefork", 8) == 1 and connections_at_once("solo", 8) == 1
    assert connections_at_once("threads", 8) == 8
    assert planned_connections("prefork", 4, [2, 3]) == 20
    assert planned_connections("gevent", 100, [20, 5]) == 25


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"workers": 0}, ValueError, "workers"),
        ({"workers": "8"}, TypeError, "workers"),
        ({"concurrency": True}, TypeError, "concurrency"),
        ({"server_max_connections": 0}, ValueError, "server_max_connections"),
        ({"task_pool": "eventlet"}, ValueError, "task_pool"),
        ({"reserved": -1}, ValueError, "reserved"),
        ({"reserved": 100}, ValueError, "reserved"),
        ({"max_size": 0}, ValueError, "max_size"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs: dict[str, object], error: type[Exception], name: str) -> None:
    args: dict[str, object] = {"workers": 8, "concurrency": 200, "server_max_connections": 100}
    args.update(kwargs)
    with pytest.raises(error, match=name):
        plan_pools(**args)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the command line


def test_cli_direct(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--workers", "8", "--concurrency", "200", "--server-max-connections", "100"]) == 0
    out = capsys.readouterr().out
    assert "max_size = 11" in out and "total: 8 x 11 = 88 connections (of 90)" in out
    assert "default_pool_size" not in out and "warn:" not in out


def test_cli_pgbouncer(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--workers", "8", "-c", "200", "--server-max-connections", "100", "--pgbouncer"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "max_size = 200" in out
    assert "max_client_conn = 1610" in out and "default_pool_size = 90" in out


def test_cli_totals_over_the_server_exit_non_zero(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--workers", "8", "-c", "20", "--server-max-connections", "100", "--pool", "prefork"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "warn: 160 process(es) x max_size 1 = 160 connections exceed the 90" in out
    argv = ["plan", "--workers", "8", "-c", "200", "--server-max-connections", "100", "--max-size", "20"]
    assert main(argv) == 1
    assert "lower max_size to 11" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--concurrency", "200", "--server-max-connections", "100"], "--workers"),
        (["--workers", "x", "-c", "200", "--server-max-connections", "100"], "--workers"),
        (["--workers", "0", "-c", "200", "--server-max-connections", "100"], "--workers"),
        (["--workers", "8", "-c", "-3", "--server-max-connections", "100"], "--concurrency"),
        (["--workers", "8", "-c", "200"], "--server-max-connections"),
        (["--workers", "8", "-c", "200", "--server-max-connections", "100", "--pool", "eventlet"], "--pool"),
        (["--workers", "8", "-c", "200", "--server-max-connections", "100", "--reserved", "100"], "--reserved"),
        (["--workers", "8", "-c", "200", "--server-max-connections", "100", "--reserved", "-1"], "--reserved"),
        (["--workers", "8", "-c", "200", "--server-max-connections", "100", "--max-size", "0"], "--max-size"),
    ],
)
def test_cli_bad_input_is_one_line_naming_the_option(args: list[str], option: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "greenpool", "plan", *args],
        capture_output=True,
        text=True,
        cwd=str(REPO_ROOT),
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        timeout=60,
    )
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("python -m greenpool plan: error: ") and option in line

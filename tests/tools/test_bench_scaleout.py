"""The benchmark's ``scaleout`` scenario (`greenpool.bench.scaleout`): its plan, its report, and one tiny real run.

The plan and the report need no server. The real run is the CLI's
``--scenario scaleout --quick`` on the server under test, with real Celery
worker processes (on the default filesystem broker) and a real PgBouncer (``apt-get install pgbouncer``: without it the
test skips, or fails in CI); it checks the run's shape and the one target a
loaded machine can't spoil: through PgBouncer the server never sees more than
its pool size. Throughput figures are not checked here.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import skip_or_fail

from greenpool.bench import document, planning, report, scaleout, scenarios
from greenpool.bench.runner import RunResult

REPO_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- plan


def test_scaleout_is_out_of_the_default_run_and_in_full_and_quick() -> None:
    assert "scaleout" not in [e.scenario.name for e in planning.make_plan(planning.DEFAULT)]
    full = {e.scenario.name: e for e in planning.make_plan(planning.FULL)}["scaleout"]
    assert (full.scenario.processes, full.scenario.pool_size, full.scenario.greenlets) == ((1, 2, 4), 10, 50)
    assert (full.scenario.sql, full.scenario.duration) == ("select pg_sleep(0.02)", 5.0)
    assert full.contenders == ("greenpool",) and full.rounds == 3
    assert [p.name for p in full.scenario.phases] == [
        "direct x1",
        "direct x2",
        "direct x4",
        "pgbouncer x1",
        "pgbouncer x2",
        "pgbouncer x4",
    ]
    assert full.runs == 18
    quick = {e.scenario.name: e for e in planning.make_plan(planning.QUICK)}["scaleout"]
    assert (quick.scenario.processes, quick.scenario.pool_size, quick.scenario.duration) == ((1, 2), 4, 1.0)
    assert quick.runs == 4


def test_scenario_option_runs_it_at_full_size_with_greenpool_only() -> None:
    (entry,) = planning.make_plan(planning.DEFAULT, scenarios=["scaleout"])
    assert entry.scenario == scenarios.SCENARIOS["scaleout"].full
    assert entry.contenders == ("greenpool",) and entry.rounds == 2
    # Another pool can't take part, even when named.
    (entry,) = planning.make_plan(planning.DEFAULT, scenarios=["scaleout"], contenders=["psycopg_pool"])
    assert entry.contenders == () and entry.runs == 0
    assert scenarios.SCENARIOS["scaleout"].full.is_scaleout
    assert not scenarios.SCENARIOS["steady"].full.is_scaleout
    assert "1, 2, 4 Celery worker processes (-P gevent -c 50, P=10 connections each)" in (
        scenarios.SCENARIOS["scaleout"].full.describe()
    )


def test_route_of() -> None:
    assert scaleout.route_of("pgbouncer x4") == ("pgbouncer", 4)
    assert scaleout.route_of("direct x1") == ("direct", 1)


# ---------------------------------------------------------------- report


def _run(phase: str, round_no: int, qps: float, peak: int, busy: float = 0.5) -> RunResult:
    route, processes = scaleout.route_of(phase)
    result = RunResult("scaleout", phase, "greenpool", round_no, ok=True, qps=qps, p50_ms=10.0, p99_ms=20.0)
    result.extra = {
        "route": route,
        "processes": processes,
        "server_peak": peak,
        "server_cap": 10 * (processes if route == "direct" else 1),
        "cpu_busy": busy,
        "workers_cores": 0.4,
        "pgbouncer_cores": 0.1 if route == "pgbouncer" else None,
        "server_cores": 0.3,
        "other_cores": 0.2,
        "load1": 1.5,
    }
    return result


def _results(bouncer_x4: float, busy: float = 0.5, peak: int = 10) -> list[RunResult]:
    scenario = scenarios.SCENARIOS["scaleout"].full
    results = []
    for round_no in (1, 2):
        for phase in scenario.phases:
            route, n = scaleout.route_of(phase.name)
            qps = 1000.0 * (n if route == "direct" else 1)
            if phase.name == "pgbouncer x4":
                qps = bouncer_x4
            server = 10 * n if route == "direct" else peak
            results.append(_run(phase.name, round_no, qps, server, busy))
    return results


def test_report_table_and_targets_met() -> None:
    scenario = scenarios.SCENARIOS["scaleout"].full
    text = scaleout.report_scaleout(scenario, _results(950.0), ["greenpool"])
    lines = text.splitlines()
    assert lines[0].split()[:6] == ["route", "processes", "server", "conns", "tasks/s", "vs"]
    rows = {tuple(line.split()[:2]): line.split() for line in lines[1:7]}
    assert rows[("direct", "4")][2:6] == ["40", "/", "40", "4000"]
    assert rows[("pgbouncer", "4")][2:7] == ["10", "/", "10", "950", "0.95x"]
    assert "target: through PgBouncer the server saw at most 10 connections (default_pool_size 10): met" in lines
    assert "target: pgbouncer x4 / direct x1 = 0.95 (>= 0.9): met" in lines


def test_report_says_when_a_target_is_missed_and_why() -> None:
    scenario = scenarios.SCENARIOS["scaleout"].full
    lines = scaleout.verdict(scenario, _results(700.0, busy=0.98, peak=11))
    assert lines[0].endswith("saw at most 11 connections (default_pool_size 10): NOT met")
    assert lines[1].startswith("target: pgbouncer x4 / direct x1 = 0.70 (>= 0.9): NOT met; the machine's")
    assert "98 % busy (workers 0.40, pgbouncer 0.10, server 0.30, other 0.20 cores): CPU-bound" in lines[1]
    # Below the bar on an idle machine: no excuse given.
    assert "CPU-bound" not in scaleout.verdict(scenario, _results(700.0, busy=0.4))[1]
    assert scaleout.verdict(scenario, [r for r in _results(950.0) if r.extra["route"] == "direct"]) == [
        "targets: unknown (no PgBouncer run)"
    ]


def test_overview_rows_compare_with_one_direct_process_and_survive_json(tmp_path: Path) -> None:
    scenario = scenarios.SCENARIOS["scaleout"].full
    results = _results(950.0)
    rows = report.overview_rows(scenario, results, ["greenpool"])
    assert [(row.label, round(row.ratio, 2), row.bound) for row in rows] == [
        ("greenpool [direct x1]", 1.0, "direct x1"),
        ("greenpool [direct x2]", 2.0, "direct x1"),
        ("greenpool [direct x4]", 4.0, "direct x1"),
        ("greenpool [pgbouncer x1]", 1.0, "direct x1"),
        ("greenpool [pgbouncer x2]", 1.0, "direct x1"),
        ("greenpool [pgbouncer x4]", 0.95, "direct x1"),
    ]
    from dataclasses import asdict

    saved = tmp_path / "run.json"
    entry = {"scenario": asdict(scenario), "contenders": ["greenpool"], "runs": [asdict(r) for r in results]}
    meta = {"started": "2026-12-07T12:00:00+00:00", "mode": "full"}
    document.write_json(str(saved), {"meta": meta, "scenarios": {"scaleout": entry}})
    assert document.scenario_from_json(json.loads(saved.read_text())["scenarios"]["scaleout"]["scenario"]) == scenario
    saved_rows = document.overview_of(json.loads(saved.read_text()))
    assert [(r.label, round(r.ratio, 2)) for r in saved_rows] == [(r.label, round(r.ratio, 2)) for r in rows]
    markdown = document.markdown(json.loads(saved.read_text()))
    assert "| scaleout | greenpool [pgbouncer x4] | 950 | 20.0 | 0.95x | direct x1 |" in markdown


def test_a_run_line_shows_server_connections_and_cpu() -> None:
    line = scaleout.extra_line(_run("pgbouncer x4", 1, 900.0, 10, 0.97))
    assert line == (
        "    server connections: peak 10 (cap 10); CPU: machine 97 % busy, workers 0.40, pgbouncer 0.10,"
        " server 0.30, other 0.20 cores; load 1.50"
    )


# ---------------------------------------------------------------- one tiny real run


def test_a_tiny_real_run(pg_dsn: str, tmp_path: Path) -> None:
    """``--scenario scaleout --quick``: 1 and 2 processes, direct and through a real PgBouncer, 1 s each."""
    from greenpool.testing.pgbouncer import PgBouncerMissing, find_pgbouncer

    try:
        find_pgbouncer()
    except PgBouncerMissing as exc:
        skip_or_fail(f"needs PgBouncer: {exc}")
    saved = tmp_path / "scaleout.json"
    env = dict(os.environ)
    env.pop("GREENPOOL_DSN", None)
    env.pop("CELERY_BROKER_URL", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "greenpool", "bench", "--scenario", "scaleout", "--quick"]
        + ["--dsn", pg_dsn, "--json", str(saved)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=str(REPO_ROOT),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "plan: quick run, scaleout (1 round): 4 runs" in lines
    started = r"  PgBouncer [\d.]+ on port \d+: pool_mode transaction, default_pool_size 4"
    assert any(re.fullmatch(started, line) for line in lines), done.stdout
    for number, phase in enumerate(["direct x1", "direct x2", "pgbouncer x1", "pgbouncer x2"], 1):
        at = lines.index(f"[{number}/4] scaleout · greenpool · {phase} · round 1/1 ...")
        run_line = r"    [\d.]+ tasks/s; task p50 \d+ ms, p99 \d+ ms; \d+ tasks in [\d.]+ s \(cut\)"
        assert re.fullmatch(run_line, lines[at + 1]), lines[at + 1]
        assert lines[at + 2].startswith("    server connections: peak ")
    target = r"target: through PgBouncer the server saw at most [1-4] connections \(default_pool_size 4\): met"
    assert any(re.fullmatch(target, line) for line in lines), done.stdout
    runs = json.loads(saved.read_text())["scenarios"]["scaleout"]["runs"]
    assert [(r["phase"], r["ok"]) for r in runs] == [
        ("direct x1", True),
        ("direct x2", True),
        ("pgbouncer x1", True),
        ("pgbouncer x2", True),
    ]
    for run in runs:
        extra = run["extra"]
        assert run["queries"] > 0 and run["qps"] > 0
        assert extra["samples"] > 5
        if extra["route"] == "pgbouncer":
            assert 1 <= extra["server_peak"] <= 4
            assert extra["client_pool_size"] == 16
        else:
            assert extra["server_peak"] == 4 * extra["processes"]
            assert extra["client_pool_size"] == 4
        assert extra["cpu_busy"] is None or 0 <= extra["cpu_busy"] <= 1
        assert not math.isnan(extra["workers_cores"])

"""The benchmark's ``celery`` scenario (`greenpool.bench.celery_scenario`): plan, figures, report, real runs.

The plan, the steady-state figures and the report need no server. The real
runs are the CLI's ``--scenario celery --quick`` with real Celery workers
on the server under test: one on Redis (``GREENPOOL_TEST_REDIS``, as a user
passes ``--broker``), one on the default throw-away filesystem broker. They
check the run's shape and that every run succeeded; throughput targets are
the benchmark's business, not asserted here.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import skip_or_fail, tcp_reachable

from greenpool.bench import celery_scenario, planning, report, scenarios
from greenpool.bench.runner import RunResult

REPO_ROOT = Path(__file__).resolve().parents[2]
REDIS = os.environ.get("GREENPOOL_TEST_REDIS", "redis://127.0.0.1:6379/0")
LIGHT, POOL_BOUND = scenarios.CELERY_SETTINGS


# ---------------------------------------------------------------- plan


def test_celery_is_out_of_the_default_run_and_in_full_and_quick() -> None:
    assert "celery" not in [e.scenario.name for e in planning.make_plan(planning.DEFAULT)]
    full = {e.scenario.name: e for e in planning.make_plan(planning.FULL)}["celery"]
    assert (full.scenario.greenlets, full.scenario.pool_size, full.scenario.tasks) == (200, 10, 1000)
    assert full.contenders == scenarios.CELERY_CONTENDERS and full.rounds == 3
    assert [p.name for p in full.scenario.phases] == ["light", "pool-bound"]
    # Five contenders in two kinds of task, and the ceiling, each round.
    assert full.runs == (5 * 2 + 1) * 3
    assert "a Celery worker -P gevent -c 200, P=10 connections" in full.scenario.describe()
    quick = {e.scenario.name: e for e in planning.make_plan(planning.QUICK)}["celery"]
    assert (quick.scenario.greenlets, quick.scenario.pool_size, quick.runs) == (50, 5, 11)


def test_only_the_pools_a_task_would_use_take_part() -> None:
    (entry,) = planning.make_plan(planning.DEFAULT, scenarios=["celery"], contenders=["dedicated", "bare-pool"])
    assert entry.contenders == () and entry.runs == 0
    (entry,) = planning.make_plan(planning.DEFAULT, scenarios=["celery"], contenders=["greenpool"])
    assert entry.contenders == ("greenpool",) and entry.runs == (2 + 1) * 2


def test_the_broker_is_the_option_else_the_environment_else_a_filesystem_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://elsewhere:6379/1")
    assert celery_scenario.open_broker("amqp://h//").url == "amqp://h//"
    from_env = celery_scenario.open_broker(None)
    assert (from_env.url, from_env.source, from_env.folder) == ("redis://elsewhere:6379/1", "$CELERY_BROKER_URL", None)
    monkeypatch.delenv("CELERY_BROKER_URL")
    broker = celery_scenario.open_broker(None)
    try:
        assert broker.url == "filesystem://" and broker.folder and os.path.isdir(broker.folder)
        assert broker.transport_options["data_folder_in"] == broker.folder
        assert broker.describe().startswith(f"filesystem:// in {broker.folder}")
    finally:
        broker.close()
    assert not os.path.exists(broker.folder)


# ---------------------------------------------------------------- figures


def _times(count: int) -> list[tuple[float, ...]]:
    """`count` tasks on one connection, one after the other: task i holds it from i to i + 1."""
    return [(float(i), float(i), i + 1.0, i + 1.0) for i in range(count)]


def test_figures_cover_the_steady_state_between_warm_up_and_drain() -> None:
    from dataclasses import replace

    scenario = replace(scenarios.SCENARIOS["celery"].full, greenlets=2, pool_size=1)
    result = RunResult("celery", "pool-bound", "greenpool", 1)
    celery_scenario._record_run(result, _times(6), scenario, POOL_BOUND, 3, celery_scenario.Waited())
    # Warm-up: the first G = 2 tasks (done at 1, 2); drain: the last 2 (done at 5, 6).
    assert (result.seconds, result.queries, result.qps) == (2.0, 2, 1.0)
    assert (result.p50_ms, result.p99_ms) == (1000.0, 1000.0)
    extra = result.extra or {}
    assert (extra["busy"], extra["hold_ms"], extra["ideal_ms"], extra["cut"]) == (1.0, 1000.0, 2000.0, False)
    assert math.isclose(extra["capacity"], 1 / 0.06)


def test_a_cut_run_counts_up_to_the_cut() -> None:
    from dataclasses import replace

    scenario = replace(scenarios.SCENARIOS["celery"].full, greenlets=2, pool_size=1)
    result = RunResult("celery", "pool-bound", "shared", 1)
    wait = celery_scenario.Waited(cut_at=3.5, first=1.0, last=1.5, seconds=1.0)
    celery_scenario._record_run(result, _times(4), scenario, POOL_BOUND, 3, wait)
    assert (result.seconds, result.queries) == (1.5, 1)
    extra = result.extra or {}
    assert extra["cut"] and extra["busy"] == 1.0 and extra["worker_cores"] == 0.5
    with pytest.raises(RuntimeError, match=r"only 2 tasks done in the time allowed \(warm-up: 2\)"):
        celery_scenario._record_run(result, _times(2), scenario, POOL_BOUND, 3, wait)


# ---------------------------------------------------------------- report


def _run(name: str, setting: str, round_no: int, qps: float, p99_ms: float = 1300.0) -> RunResult:
    result = RunResult("celery", setting, name, round_no, ok=True, qps=qps, p50_ms=p99_ms * 0.9, p99_ms=p99_ms)
    result.extra = {
        "capacity": 10 / 0.06,
        "ideal_ms": 200 / qps * 1000,
        "hold_ms": 63.4,
        "busy": 0.99,
        "query_ms": 20.65,
        "worker_cores": 0.45,
        "cut": name == "shared",
    }
    return result


def _results(greenpool_bound: float, playhouse_light: float) -> list[RunResult]:
    results = []
    for round_no in (1, 2):
        results.append(_run(celery_scenario.CEILING, "light", round_no, 900.0))
        for name, light, bound in (
            ("greenpool", 600.0, greenpool_bound),
            ("psycopg_pool", 520.0, 152.0),
            ("peewee-greenpool", 490.0, 160.0),
            ("peewee-playhouse", playhouse_light, 148.0),
            ("shared", 126.0, 16.0),
        ):
            results.append(_run(name, "light", round_no, light))
            results.append(_run(name, "pool-bound", round_no, bound, 200 / bound * 1000 * 1.02))
    return results


def test_report_table_and_targets() -> None:
    scenario = scenarios.SCENARIOS["celery"].full
    names = list(scenarios.CELERY_CONTENDERS)
    text = celery_scenario.report_celery(scenario, _results(160.0, 414.0), names)
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["tasks", "contender", "tasks/s", "ratio", "rounds"]
    rows = {(line.split()[0], line.split()[1]): line for line in lines[1:12]}
    assert rows[("light", "no")].split()[3] == "900.0"
    assert rows[("light", "greenpool")].split()[2:4] == ["600.0", "0.67x"]
    assert rows[("pool-bound", "greenpool")].split()[2:4] == ["160.0", "0.96x"]
    assert rows[("pool-bound", "shared")].endswith("cut at 15 s in 2/2 rounds")
    assert "target: greenpool pool-bound >= 0.95 x capacity with p99 <= 1.2 x ideal: 0.96x, p99 1.02x: met" in lines
    assert (
        "target: greenpool light: no contender with its API faster (>= 0.97x each in the same round):"
        " lowest 1.15x, vs psycopg_pool: met"
    ) in lines


def test_a_missed_target_says_where_the_rest_goes() -> None:
    scenario = scenarios.SCENARIOS["celery"].full
    names = list(scenarios.CELERY_CONTENDERS)
    lines = celery_scenario.verdict(scenario, _results(155.0, 520.0), names)
    (bound,) = [line for line in lines if line.startswith("target: greenpool pool-bound")]
    assert bound.startswith("target: greenpool pool-bound >= 0.95 x capacity with p99 <= 1.2 x ideal: 0.93x")
    assert ": NOT met; where the rest goes: a query takes 20.65 ms on an idle connection, not 20 (0.97x" in bound
    assert "capacity at most; 0.96x of that reached); a task held" in bound
    assert "a task held its connection 63.4 ms for 61.9 ms of queries" in bound
    assert bound.endswith("connections busy 99.0 % of the time")
    (light,) = [line for line in lines if line.startswith("target: peewee-greenpool light")]
    assert light.endswith("lowest 0.94x, vs peewee-playhouse: NOT met")


def test_overview_rows_compare_with_the_ceiling_and_the_capacity() -> None:
    scenario = scenarios.SCENARIOS["celery"].full
    rows = report.overview_rows(scenario, _results(160.0, 414.0), ["greenpool", "shared"])
    assert [(row.label, round(row.ratio, 2), row.bound) for row in rows] == [
        ("greenpool [light]", 0.67, celery_scenario.CEILING),
        ("shared [light]", 0.14, celery_scenario.CEILING),
        ("greenpool [pool-bound]", 0.96, "capacity"),
        ("shared [pool-bound]", 0.1, "capacity"),
    ]


# ---------------------------------------------------------------- real runs


def _bench(pg_dsn: str, tmp_path: Path, *options: str, broker: str | None) -> tuple[list[str], list[dict]]:
    saved = tmp_path / "celery.json"
    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"))
    env.pop("GREENPOOL_DSN", None)
    env.pop("CELERY_BROKER_URL", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "greenpool", "bench", "--scenario", "celery", "--quick", "--dsn", pg_dsn]
        + (["--broker", broker] if broker else [])
        + ["--json", str(saved), *options],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(REPO_ROOT),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    runs: list[dict] = json.loads(saved.read_text())["scenarios"]["celery"]["runs"]
    return done.stdout.splitlines(), runs


RUN_LINE = (
    r"    [\d.]+ tasks/s; task p50 \d+ ms, p99 \d+ ms; \d+ tasks in [\d.]+ s"
    r"(; connections busy \d+ %, held [\d.]+ ms a task)?(; worker CPU [\d.]+ cores)?"
)


def test_a_real_run_on_redis(pg_dsn: str, tmp_path: Path) -> None:
    """A Peewee contender in real workers on Redis, with the ceiling; every run succeeds."""
    parts = urlsplit(REDIS)
    error = tcp_reachable(parts.hostname or "127.0.0.1", parts.port or 6379)
    if error is not None:
        skip_or_fail(f"needs Redis at {REDIS}: set GREENPOOL_TEST_REDIS ({error})")
    lines, runs = _bench(pg_dsn, tmp_path, "--contender", "peewee-greenpool", broker=REDIS)
    assert "plan: quick run, celery (1 round): 3 runs" in lines
    assert any(line.startswith("  broker: redis://") and line.endswith("(--broker)") for line in lines), lines
    for number, (name, kind) in enumerate(
        [("no database", "light"), ("peewee-greenpool", "light"), ("peewee-greenpool", "pool-bound")], 1
    ):
        at = lines.index(f"[{number}/3] celery · {name} · {kind} · round 1/1 ...")
        assert re.fullmatch(RUN_LINE, lines[at + 1]), lines[at + 1]
    assert any(line.startswith("target: peewee-greenpool pool-bound >= 0.95 x capacity") for line in lines)
    assert [(r["contender"], r["phase"], r["ok"]) for r in runs] == [
        ("no database", "light", True),
        ("peewee-greenpool", "light", True),
        ("peewee-greenpool", "pool-bound", True),
    ]
    bound = runs[2]["extra"]
    assert bound["queries_per_task"] == 3 and bound["tasks_done"] == 250 and not bound["cut"]
    assert 0 < bound["busy"] <= 1.0


def test_a_real_run_on_the_filesystem_broker(pg_dsn: str, tmp_path: Path) -> None:
    """Without --broker: kombu's filesystem transport, no broker server; greenpool's psycopg pool."""
    lines, runs = _bench(pg_dsn, tmp_path, "--contender", "greenpool", broker=None)
    broker = r"  broker: filesystem:// in \S+ \(no --broker: kombu's filesystem transport\)"
    assert any(re.fullmatch(broker, line) for line in lines), lines
    assert [(r["contender"], r["phase"], r["ok"]) for r in runs] == [
        ("no database", "light", True),
        ("greenpool", "light", True),
        ("greenpool", "pool-bound", True),
    ]
    # The broker's folder and the workers' result files went with the run.
    assert not list((tmp_path / "tmp").iterdir())

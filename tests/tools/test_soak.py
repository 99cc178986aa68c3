"""The soak (`greenpool.tools.soak`, ``python -m greenpool soak``).

The accounting and the checks are plain functions of numbers, tested here
without a server; the counting connection and database classes against
PostgreSQL; and a half-minute soak runs as a subprocess, as CI runs it.

The pytest process is never monkey-patched: the soak itself runs in a
subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from greenpool.__main__ import build_parser
from greenpool.tools import soak
from greenpool.tools.soak import (
    CHECKS,
    LoadFigures,
    MemoryFigures,
    PoolFigures,
    Snapshot,
    Tally,
    accounting_problems,
    closed_problems,
    evaluate,
    load_problems,
    memory_problems,
    process_problems,
    settle_problems,
    size_problems,
)

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def _pool(name: str = "pg", **changes: Any) -> PoolFigures:
    """A settled pool: 100 attempts, 4 failed, 96 made, 92 closed, 4 held and on the server."""
    figures = PoolFigures(
        name=name,
        min_size=4,
        connections_num=100,
        connections_errors=4,
        pool_size=4,
        pool_available=4,
        requests_waiting=0,
        made=96,
        closed=92,
        server=4,
    )
    return replace(figures, **changes)


def _snapshot(*pools: PoolFigures, **changes: Any) -> Snapshot:
    pools = pools or (_pool("pg"), _pool("peewee", min_size=2, pool_size=2, pool_available=2, closed=94, server=2))
    snap = Snapshot(
        elapsed=1.0,
        fds=20,
        threads=1,
        greenlets=4,
        rss=50 << 20,
        pools=pools,
        proxy_active=sum(p.pool_size for p in pools),
    )
    return replace(snap, **changes)


# ---------------------------------------------------------------- accounting


def test_the_identity_holds_for_a_settled_pool() -> None:
    pool = _pool()
    assert pool.stats_made == pool.made == pool.closed + pool.pool_size
    assert accounting_problems(pool) == []


def test_stats_that_disagree_with_the_count_break_the_identity() -> None:
    (problem,) = accounting_problems(_pool(connections_errors=3))
    assert "stats say 97 connections were made" in problem and "the soak counted 96" in problem


def test_a_connection_neither_closed_nor_held_is_unaccounted_for() -> None:
    (problem,) = accounting_problems(_pool(closed=91))
    assert "96 made != 91 closed + 4 held" in problem and "+1 unaccounted" in problem


def test_a_connection_closed_twice_or_not_made_by_the_pool_shows_too() -> None:
    (problem,) = accounting_problems(_pool(closed=93))
    assert "-1 unaccounted" in problem


def test_the_server_must_have_exactly_what_the_pool_holds() -> None:
    (problem,) = accounting_problems(_pool(server=5))
    assert "the server has 5 connections, the pool holds 4" in problem
    problems = settle_problems(_snapshot(_pool(server=5)))
    assert problems["server-connections"] and not problems["accounting"]


def test_after_close_every_connection_made_is_closed_and_gone_from_the_server() -> None:
    done = _pool(pool_size=0, pool_available=0, closed=96, server=0)
    assert closed_problems(done) == []
    assert closed_problems(replace(done, closed=95)) == ["pg: 96 made but 95 closed (1 never closed)"]
    assert closed_problems(replace(done, server=1)) == ["pg: the server still has 1 connections"]
    (problem,) = closed_problems(replace(done, connections_num=101))
    assert "stats say 97" in problem


# ---------------------------------------------------------------- settling


def test_without_a_baseline_a_pool_settles_at_its_minimum() -> None:
    assert size_problems(_pool()) == []
    assert size_problems(_pool(pool_size=5, pool_available=5, closed=91, server=5)) == [
        "pg: holds 5 connections, not 4"
    ]


def test_with_a_baseline_a_pool_settles_at_the_baseline_size() -> None:
    baseline = _pool(pool_size=5, pool_available=5)
    assert size_problems(_pool(pool_size=5, pool_available=5), baseline) == []
    assert size_problems(_pool(), baseline) == ["pg: holds 4 connections, not 5"]


def test_a_settled_pool_has_every_connection_idle_and_no_request_waiting() -> None:
    assert size_problems(_pool(pool_available=3, requests_waiting=2)) == [
        "pg: 1 connections not idle",
        "pg: 2 requests waiting",
    ]


def test_the_proxy_must_relay_what_the_pools_hold() -> None:
    problems = settle_problems(_snapshot(proxy_active=7))
    assert problems["server-connections"] == ["the proxy relays 7 connections, the pools hold 6"]
    assert not any(settle_problems(_snapshot(proxy_active=None)).values())  # not measurable: not checked


def test_a_settled_snapshot_has_no_problem_and_process_figures_only_against_a_baseline() -> None:
    snap = _snapshot()
    problems = settle_problems(snap)
    assert set(problems) == {"pool-sizes", "server-connections", "accounting"}
    assert not any(problems.values())
    problems = settle_problems(snap, snap)
    assert set(problems) == {"pool-sizes", "server-connections", "accounting", "fds", "threads", "greenlets"}
    assert not any(problems.values())


def test_fds_threads_and_greenlets_must_come_back_to_the_baseline() -> None:
    baseline = _snapshot()
    grown = _snapshot(fds=21, threads=2, greenlets=5)
    problems = process_problems(grown, baseline)
    assert problems["fds"] == ["open file descriptors: 21, +1 since the baseline (20; tolerance 0)"]
    assert problems["threads"] and problems["greenlets"]
    assert not any(process_problems(_snapshot(fds=19, greenlets=3), baseline).values())  # fewer is no leak
    assert not any(process_problems(_snapshot(fds=None, threads=None), baseline).values())


# ---------------------------------------------------------------- memory, load


def test_memory_growth_is_checked_against_its_tolerances() -> None:
    ok = MemoryFigures(rss_before=100, rss_after=100 + soak.RSS_TOLERANCE, traced_before=10, traced_after=10)
    assert not any(memory_problems(ok).values())
    assert ok.traced_growth == 0 and ok.rss_growth == soak.RSS_TOLERANCE
    grown = replace(ok, rss_after=ok.rss_after + 1, traced_after=11 + soak.TRACED_TOLERANCE)
    problems = memory_problems(grown)
    assert problems["rss"] and problems["traced-memory"]
    assert not memory_problems(replace(grown, rss_before=None))["rss"]


def _load(**changes: Any) -> LoadFigures:
    figures = LoadFigures(
        soak_transactions={"pg": 100, "peewee": 90},
        calm_transactions={"pg": 10, "peewee": 9},
        calm_errors={},
        stragglers=0,
        chaos=dict.fromkeys(soak.CHAOS_EVENTS, 1),
        lent_closed={"pg": 0, "peewee": 0},
    )
    return replace(figures, **changes)


def test_a_good_load_passes() -> None:
    assert not any(load_problems(_load()).values())
    assert not any(load_problems(_load(chaos=None)).values())  # --no-chaos


def test_the_load_must_run_on_both_pools_stop_and_see_every_chaos() -> None:
    problems = load_problems(
        _load(
            soak_transactions={"pg": 0, "peewee": 9},
            stragglers=2,
            crashes=1,
            lent_closed={"pg": 0, "peewee": 3},
            chaos={**dict.fromkeys(soak.CHAOS_EVENTS, 1), "outage": 0},
        )
    )["load"]
    assert problems == [
        "pg: no transaction committed during the soak",
        f"2 greenlets were still running {soak.STOP_TIMEOUT:g} s after the stop",
        "1 greenlets died of an exception the soak didn't raise",
        "peewee: lent 3 connections already closed",
        "chaos that never struck: outage",
    ]


def test_the_calm_window_must_serve_every_pool_without_error() -> None:
    problems = load_problems(_load(calm_transactions={"pg": 10, "peewee": 0}, calm_errors={"pg": 2}))
    assert problems["recovery"] == [
        "peewee: no transaction committed in the calm window",
        "pg: 2 errors in the calm window",
    ]


def test_every_check_is_reported_and_one_not_measured_fails() -> None:
    checks = evaluate({name: [] for name in CHECKS}, {"fds": "20 -> 20"})
    assert [c.name for c in checks] == list(CHECKS)
    assert all(c.ok for c in checks)
    assert next(c for c in checks if c.name == "fds").detail == "20 -> 20"
    problems: dict[str, list[str]] = {name: [] for name in CHECKS if name != "rss"}
    problems["fds"] = ["open file descriptors: 21", "again"]
    checks = {c.name: c for c in evaluate(problems)}
    assert not checks["fds"].ok and checks["fds"].detail == "open file descriptors: 21; again"
    assert not checks["rss"].ok and checks["rss"].detail == "not measured"


def test_the_process_figures_are_measurable_here() -> None:
    import greenlet

    main = greenlet.getcurrent()
    before = soak.live_greenlets()
    suspended = greenlet.greenlet(main.switch)
    suspended.switch()
    assert soak.live_greenlets() == before + 1
    suspended.switch()
    assert suspended.dead and soak.live_greenlets() == before
    if sys.platform.startswith("linux"):
        fds, threads, rss = soak.open_fds(), soak.thread_count(), soak.rss_bytes()
        assert fds is not None and fds > 0 and threads is not None and threads >= 1
        assert rss is not None and rss > 1 << 20
        with open(os.devnull) as _:
            assert soak.open_fds() == fds + 1


# ---------------------------------------------------------------- the counting classes


def test_the_counting_connection_counts_each_connection_made_and_closed_once(pg_dsn: str) -> None:
    tally = Tally()
    cls = soak.counting_connection_class(tally)
    conn = cls.connect(pg_dsn)
    assert (tally.made, tally.closed) == (1, 0)
    conn.close()
    conn.close()
    assert (tally.made, tally.closed) == (1, 1)


def test_the_counting_connection_counts_no_failed_connect(pg_dsn: str) -> None:
    import psycopg

    tally = Tally()
    with pytest.raises(psycopg.OperationalError):
        soak.counting_connection_class(tally).connect(pg_dsn, dbname="greenpool_no_such_database")
    assert (tally.made, tally.closed) == (0, 0)


def test_the_counting_database_is_a_pooled_postgresql_database_counting_its_connections(pg_dsn: str) -> None:
    from psycopg.conninfo import conninfo_to_dict

    from greenpool.peewee import PooledPostgresqlDatabase

    params: dict[str, Any] = dict(conninfo_to_dict(pg_dsn))
    database = params.pop("dbname")
    tally = Tally()
    db = soak.counting_database_class()(database, max_connections=2, tally=tally, **params)
    assert isinstance(db, PooledPostgresqlDatabase)
    with db.connection_context():
        assert db.execute_sql("select 1").fetchone() == (1,)
    assert (tally.made, tally.closed) == (1, 0)  # back in the pool, not closed
    db.pool.close()  # closes idle connections at once
    stats = db.pool_stats()
    assert (tally.made, tally.closed) == (stats["connections_num"] - stats["connections_errors"], 1)


# ---------------------------------------------------------------- the command


def test_the_command_is_registered_with_its_options() -> None:
    args = build_parser().parse_args(["soak", "--minutes", "0.25", "--greenlets", "10", "--json", "x.json"])
    assert args._command.name == "soak"
    assert (args.minutes, args.greenlets, args.json, args.dsn) == (0.25, 10, "x.json", None)


@pytest.mark.parametrize(
    ("option", "value"),
    [("--minutes", "0"), ("--minutes", "nan"), ("--greenlets", "0"), ("--lifetime", "-1"), ("--interval", "inf")],
)
def test_bad_options_end_the_run_with_one_line(option: str, value: str) -> None:
    args = build_parser().parse_args(["soak", option, value])
    with pytest.raises(SystemExit, match=option):
        soak._check_args(args)


def _run_soak(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    for name in (soak.DSN_ENV, "GREENPOOL_BENCH_REEXECUTED"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "greenpool", "soak", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO_ROOT),
    )


@pytest.mark.slow
def test_a_half_minute_soak_passes_every_check(pg_dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = _run_soak(["--minutes", "0.5", "--dsn", pg_dsn, "--json", str(out)], timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert f"all {len(CHECKS)} checks passed" in proc.stdout
    doc = json.loads(out.read_text())
    assert [c["name"] for c in doc["checks"]] == list(CHECKS)
    assert all(c["ok"] for c in doc["checks"]), doc["checks"]
    by_phase = doc["totals"]["by_phase"]
    assert all(by_phase["soak"]["transactions"][name] > 0 for name in ("pg", "peewee"))
    chaos: dict[str, int] = {}
    for phase in by_phase.values():
        for event, n in phase["chaos"].items():
            chaos[event] = chaos.get(event, 0) + n
    for event in soak.CHAOS_EVENTS.values():
        assert chaos.get(event, 0) > 0, event
    # The identity, from the figures written.
    stats = doc["totals"]["pool_stats"]
    for pool in doc["final"]["pools"]:
        name = pool["name"]
        assert pool["made"] == pool["closed"] + pool["pool_size"]
        assert pool["server"] == pool["pool_size"] == pool["min_size"]
        closed = next(p for p in doc["closed"]["pools"] if p["name"] == name)
        assert closed["server"] == 0
        assert closed["closed"] == closed["made"] == stats[name]["connections_num"] - stats[name]["connections_errors"]
    assert doc["final"]["fds"] == doc["baseline"]["fds"]
    assert doc["final"]["greenlets"] == doc["baseline"]["greenlets"]
    assert doc["closed"]["proxy_active"] == 0

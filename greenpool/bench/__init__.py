"""Benchmark greenpool against psycopg_pool, peewee's pool and no-pool baselines, under gevent.

Run it as ``python -m greenpool bench`` (see ``--help``). The CLI monkey-patches
before importing this package; its modules import gevent at the top, and
psycopg, pymysql, peewee, the pools and the embedded server only inside
functions, so nothing here binds an unpatched object.

Modules: `scenarios` (the workloads and their sizes), `contenders` (what is
compared, and how to add one), `backends` (PostgreSQL, MySQL, finding the
servers), `workload` (what a run asks of a contender), `planning` (the default,
--quick and --full runs; who runs where), `runner` (runs, rounds, progress,
results), `report` (medians, ratios, tables), `document` (the JSON file and
its Markdown), `plot` (the PNG chart), `errors`, `cli` (`main`);
`celery_scenario` and `celery_worker` (the ``celery`` scenario: real Celery
workers and their app), `scaleout` (the ``scaleout`` scenario: Celery
workers in several processes, direct and through PgBouncer).
"""

from __future__ import annotations

from .backends import BACKENDS, MYSQL, POSTGRES, Backend
from .cli import main
from .contenders import CONTENDERS, BorrowingContender, Contender, ContenderConfig, contender
from .runner import RunResult
from .scenarios import SCENARIOS, Scenario
from .workload import Workload

__all__ = [
    "BACKENDS",
    "CONTENDERS",
    "MYSQL",
    "POSTGRES",
    "SCENARIOS",
    "Backend",
    "BorrowingContender",
    "Contender",
    "ContenderConfig",
    "RunResult",
    "Scenario",
    "Workload",
    "contender",
    "main",
]

"""``python -m greenpool bench``: `main` runs the benchmark the command line options describe."""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import asdict
from typing import Any

from gevent import monkey

from .backends import BACKENDS, MYSQL, POSTGRES, Server, connect_mysql, resolve_connection_class, resolve_dsn
from .contenders import CONTENDERS
from .document import load_average, package_versions, write_json
from .errors import describe_error
from .planning import plan, selected
from .report import BOUNDS, report_fixed, report_storm, summaries_for_json
from .runner import Environment, run_scenario
from .scenarios import SCENARIOS


def print_catalogue(quick: bool) -> None:
    """Print the scenarios (full or --quick sizes), the registered contenders and the report's bounds."""
    print("scenarios:")
    for name, sizes in SCENARIOS.items():
        scenario = sizes[1 if quick else 0]
        print(f"  {name:<16} {scenario.describe()} [{BACKENDS[scenario.backend].title}]")
        for skipped, reason in scenario.skip:
            print(f"  {'':<16} without {skipped}: {reason}")
    print("contenders:")
    for spec in CONTENDERS.values():
        print(f"  {spec.name:<16} {spec.label()}")
    print("upper bounds (fixed-work reports):")
    for bound in BOUNDS:
        print(f"  {bound.contender:<16} {bound.describe()}")


def main(args: argparse.Namespace) -> int:
    """Run the benchmark described by the ``bench`` CLI options; exit status.

    The status is 1 if any contender run failed, so a smoke run can gate CI.
    A missing MySQL server is not a failure: its scenarios are skipped.
    """
    if not monkey.is_module_patched("socket"):
        # Called from Python rather than the CLI: patch now, late but needed.
        monkey.patch_all()
    if getattr(args, "list", False):
        print_catalogue(quick=args.quick)
        return 0
    scenario_names = selected(args.scenario, list(SCENARIOS), "scenario")
    contender_names = selected(args.contender, list(CONTENDERS), "contender")
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise SystemExit(f"--timeout must be a number of seconds > 0, got {args.timeout!r}")
    if args.json:
        try:
            open(args.json, "a").close()  # now, not after the first scenario's minutes
        except OSError as exc:
            raise SystemExit(f"--json: can't write {args.json}: {exc.strerror or exc}") from None
    size = 1 if args.quick else 0
    backends_needed = {SCENARIOS[name][size].backend for name in scenario_names}

    load_start = load_average()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} ({os.cpu_count()} CPUs)")
    versions = package_versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))

    conn_class, conn_class_name = resolve_connection_class()
    servers: dict[str, Server] = {}
    if POSTGRES in backends_needed:
        dsn, dsn_source = resolve_dsn(args.dsn)
        try:
            info = BACKENDS[POSTGRES].server_info(dsn, conn_class)
        except Exception as exc:  # noqa: BLE001 - a bad --dsn: one line, not a traceback
            raise SystemExit(
                f"no PostgreSQL at {BACKENDS[POSTGRES].masked(dsn)} ({dsn_source}): {describe_error(exc)}"
            ) from None
        servers[POSTGRES] = Server(BACKENDS[POSTGRES], dsn, dsn_source, info)
        print(f"server: {servers[POSTGRES].describe()}")
    if MYSQL in backends_needed:
        mysql = connect_mysql(getattr(args, "mysql", None))
        if mysql is not None:
            servers[MYSQL] = mysql
            print(f"server: {mysql.describe()}")
    env = Environment(servers, conn_class, conn_class_name, args.timeout)
    if POSTGRES in servers:
        import psycopg.waiting

        wait_name = getattr(psycopg.waiting.wait, "__name__", repr(psycopg.waiting.wait))
        print(
            f"PostgreSQL connection class: {conn_class_name}"
            " (all contenders but peewee-playhouse, which connects with psycopg.connect)"
        )
        print(
            f"psycopg default wait function: {wait_name}"
            " (peewee-playhouse's psycopg.Connection; unused by gevent-aware classes)"
        )
    print(f"rounds: {rounds}{' (quick)' if args.quick else ''}; contenders:")
    for name in contender_names:
        print(f"  {name:<16} {CONTENDERS[name].label()}")

    postgres = servers.get(POSTGRES)
    mysql = servers.get(MYSQL)
    document: dict[str, Any] = {
        "meta": {
            "argv": sys.argv,
            "quick": args.quick,
            "rounds": rounds,
            "dsn": postgres.backend.masked(postgres.dsn) if postgres else None,
            "dsn_source": postgres.source if postgres else None,
            "server": postgres.info if postgres else None,
            "mysql_url": mysql.backend.masked(mysql.dsn) if mysql else None,
            "mysql_source": mysql.source if mysql else None,
            "mysql_server": mysql.info if mysql else None,
            "connection_class": conn_class_name,
            "versions": versions,
            "cpus": os.cpu_count(),
            "load_start": load_start,
        },
        "scenarios": {},
    }
    failed = False
    for scenario_name in scenario_names:
        scenario = SCENARIOS[scenario_name][size]
        server = servers.get(scenario.backend)
        if server is None:
            document["scenarios"][scenario.name] = {"scenario": asdict(scenario), "skipped": "no server"}
            continue  # its skip was announced with the server
        names, skipped = plan(scenario, contender_names, args.contender)
        print(f"\n== {scenario.name}: {scenario.describe()}", flush=True)
        for name, reason in skipped.items():
            print(f"  {name}: not run ({reason}; --contender {name} runs it)")
        if not names:
            print("  (no selected contender takes part)")
            continue
        info = server.info
        if scenario.is_storm and scenario.pool_size + info["client_connections"] >= info["max_connections"]:
            print(
                f"  warning: P={scenario.pool_size} plus {info['client_connections']} open connections"
                f" is at or over max_connections={info['max_connections']}: replacements may be refused"
            )
        results = run_scenario(scenario, names, rounds, env)
        failed |= any(not r.ok for r in results)
        report = report_storm if scenario.is_storm else report_fixed
        print()
        shown = [name for name in contender_names if name in names or name in skipped]
        print(report(scenario, results, shown, skipped), flush=True)
        document["scenarios"][scenario.name] = {
            "scenario": asdict(scenario),
            "backend": scenario.backend,
            "contenders": names,
            "skipped": skipped,
            "runs": [asdict(r) for r in results],
            "medians": summaries_for_json(scenario, results, names),
        }
        if args.json:
            write_json(args.json, document)  # after each scenario: keep partial results

    load_end = load_average()
    print(f"\nload average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    document["meta"]["load_end"] = load_end
    if args.json:
        write_json(args.json, document)
        print(f"figures written to {args.json}")
    return 1 if failed else 0

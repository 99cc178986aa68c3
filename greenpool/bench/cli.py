"""``python -m greenpool bench``: `main` runs the benchmark the command line options describe.

The options themselves are declared in `greenpool.__main__` (which may not
import this package before monkey-patching); `main` checks them, so that a
bad one ends the run at once with one line, before any server starts.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict
from typing import Any, TextIO

from gevent import monkey

from .backends import BACKENDS, MYSQL, POSTGRES, Server, connect_mysql, resolve_connection_class, resolve_dsn
from .celery_scenario import report_celery, run_celery
from .contenders import CONTENDERS
from .document import (
    load_average,
    machine_info,
    markdown,
    overview_of,
    package_versions,
    read_json,
    source_commit,
    utc_now,
    write_json,
)
from .errors import describe_error
from .planning import DEFAULT, FULL, QUICK, Mode, PlanEntry, make_plan
from .report import BOUNDS, OverviewRow, overview_rows, overview_table, report_fixed, report_storm, summaries_for_json
from .runner import Environment, Progress, run_scenario
from .scaleout import report_scaleout, run_scaleout
from .scenarios import SCENARIOS

#: Options that choose or shape a run, which --markdown (rendering a saved run) refuses.
RUN_OPTIONS = ("dsn", "mysql", "broker", "scenario", "contender", "rounds", "quick", "full", "json", "list")


def print_catalogue(mode: Mode) -> None:
    """Print the scenarios (at `mode`'s sizes), the registered contenders, the report's bounds and the modes."""
    print(f"scenarios ({mode.name} sizes; * = run by {'default' if mode is DEFAULT else '--' + mode.name}):")
    for name, sizes in SCENARIOS.items():
        scenario = sizes.of(mode.name)
        mark = "*" if name in mode.scenarios else " "
        print(f"{mark} {name:<16} {scenario.describe()} [{BACKENDS[scenario.backend].title}]")
        for skipped, reason in scenario.skip:
            print(f"  {'':<16} without {skipped}: {reason}")
    print("contenders:")
    for spec in CONTENDERS.values():
        print(f"  {spec.name:<16} {spec.label()}")
    print("upper bounds (fixed-work reports):")
    for bound in BOUNDS:
        print(f"  {bound.contender:<16} {bound.describe()}")
    print("runs:")
    for each, option in ((DEFAULT, "(no option)"), (QUICK, "--quick"), (FULL, "--full")):
        print(f"  {option:<16} {each.describe()}")


def mode_of(args: argparse.Namespace) -> Mode:
    """The mode the options choose: `QUICK`, `FULL` or `DEFAULT`; `SystemExit` if both --quick and --full."""
    quick, full = bool(getattr(args, "quick", False)), bool(getattr(args, "full", False))
    if quick and full:
        raise SystemExit("--quick and --full: choose one (--quick is a smoke test, --full everything)")
    return QUICK if quick else FULL if full else DEFAULT


def _check_writable(option: str, path: str) -> None:
    try:
        open(path, "a").close()  # now, not after the first scenario's minutes
    except OSError as exc:
        raise SystemExit(f"{option}: can't write {path}: {exc.strerror or exc}") from None


def _check_plot(path: str | None) -> None:
    if path:
        from .plot import require_matplotlib

        require_matplotlib()
        _check_writable("--plot", path)


def _write_plot(path: str, rows: list[OverviewRow], meta: dict[str, Any], out: TextIO = sys.stdout) -> None:
    from .plot import write_plot

    machine = meta.get("machine") or {}
    load = meta.get("load_start")
    subtitle = ", ".join(
        part
        for part in (
            (meta.get("started") or "undated").replace("T", " ").replace("+00:00", " UTC"),
            f"{machine.get('cpus') or meta.get('cpus')} CPUs",
            f"load {load[0]:.2f}" if load else "",
            f"{meta.get('mode')} run" if meta.get("mode") else "",
        )
        if part
    )
    bars = write_plot(path, rows, subtitle)
    print(f"plot of {bars} ratios written to {path}", file=out)


def render_saved(args: argparse.Namespace) -> int:
    """``--markdown PATH`` (and ``--plot``): render a document written by ``--json``; run nothing."""
    given = [f"--{name}" for name in RUN_OPTIONS if getattr(args, name, None) not in (None, False, [])]
    if given:
        raise SystemExit(f"--markdown renders a saved run: it takes no run options (got {', '.join(given)})")
    _check_plot(args.plot)
    document = read_json(args.markdown)
    try:
        rows = overview_of(document)
    except (KeyError, TypeError, ValueError) as exc:
        raise SystemExit(
            f"--markdown: {args.markdown} is not a file written by --json ({describe_error(exc)})"
        ) from None
    print(markdown(document, rows))
    if args.plot:
        _write_plot(args.plot, rows, document.get("meta", {}), sys.stderr)  # stdout: the Markdown only
    return 0


def main(args: argparse.Namespace) -> int:
    """Run the benchmark described by the ``bench`` CLI options; exit status.

    The status is 1 if any contender run failed, so a smoke run can gate CI.
    A missing MySQL server is not a failure: its scenarios are skipped.
    """
    if not monkey.is_module_patched("socket"):
        # Called from Python rather than the CLI: patch now, late but needed.
        monkey.patch_all()
    # A Namespace built by other code may lack the newer options.
    for option in ("full", "plot", "markdown", "list", "broker"):
        if not hasattr(args, option):
            setattr(args, option, None)
    mode = mode_of(args)
    if args.markdown:
        return render_saved(args)
    if args.list:
        print_catalogue(mode)
        return 0
    plan = make_plan(mode, args.scenario, args.contender, args.rounds)
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise SystemExit(f"--timeout must be a number of seconds > 0, got {args.timeout!r}")
    if args.json:
        _check_writable("--json", args.json)
    _check_plot(args.plot)
    backends_needed = {entry.scenario.backend for entry in plan}

    started, clock = utc_now(), time.monotonic()
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
    env = Environment(servers, conn_class, conn_class_name, args.timeout, args.broker)
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
    runnable = [entry for entry in plan if entry.scenario.backend in servers]
    total = sum(entry.runs for entry in runnable)
    print(plan_line(mode, runnable, total))
    if mode is DEFAULT:
        print("  (--full: every scenario and contender at full size, 3 rounds, about twenty-five minutes)")
    print("contenders:")
    for name in CONTENDERS:
        if any(name in entry.contenders for entry in runnable):
            print(f"  {name:<16} {CONTENDERS[name].label()}")

    postgres = servers.get(POSTGRES)
    mysql = servers.get(MYSQL)
    document: dict[str, Any] = {
        "meta": {
            "started": started,
            "argv": sys.argv,
            "mode": mode.name,
            "quick": mode is QUICK,
            "rounds": {entry.scenario.name: entry.rounds for entry in plan},
            "dsn": postgres.backend.masked(postgres.dsn) if postgres else None,
            "dsn_source": postgres.source if postgres else None,
            "server": postgres.info if postgres else None,
            "mysql_url": mysql.backend.masked(mysql.dsn) if mysql else None,
            "mysql_source": mysql.source if mysql else None,
            "mysql_server": mysql.info if mysql else None,
            "connection_class": conn_class_name,
            "versions": versions,
            "commit": source_commit(),
            "machine": machine_info(),
            "cpus": os.cpu_count(),
            "load_start": load_start,
        },
        "scenarios": {},
    }
    failed = False
    progress = Progress(total)
    overview: list[OverviewRow] = []
    for entry in plan:
        scenario, names, skipped = entry.scenario, list(entry.contenders), dict(entry.skipped)
        server = servers.get(scenario.backend)
        if server is None:
            document["scenarios"][scenario.name] = {"scenario": asdict(scenario), "skipped": "no server"}
            continue  # its skip was announced with the server
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
        run = run_scaleout if scenario.is_scaleout else run_celery if scenario.is_celery else run_scenario
        results = run(scenario, names, entry.rounds, env, progress)
        failed |= any(not r.ok for r in results)
        report = (
            report_scaleout
            if scenario.is_scaleout
            else report_celery
            if scenario.is_celery
            else report_storm
            if scenario.is_storm
            else report_fixed
        )
        print()
        shown = [name for name in CONTENDERS if name in names or name in skipped]
        print(report(scenario, results, shown, skipped), flush=True)
        overview += overview_rows(scenario, results, names)
        document["scenarios"][scenario.name] = {
            "scenario": asdict(scenario),
            "backend": scenario.backend,
            "rounds": entry.rounds,
            "contenders": names,
            "skipped": skipped,
            "runs": [asdict(r) for r in results],
            "medians": summaries_for_json(scenario, results, names),
        }
        if args.json:
            write_json(args.json, document)  # after each scenario: keep partial results

    seconds = time.monotonic() - clock
    load_end = load_average()
    print(f"\nload average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    document["meta"].update(finished=utc_now(), seconds=round(seconds, 1), load_end=load_end)
    document["overview"] = [asdict(row) for row in overview]
    if args.json:
        write_json(args.json, document)
        print(f"figures written to {args.json}")
    if args.plot:
        _write_plot(args.plot, overview, document["meta"])
    print(f"\n== summary: {progress.done} runs in {seconds:.0f} s ({mode.name} run)")
    print(overview_table(overview) if overview else "(nothing ran)", flush=True)
    return 1 if failed else 0


def plan_line(mode: Mode, entries: list[PlanEntry], total: int) -> str:
    """One line saying what runs: the mode, each scenario's rounds, the number of runs."""
    scenarios = ", ".join(f"{e.scenario.name} ({e.rounds} round{'s' if e.rounds > 1 else ''})" for e in entries)
    return f"plan: {mode.name} run, {scenarios or 'no scenario'}: {total} runs"

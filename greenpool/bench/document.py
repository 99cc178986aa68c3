"""The JSON document of a run (``--json``): when, where and what ran, every figure; and its Markdown form.

``meta`` says when (``started``, ``finished``, UTC), on what (``machine``:
CPUs, architecture, system; ``load_start``/``load_end``; ``versions``;
``commit``), against which servers, in which mode and rounds; ``scenarios``
holds each scenario's runs and medians; ``overview`` the closing table's
rows. `markdown` renders a saved document as the dated table that
``docs/benchmarks.md`` pastes (``python -m greenpool bench --markdown PATH``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .report import OVERVIEW_LEGEND, OverviewRow, overview_rows
from .runner import RunResult
from .scenarios import Scenario


def write_json(path: str, document: dict[str, Any]) -> None:
    """Write `document` to `path` atomically, NaN as null."""

    # NaN is not JSON: write null instead.
    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(clean(document), out, indent=2, default=str)
        out.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> dict[str, Any]:
    """A document written by ``--json``; `SystemExit` with one line if it can't be read or isn't one."""
    try:
        with open(path, encoding="utf-8") as source:
            document = json.load(source)
    except OSError as exc:
        raise SystemExit(f"--markdown: can't read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise SystemExit(f"--markdown: {path} is not JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("scenarios"), dict):
        raise SystemExit(f"--markdown: {path} is not a file written by --json (no scenarios)")
    return document


def utc_now() -> str:
    """The time now, in UTC, as ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    """Python's version and the installed versions of greenpool, gevent, the drivers, the pools and Celery."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    dists = ("greenpool", "gevent", "psycopg", "psycopg-binary", "psycopg-pool", "peewee", "pymysql", "celery", "kombu")
    for dist in dists:
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return found


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    return os.getloadavg()


def machine_info() -> dict[str, Any]:
    """CPU count and model, architecture, system and release, and Python's implementation."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model or platform.processor() or None,
        "architecture": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


def source_commit() -> str | None:
    """The git commit of greenpool's checkout (with ``+`` if it has changes), or None outside one."""
    root = Path(__file__).resolve().parent.parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+" if dirty else commit or None


# ---------------------------------------------------------------- reading back


def scenario_from_json(data: dict[str, Any]) -> Scenario:
    """The `Scenario` a document's ``asdict(scenario)`` came from."""
    data = dict(data)
    data["skip"] = tuple(tuple(pair) for pair in data.get("skip", ()))
    data["processes"] = tuple(data.get("processes", ()))
    return Scenario(**data)


_NAN_FIELDS = frozenset(f.name for f in fields(RunResult) if isinstance(f.default, float) and math.isnan(f.default))


def run_from_json(data: dict[str, Any]) -> RunResult:
    """The `RunResult` a document's ``asdict(result)`` came from (null figures back to NaN)."""
    known = {f.name for f in fields(RunResult)}
    values: dict[str, Any] = {
        key: math.nan if value is None and key in _NAN_FIELDS else value for key, value in data.items() if key in known
    }
    return RunResult(**values)


def overview_of(document: dict[str, Any]) -> list[OverviewRow]:
    """The closing table's rows, recomputed from the document's runs (scenarios that ran, in order)."""
    rows: list[OverviewRow] = []
    for entry in document["scenarios"].values():
        if "runs" not in entry:
            continue  # skipped: no server
        scenario = scenario_from_json(entry["scenario"])
        results = [run_from_json(run) for run in entry["runs"]]
        rows += overview_rows(scenario, results, entry["contenders"])
    return rows


# ---------------------------------------------------------------- Markdown


def _date(meta: dict[str, Any]) -> str:
    started = meta.get("started")
    if not started:
        return "undated"
    return datetime.fromisoformat(started).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _figure(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None or math.isnan(value) else f"{value:{spec}}{suffix}"


def _machine_line(meta: dict[str, Any]) -> str:
    machine = meta.get("machine") or {}
    cpus = machine.get("cpus", meta.get("cpus"))
    parts = [f"{cpus} CPUs" if cpus else "CPUs unknown"]
    parts += [machine[key] for key in ("cpu_model", "architecture", "system") if machine.get(key)]
    loads = []
    for key, when in (("load_start", "at start"), ("load_end", "at end")):
        if meta.get(key):
            loads.append(f"{meta[key][0]:.2f} {when}")
    load = f"; load average {', '.join(loads)}" if loads else ""
    return f"- machine: {', '.join(parts)}{load}"


def _rounds(meta: dict[str, Any], name: str, entry: dict[str, Any]) -> Any:
    rounds = entry.get("rounds", meta.get("rounds"))
    return rounds.get(name) if isinstance(rounds, dict) else rounds


def _run_lines(meta: dict[str, Any], document: dict[str, Any]) -> list[str]:
    mode = meta.get("mode") or ("quick" if meta.get("quick") else "full")
    scenarios = document["scenarios"]
    ran = ", ".join(f"{name} x{_rounds(meta, name, entry)}" for name, entry in scenarios.items() if "runs" in entry)
    took = f", {meta['seconds']:.0f} s" if meta.get("seconds") is not None else ""
    commit = f", greenpool commit {meta['commit']}" if meta.get("commit") else ""
    lines = [f"- run: {mode} mode, rounds: {ran or 'none'}{took}{commit}"]
    not_run = [f"{name} ({entry['skipped']})" for name, entry in scenarios.items() if "runs" not in entry]
    if not_run:
        lines.append(f"- not run: {', '.join(not_run)}")
    return lines


def _server_lines(meta: dict[str, Any]) -> list[str]:
    lines = []
    for info_key, source_key, title in (
        ("server", "dsn_source", "PostgreSQL"),
        ("mysql_server", "mysql_source", "MySQL"),
    ):
        info = meta.get(info_key)
        if info:
            lines.append(f"- server: {title} {info.get('version', '?')} ({meta.get(source_key) or '?'})")
    return lines


def markdown(document: dict[str, Any], rows: Sequence[OverviewRow] | None = None) -> str:
    """A saved document as dated Markdown: date, machine and load, versions, then scenario x contender.

    The table has each contender's q/s, p99 latency and ratio to its bound
    (`overview_rows`), recomputed from the runs unless `rows` are given.
    """
    meta = document.get("meta", {})
    rows = overview_of(document) if rows is None else rows
    versions = meta.get("versions") or {}
    lines = [
        f"### Benchmark of {_date(meta)}",
        "",
        _machine_line(meta),
        "- versions: " + (", ".join(f"{k} {v}" for k, v in versions.items()) or "unknown"),
        *_server_lines(meta),
        *_run_lines(meta, document),
        "",
        "| scenario | contender | q/s | p99 ms | ratio | bound |",
        "|:--|:--|--:|--:|--:|:--|",
    ]
    for row in rows:
        note = f" ({row.note()})" if row.note() else ""
        lines.append(
            f"| {row.scenario} | {row.label}{note} | {_figure(row.qps, '.0f')} | {_figure(row.p99_ms, '.1f')}"
            f" | {_figure(row.ratio, '.2f', 'x')} | {row.bound or '-'} |"
        )
    lines += ["", OVERVIEW_LEGEND]
    return "\n".join(lines)

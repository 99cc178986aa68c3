"""The report: medians over rounds (`Summary`), per-round ratios, and the tables printed.

The fixed-work report compares every contender with ``dedicated`` (q/s, and
p99 against the FIFO ideal G/P x its median latency), and the ``peewee-*``
ones also with ``peewee-dedicated`` (`BOUNDS`); the storm report compares
each pool's storm phase with its calm one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .runner import RunResult
from .scenarios import Scenario


@dataclass
class Summary:
    """Medians over the successful rounds of one contender in one phase."""

    contender: str
    phase: str
    rounds_ok: int
    rounds: int
    qps: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    #: Connections the pool opened during the timed phase (`connections_num`).
    new_connections: float = math.nan
    errors: list[str] = field(default_factory=list)


def summarize(results: Sequence[RunResult], contender_name: str, phase: str) -> Summary:
    """Median q/s and latencies of `contender_name` in `phase` over its rounds."""
    mine = [r for r in results if r.contender == contender_name and r.phase == phase]
    good = [r for r in mine if r.ok]
    summary = Summary(contender_name, phase, len(good), len(mine))
    summary.errors = [f"round {r.round}: {r.error}" for r in mine if not r.ok]
    if good:
        summary.qps = statistics.median(r.qps for r in good)
        summary.p50_ms = statistics.median(r.p50_ms for r in good)
        summary.p99_ms = statistics.median(r.p99_ms for r in good)
        summary.max_ms = statistics.median(r.max_ms for r in good)
        opened = [r.pool_stats["connections_num"] for r in good if r.pool_stats and "connections_num" in r.pool_stats]
        if opened:
            summary.new_connections = statistics.median(opened)
    return summary


def good_runs(results: Sequence[RunResult], contender_name: str, phase: str) -> list[RunResult]:
    """The successful runs of `contender_name` in `phase` that have a scenario's own figures (`extra`)."""
    return [r for r in results if r.contender == contender_name and r.phase == phase and r.ok and r.extra]


def median_extra(runs: Sequence[RunResult], key: str) -> float:
    """The median over `runs` of their `extra[key]` (those having it); NaN if none has."""
    values = [float(r.extra[key]) for r in runs if r.extra and r.extra.get(key) is not None]
    return statistics.median(values) if values else math.nan


def paired_ratios(
    results: Sequence[RunResult],
    name: str,
    phase: str,
    base_name: str,
    base_phase: str,
    figure: Callable[[RunResult, RunResult], float],
) -> list[float]:
    """`figure(run, base_run)` of each round having both runs, in round order (NaNs left out)."""
    runs = {r.round: r for r in results if r.contender == name and r.phase == phase and r.ok}
    bases = {r.round: r for r in results if r.contender == base_name and r.phase == base_phase and r.ok}
    ratios = [figure(runs[n], bases[n]) for n in sorted(runs.keys() & bases.keys())]
    return [x for x in ratios if not math.isnan(x)]


def median_ratio(ratios: Sequence[float]) -> float:
    """The median of per-round ratios (`paired_ratios`); NaN if there are none.

    The machine drifts by 10-20 % between rounds (the bound's own q/s
    does), more than some of the gaps measured; the runs of one round are
    seconds apart, so a ratio within a round cancels most of the drift
    that a ratio of medians over all rounds keeps.
    """
    return statistics.median(ratios) if ratios else math.nan


def ratio_range(ratios: Sequence[float]) -> str:
    """The lowest and highest of per-round ratios as "lo-hi"; "-" with fewer than two."""
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else "-"


PAIRED_LEGEND = (
    "ratios: the median over rounds of each round's own ratio (rounds: the lowest and highest of those);"
    " q/s, latencies: medians over rounds"
)


def _qps_ratio(run: RunResult, base: RunResult) -> float:
    return _ratio(run.qps, base.qps)


def _max_ratio(run: RunResult, base: RunResult) -> float:
    return _ratio(run.max_ms, base.max_ms)


def _fmt(value: float, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None or math.isnan(value) else f"{value:{spec}}{suffix}"


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: Container[int] = (0,)) -> str:
    """Plain text table: the `left` columns (the first by default) left-aligned, the others right-aligned.

    A row with a single cell (an error) spans the rest of the line.
    """
    widths = [len(h) for h in headers]
    widths[0] = max([widths[0], *(len(row[0]) for row in rows)])
    for row in rows:
        if len(row) == len(headers):
            widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = []
    for row in [list(headers), *rows]:
        cells = [
            cell.ljust(width) if column in left else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=False))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _row_note(summary: Summary) -> str:
    if summary.rounds_ok == summary.rounds:
        return ""
    return f"{summary.rounds_ok}/{summary.rounds} rounds ok"


@dataclass(frozen=True)
class Bound:
    """A no-pool upper bound the fixed-work report compares contenders with."""

    #: The bound's contender.
    contender: str
    #: What the report calls the FIFO ideal derived from its median latency.
    ideal: str
    #: The contenders compared with it: those whose name starts with this.
    prefix: str = ""

    def covers(self, name: str) -> bool:
        """Whether `name`'s row is compared with this bound."""
        return name.startswith(self.prefix)

    def describe(self) -> str:
        """One line for --list."""
        who = "every contender" if not self.prefix else f"the {self.prefix}* contenders"
        return f"{who}: q/s vs {self.contender}, p99 vs {self.ideal} (G/P x {self.contender} median latency)"


#: The upper bounds of the fixed-work report, in column order: the raw driver,
#: and Peewee without a pool (so that Peewee's own per-query CPU is not
#: counted against the Peewee pools).
BOUNDS: tuple[Bound, ...] = (
    Bound("dedicated", "FIFO ideal"),
    Bound("peewee-dedicated", "peewee FIFO ideal", prefix="peewee-"),
)


def report_fixed(
    scenario: Scenario,
    results: Sequence[RunResult],
    names: Sequence[str],
    skipped: Mapping[str, str] | None = None,
) -> str:
    """Table of a fixed-work scenario, relative to each of `BOUNDS` and its FIFO ideal.

    A bound's columns are filled for the rows it covers ("-" for the others):
    q/s relative to the bound's (1.00x for the bound itself), and p99
    relative to its FIFO ideal, G/P x the bound's median latency (a fair FIFO
    pool makes each query wait for G/P queries ahead of it; "-" for the
    bounds, which never wait). Each ratio is the median of the ratios
    within each round (`paired_ratios`, `median_ratio`), with their range
    against the first bound; the absolute figures are medians. Each bound
    covering a row gets a line under the table giving its ideal. Contenders
    in `skipped` (name -> why) get a "not run" row.
    """
    skipped = skipped or {}
    summaries = {name: summarize(results, name, "run") for name in names}
    bound_names = {b.contender for b in BOUNDS}
    fifo_wait = scenario.greenlets / scenario.pool_size
    headers = [
        "contender",
        "q/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        *(f"q/s vs {b.contender}" for b in BOUNDS),
        f"rounds vs {BOUNDS[0].contender}",
        *(f"p99 vs {b.ideal}" for b in BOUNDS),
        "",
    ]

    def over_ideal(run: RunResult, base: RunResult) -> float:
        return _ratio(run.p99_ms, fifo_wait * base.p50_ms)

    rows = []
    for name, s in summaries.items():
        if name in skipped:
            rows.append([name, f"not run: {skipped[name]}"])
            continue
        if s.rounds_ok == 0:
            rows.append([name, f"ERROR {s.errors[0] if s.errors else ''}"])
            continue
        vs_qps = [
            _fmt(median_ratio(paired_ratios(results, name, "run", b.contender, "run", _qps_ratio)), ".2f", "x")
            if b.covers(name)
            else "-"
            for b in BOUNDS
        ]
        vs_ideal = [
            _fmt(median_ratio(paired_ratios(results, name, "run", b.contender, "run", over_ideal)), ".2f", "x")
            if b.covers(name) and name not in bound_names
            else "-"
            for b in BOUNDS
        ]
        rows.append(
            [
                name,
                _fmt(s.qps, ".0f"),
                _fmt(s.p50_ms, ".2f"),
                _fmt(s.p99_ms, ".2f"),
                _fmt(s.max_ms, ".2f"),
                *vs_qps,
                ratio_range(paired_ratios(results, name, "run", BOUNDS[0].contender, "run", _qps_ratio))
                if name != BOUNDS[0].contender
                else "-",
                *vs_ideal,
                _row_note(s),
            ]
        )
    lines = [_table(headers, rows)]
    for bound in BOUNDS:
        if not any(bound.covers(name) for name in names):
            continue
        base = summaries.get(bound.contender)
        if base is None or math.isnan(base.p50_ms):
            lines.append(f"{bound.ideal} p99: unknown (needs a successful `{bound.contender}` run)")
        else:
            lines.append(
                f"{bound.ideal} p99 = G/P x {bound.contender} median latency = {scenario.greenlets}/"
                f"{scenario.pool_size} x {base.p50_ms:.2f} ms = {fifo_wait * base.p50_ms:.1f} ms"
            )
    lines.append(PAIRED_LEGEND)
    lines += _error_lines(summaries.values())
    return "\n".join(lines)


def report_storm(
    scenario: Scenario,
    results: Sequence[RunResult],
    names: Sequence[str],
    skipped: Mapping[str, str] | None = None,
) -> str:
    """Table of a storm scenario: each pool's storm figures relative to its calm ones.

    Contenders in `skipped` (name -> why) get a "not run" row.
    """
    skipped = skipped or {}
    headers = [
        "contender",
        "calm q/s",
        "storm q/s",
        "storm/calm q/s",
        "rounds",
        "calm p99 ms",
        "storm p99 ms",
        "calm max ms",
        "storm max ms",
        "storm/calm max",
        "storm new conns",
        "",
    ]
    rows = []
    all_summaries: list[Summary] = []
    for name in names:
        if name in skipped:
            rows.append([name, f"not run: {skipped[name]}"])
            continue
        calm = summarize(results, name, "calm")
        storm = summarize(results, name, "storm")
        all_summaries += [calm, storm]
        if calm.rounds_ok == 0 and storm.rounds_ok == 0:
            rows.append([name, f"ERROR {(calm.errors or storm.errors or [''])[0]}"])
            continue
        notes = [f"{p}: {_row_note(s)}" for p, s in (("calm", calm), ("storm", storm)) if _row_note(s)]
        qps_ratios = paired_ratios(results, name, "storm", name, "calm", _qps_ratio)
        rows.append(
            [
                name,
                _fmt(calm.qps, ".0f"),
                _fmt(storm.qps, ".0f"),
                _fmt(median_ratio(qps_ratios), ".2f"),
                ratio_range(qps_ratios),
                _fmt(calm.p99_ms, ".1f"),
                _fmt(storm.p99_ms, ".1f"),
                _fmt(calm.max_ms, ".1f"),
                _fmt(storm.max_ms, ".1f"),
                _fmt(median_ratio(paired_ratios(results, name, "storm", name, "calm", _max_ratio)), ".2f", "x"),
                _fmt(storm.new_connections, ".0f"),
                "; ".join(notes),
            ]
        )
    legend = "storm new conns: connections the pool opened during the timed storm phase (from get_stats())"
    return "\n".join([_table(headers, rows), legend, PAIRED_LEGEND, *_error_lines(all_summaries)])


def _error_lines(summaries: Iterable[Summary]) -> list[str]:
    lines: list[str] = []
    for s in summaries:
        phase = "" if s.phase == "run" else f" ({s.phase})"
        for error in s.errors:
            line = f"  {s.contender}{phase} failed, {error}"
            if line not in lines:  # e.g. one proxy failure seen by every run
                lines.append(line)
    return lines


def summaries_for_json(scenario: Scenario, results: Sequence[RunResult], names: Sequence[str]) -> list[dict[str, Any]]:
    """Median figures of every contender and phase, as plain dicts."""
    return [asdict(summarize(results, name, phase.name)) for name in names for phase in scenario.phases]


# ---------------------------------------------------------------- overview


@dataclass(frozen=True)
class OverviewRow:
    """One contender in one scenario (and phase) of the closing table: medians and the ratio to its bound."""

    scenario: str
    contender: str
    #: ``"run"``, or a storm's ``"calm"`` / ``"storm"``.
    phase: str
    qps: float
    p50_ms: float
    p99_ms: float
    #: Median over rounds of the q/s over the bound's in the same round.
    ratio: float
    #: What `ratio` compares with: ``dedicated``, a storm's calm phase, or nothing ("").
    bound: str
    rounds_ok: int
    rounds: int

    @property
    def label(self) -> str:
        """The contender, with the phase of a storm: ``greenpool [storm]``."""
        return self.contender if self.phase == "run" else f"{self.contender} [{self.phase}]"

    def note(self) -> str:
        """Empty, or how many rounds failed."""
        if self.rounds_ok == self.rounds:
            return ""
        return "failed" if self.rounds_ok == 0 else f"{self.rounds_ok}/{self.rounds} rounds ok"


#: The bound of a storm phase in `OverviewRow.bound`.
CALM_BOUND = "its calm phase"

OVERVIEW_LEGEND = (
    f"ratio: q/s over the bound's in the same round, median over rounds ({BOUNDS[0].contender}: the same"
    " connections, no pool)\n"
    f"storm: a pool's storm phase (connections expiring) over {CALM_BOUND}; q/s, latencies: medians over rounds"
)


def overview_rows(scenario: Scenario, results: Sequence[RunResult], names: Sequence[str]) -> list[OverviewRow]:
    """The closing table's rows of one scenario: each contender (and storm phase) that ran, with its ratio.

    A fixed-work row's bound is `BOUNDS`' first (``dedicated``) when it ran;
    a storm phase's is the same contender's calm phase; a scale-out's, one
    process direct (`greenpool.bench.scaleout.overview_rows`); a Celery
    scenario's, the ceiling or the capacity (`greenpool.bench.celery_scenario`).
    """
    if scenario.is_scaleout:
        from .scaleout import overview_rows as scaleout_rows

        return scaleout_rows(scenario, results, names)
    if scenario.is_celery:
        from .celery_scenario import overview_rows as celery_rows

        return celery_rows(scenario, results, names)
    rows = []
    bound = BOUNDS[0].contender
    for name in names:
        for phase in scenario.phases:
            s = summarize(results, name, phase.name)
            if scenario.is_storm:
                base_name, base_phase = (name, "calm") if phase.name == "storm" else ("", "")
            else:
                base_name, base_phase = (bound, "run") if any(r.contender == bound for r in results) else ("", "")
            ratio = (
                median_ratio(paired_ratios(results, name, phase.name, base_name, base_phase, _qps_ratio))
                if base_name
                else math.nan
            )
            label = "" if not base_name else (CALM_BOUND if scenario.is_storm else base_name)
            rows.append(
                OverviewRow(
                    scenario.name, name, phase.name, s.qps, s.p50_ms, s.p99_ms, ratio, label, s.rounds_ok, s.rounds
                )
            )
    return rows


def overview_table(rows: Sequence[OverviewRow]) -> str:
    """The closing table: scenario, contender, q/s, p50 and p99 latency, ratio to the bound, and the legend."""
    headers = ["scenario", "contender", "q/s", "p50 ms", "p99 ms", "ratio", "bound", ""]
    lines = []
    for row in rows:
        lines.append(
            [
                row.scenario,
                row.label,
                _fmt(row.qps, ".0f"),
                _fmt(row.p50_ms, ".2f"),
                _fmt(row.p99_ms, ".2f"),
                _fmt(row.ratio, ".2f", "x"),
                row.bound or "-",
                row.note(),
            ]
        )
    table = _table(headers, lines, left=(0, 1, 6, 7))
    return f"{table}\n{OVERVIEW_LEGEND}"

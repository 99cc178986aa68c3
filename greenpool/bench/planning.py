"""What runs: the three modes (default, ``--quick``, ``--full``), the options narrowing them, and who runs where.

Without options, ``python -m greenpool bench`` runs `DEFAULT`: the scenarios
that show what matters (``steady``, ``overhead`` and a shorter ``storm``),
every contender taking part in them, two rounds (one for a storm), in about
two minutes. ``--full`` runs every scenario at its full size, three rounds
(about twenty-five minutes); ``--quick`` every scenario scaled down, one
round (a smoke test, a few minutes). ``--scenario``, ``--contender`` and
``--rounds`` narrow or override the mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .contenders import CONTENDERS
from .scenarios import SCENARIOS, Scenario


@dataclass(frozen=True)
class Mode:
    """A kind of run: which scenarios, at which size, how many rounds."""

    #: ``"default"``, ``"quick"`` or ``"full"``: also the `Sizes` to run.
    name: str
    #: The scenarios run when --scenario names none, in `SCENARIOS` order.
    scenarios: tuple[str, ...]
    #: Rounds of a fixed-work scenario, unless --rounds says.
    rounds: int
    #: Rounds of a fixed-time (storm) scenario, unless --rounds says.
    storm_rounds: int

    def rounds_of(self, scenario: Scenario) -> int:
        """Rounds `scenario` runs in this mode without --rounds."""
        return self.storm_rounds if scenario.is_storm else self.rounds

    def describe(self) -> str:
        """One line for --list."""
        names = ", ".join(self.scenarios) if self.scenarios != tuple(SCENARIOS) else "every scenario"
        if self.rounds == self.storm_rounds:
            rounds = f"{self.rounds} round{'s' if self.rounds > 1 else ''}"
        else:
            rounds = f"{self.rounds} rounds, {self.storm_rounds} for a storm"
        return f"{names} at {self.name} size, {rounds}"


DEFAULT = Mode("default", ("steady", "overhead", "storm"), rounds=2, storm_rounds=1)
QUICK = Mode("quick", tuple(SCENARIOS), rounds=1, storm_rounds=1)
FULL = Mode("full", tuple(SCENARIOS), rounds=3, storm_rounds=3)
#: Mode name -> mode.
MODES: dict[str, Mode] = {mode.name: mode for mode in (DEFAULT, QUICK, FULL)}


@dataclass(frozen=True)
class PlanEntry:
    """One scenario of a run: its size, the contenders running in it and those it leaves out, its rounds."""

    scenario: Scenario
    contenders: tuple[str, ...]
    #: Contenders the scenario leaves out on purpose: name -> why.
    skipped: Mapping[str, str] = field(default_factory=dict)
    rounds: int = 1

    @property
    def runs(self) -> int:
        """Runs it takes: contenders x phases x rounds (a Celery scenario: + its ceiling's, one a round)."""
        ceiling = 1 if self.scenario.is_celery and self.contenders else 0
        return (len(self.contenders) * len(self.scenario.phases) + ceiling) * self.rounds


def selected(requested: Sequence[str] | None, known: Sequence[str], what: str) -> list[str]:
    """The `requested` names in `known`'s order (all of `known` if none); `SystemExit` naming unknown ones."""
    if not requested:
        return list(known)
    unknown = [name for name in requested if name not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    # Keep the registry order, drop duplicates.
    return [name for name in known if name in requested]


def plan(
    scenario: Scenario, contender_names: Sequence[str], requested: Sequence[str] | None
) -> tuple[list[str], dict[str, str]]:
    """The contenders that run in `scenario`, and those it leaves out on purpose (with why).

    A contender not supporting the scenario's backend (or not a storm
    contender in a storm) is simply not part of it. One the scenario skips
    still runs when --contender names it.
    """
    skip = dict(scenario.skip)
    names: list[str] = []
    skipped: dict[str, str] = {}
    for name in contender_names:
        if not CONTENDERS[name].takes_part(scenario):
            continue
        if name in skip and name not in (requested or ()):
            skipped[name] = skip[name]
        else:
            names.append(name)
    return names, skipped


def make_plan(
    mode: Mode,
    scenarios: Sequence[str] | None = None,
    contenders: Sequence[str] | None = None,
    rounds: int | None = None,
) -> list[PlanEntry]:
    """The scenarios to run, in `SCENARIOS` order: `mode`'s, or those named (at `mode`'s size).

    `contenders` (--contender) narrows the registered contenders, `rounds`
    (--rounds) overrides the mode's. Unknown names and rounds < 1 raise
    `SystemExit` with one line.
    """
    if rounds is not None and rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {rounds}")
    scenario_names = selected(scenarios, list(SCENARIOS), "scenario") if scenarios else list(mode.scenarios)
    contender_names = selected(contenders, list(CONTENDERS), "contender")
    entries = []
    for name in scenario_names:
        scenario = SCENARIOS[name].of(mode.name)
        names, skipped = plan(scenario, contender_names, contenders)
        entries.append(PlanEntry(scenario, tuple(names), skipped, rounds or mode.rounds_of(scenario)))
    return entries

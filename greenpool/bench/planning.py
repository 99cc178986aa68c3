"""Which scenarios and contenders run: the names selected on the command line, and who runs where (`plan`)."""

from __future__ import annotations

from collections.abc import Sequence

from .contenders import CONTENDERS
from .scenarios import Scenario


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

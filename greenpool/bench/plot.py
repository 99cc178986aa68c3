"""``--plot PATH``: a PNG bar chart of each contender's ratio to its bound, per scenario.

matplotlib is an optional extra (``pip install -e '.[plot]'``), imported
only to draw.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from .report import BOUNDS, CALM_BOUND, OverviewRow

#: What to install for --plot.
PLOT_EXTRA_HINT = "pip install -e '.[plot]' (or pip install matplotlib)"


def require_matplotlib() -> None:
    """`SystemExit` with one line naming the ``plot`` extra if matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        raise SystemExit(f"--plot needs matplotlib, which is not installed: {PLOT_EXTRA_HINT}")


def write_plot(path: str, rows: Sequence[OverviewRow], subtitle: str = "") -> int:
    """Draw the rows having a ratio as grouped bars (one group per scenario) into the PNG `path`.

    Returns the number of bars drawn. A storm's bars are its storm phase
    over its calm phase.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and never a GUI event loop
    import matplotlib.pyplot as plt

    plotted = [row for row in rows if row.ratio == row.ratio]  # not NaN
    scenarios = list(dict.fromkeys(row.scenario for row in plotted))
    contenders = list(dict.fromkeys(row.contender for row in plotted))
    width = 0.8 / max(len(contenders), 1)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.6 + 1.4 * len(scenarios) * max(len(contenders), 3) / 4), 4.8))
    try:
        colors = plt.get_cmap("tab10")
        for index, name in enumerate(contenders):
            ratios = {row.scenario: row.ratio for row in plotted if row.contender == name}
            xs = [x + (index - (len(contenders) - 1) / 2) * width for x, s in enumerate(scenarios) if s in ratios]
            heights = [ratios[s] for s in scenarios if s in ratios]
            bars = axes.bar(xs, heights, width, label=name, color=colors(index % 10))
            axes.bar_label(bars, labels=[f"{h:.2f}" for h in heights], fontsize=6, rotation=90, padding=2)
        axes.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        axes.set_xticks(range(len(scenarios)), [_tick(s, plotted) for s in scenarios])
        axes.set_ylabel(f"q/s relative to the bound ({BOUNDS[0].contender} = 1)")
        top = max((row.ratio for row in plotted), default=1.0)
        axes.set_ylim(0, max(1.0, top) * 1.2)
        title = "greenpool benchmark: each contender's q/s over its bound's"
        axes.set_title(f"{title}\n{subtitle}" if subtitle else title, fontsize=10)
        if contenders:
            axes.legend(fontsize=7, ncols=min(len(contenders), 4), loc="upper center", bbox_to_anchor=(0.5, -0.12))
        figure.savefig(path, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(figure)
    return len(plotted)


def _tick(scenario: str, rows: Sequence[OverviewRow]) -> str:
    bound = next((row.bound for row in rows if row.scenario == scenario), "")
    return f"{scenario}\n(storm / calm)" if bound == CALM_BOUND else f"{scenario}\n(vs {bound})"

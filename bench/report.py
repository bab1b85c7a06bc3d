"""What a scenario measured, judged against the issue's targets, and shown three ways.

The judging is pure (``Figure.ratio``, ``Figure.verdict``): a figure knows its
target and which way is better. The shell around it prints a rich table,
writes ``<scenario>.json`` and, when matplotlib is installed, ``<scenario>.png``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.markup import escape
from rich.table import Table

PLOT_HINT = "matplotlib is not installed: no plot (pip install 'raftmesh[bench]')"


@dataclass(frozen=True)
class Target:
    """``at_least`` or ``at_most`` ``bound``, as the issue states it (``text``)."""

    kind: Literal["at_least", "at_most"]
    bound: float
    text: str


def at_least(bound: float, text: str) -> Target:
    return Target("at_least", bound, text)


def at_most(bound: float, text: str) -> Target:
    return Target("at_most", bound, text)


@dataclass(frozen=True)
class Figure:
    name: str
    value: float | None
    unit: str = ""
    target: Target | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """Measured over target, oriented so that >= 1 always means "met"."""
        if self.target is None or self.value is None or not math.isfinite(self.value):
            return None
        if self.target.kind == "at_least":
            return self.value / self.target.bound if self.target.bound else None
        return self.target.bound / self.value if self.value else math.inf

    @property
    def verdict(self) -> bool | None:
        ratio = self.ratio
        return None if ratio is None else ratio >= 1.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        data["met"] = self.verdict
        return data


@dataclass
class Result:
    """One scenario's outcome: its figures, the series to plot, and how it ran."""

    scenario: str
    params: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    # name -> (x label, y label, points); one line each in the plot
    series: dict[str, tuple[str, str, list[tuple[float, float]]]] = field(default_factory=dict)
    # label -> value; one bar each, side by side (systems compared in one run)
    bars: dict[str, float] = field(default_factory=dict)
    bars_label: str = ""
    notes: list[str] = field(default_factory=list)

    def add(self, *figures: Figure) -> None:
        self.figures.extend(figures)

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(),
            "params": self.params,
            "figures": [f.to_json() for f in self.figures],
            "series": {
                name: {"x": x, "y": y, "points": points}
                for name, (x, y, points) in self.series.items()
            },
            "bars": {"label": self.bars_label, "values": self.bars},
            "notes": self.notes,
        }


def machine() -> dict[str, Any]:
    """Enough to tell two runs' machines apart, and how busy this one was."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
    }


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if not math.isfinite(value):
        return str(value)
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.3g}"
    return f"{text} {unit}".strip()


def table(result: Result) -> Table:
    out = Table(title=f"mesh bench {result.scenario}", title_justify="left")
    out.add_column("figure")
    out.add_column("measured", justify="right")
    out.add_column("target")
    out.add_column("ratio", justify="right")
    out.add_column("", justify="center")
    out.add_column("note", overflow="fold")
    for fig in result.figures:
        ratio = fig.ratio
        mark = {True: "[green]✓", False: "[red]✗", None: ""}[fig.verdict]
        out.add_row(
            escape(fig.name),
            escape(_fmt(fig.value, fig.unit)),
            escape(fig.target.text) if fig.target else "",
            "" if ratio is None else f"{ratio:.2f}",
            mark,
            escape(fig.note),
        )
    return out


def emit(result: Result, out_dir: Path, console: Console) -> Path:
    """Print the table, write the JSON, draw the plot; returns the JSON's path."""
    console.print(table(result))
    for note in result.notes:
        console.print(f"  {note}", style="dim", markup=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{result.scenario}.json"
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    png = plot(result, out_dir)
    console.print(
        f"  {path}" + (f", {png}" if png else f"; {PLOT_HINT}"), style="dim", markup=False
    )
    return path


def plot(result: Result, out_dir: Path) -> Path | None:
    """Figures against their targets (left) and the scenario's series (right)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    judged = [f for f in result.figures if f.ratio is not None and math.isfinite(f.ratio)]
    by_x: dict[str, list[tuple[str, str, list[tuple[float, float]]]]] = {}
    for name, (xlabel, ylabel, points) in result.series.items():
        if points:
            by_x.setdefault(xlabel, []).append((name, ylabel, points))
    panels = int(bool(judged)) + int(bool(result.bars)) + len(by_x)
    if not panels:
        return None
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    free = iter(axes[0])
    if judged:
        ax = next(free)
        ratios = [f.ratio or 0.0 for f in judged]
        colours = ["tab:green" if r >= 1 else "tab:red" for r in ratios]
        ax.barh([f.name for f in judged], ratios, color=colours)
        ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_xlabel("measured / target (≥ 1 meets the target)")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=8)
    if result.bars:
        ax = next(free)
        ax.bar(list(result.bars), list(result.bars.values()), color="tab:blue")
        ax.set_ylabel(result.bars_label)
        ax.grid(axis="y", alpha=0.3)
    for xlabel, lines in by_x.items():
        ax = next(free)
        for name, ylabel, points in lines:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker=".", label=name)
            ax.set_ylabel(ylabel)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"mesh bench {result.scenario}")
    fig.tight_layout()
    path = out_dir / f"{result.scenario}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

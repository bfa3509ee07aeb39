"""Presentation of evaluation results: markdown tables, JSON files and PNG plots.

Plots are drawn on a bare ``matplotlib.figure.Figure`` (Agg canvas), so nothing here touches pyplot's
global state or the user's interactive backend. matplotlib is the optional ``plot`` extra: it is imported
only when a plot is drawn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol


class Result(Protocol):
    """What every evaluation result offers; ``task`` names its files (``ppl``, ``passkey``, ``needle``)."""

    task: str

    def to_dict(self) -> dict: ...

    def to_markdown(self) -> str: ...

    def plot(self, path: str | Path) -> Path: ...


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; cells are written with ``str()``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def length_multiple(length: int, training_length: int | None) -> str:
    """``length`` as a multiple of the training length, e.g. ``"4x"``; ``"-"`` when that is unknown."""
    return "-" if not training_length else f"{length / training_length:g}x"


def _figure(width: float, height: float):
    """A new matplotlib Figure (inches); ImportError naming the extra when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'hf-longctx[plot]'") from error
    return Figure(figsize=(width, height), dpi=120)


def line_plot(
    path: str | Path,
    x: Sequence[float],
    series: dict[str, Sequence[float]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    marker_x: float | None = None,
    marker_label: str = "training length",
    logy: bool = False,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """One line per entry of ``series`` over ``x`` (log2 x axis, as lengths double); writes a PNG.

    ``marker_x`` draws a dashed vertical line (the training length) when given.
    """
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    for label, y in series.items():
        ax.plot(x, y, marker="o", label=label)
    if marker_x is not None:
        ax.axvline(marker_x, color="grey", linestyle="--", label=marker_label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(x), labels=[f"{value:g}" for value in x], minor=False)
    ax.minorticks_off()
    if logy:
        ax.set_yscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def heatmap(
    path: str | Path,
    values: Sequence[Sequence[float]],
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    xlabel: str,
    ylabel: str,
    title: str,
) -> Path:
    """A heatmap of ``values[row][col]`` in [0, 1] (red = 0, green = 1) with each cell annotated; writes a PNG."""
    fig = _figure(max(4.0, 0.7 * len(col_labels) + 2.0), max(3.0, 0.4 * len(row_labels) + 1.5))
    ax = fig.subplots()
    image = ax.imshow(values, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(col_labels)), labels=col_labels)
    ax.set_yticks(range(len(row_labels)), labels=row_labels)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="x-small")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def save_result(result: Result, output_dir: str | Path) -> dict[str, Path]:
    """Write ``<output_dir>/<task>.json``, ``.md`` and ``.png``; returns the paths keyed by suffix."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {suffix: output_dir / f"{result.task}.{suffix}" for suffix in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    paths["md"].write_text(result.to_markdown() + "\n")
    result.plot(paths["png"])
    return paths

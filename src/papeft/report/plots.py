"""Figures written next to run results, drawn with matplotlib's object API (no pyplot, no global backend)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from matplotlib.figure import Figure
from torch import nn

from papeft.io import atomic_path


@torch.no_grad()
def plot_rational_activations(activations: Sequence[nn.Module],
                              stem: str | Path, x_range: tuple[float, float] = (-5.0, 5.0),
                              title: str | None = None) -> list[Path]:
    """PEDRO Figure 2: one small panel per layer, the learned activation (solid) against GELU (dashed).

    Writes `{stem}.png` and `{stem}.pdf` and returns both paths.
    """
    if not activations:
        raise ValueError("plot_rational_activations needs at least one activation")
    x = torch.linspace(*x_range, 401)                               # (N,)
    gelu = torch.nn.functional.gelu(x)
    n = len(activations)
    cols = min(6, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.0 * cols, 1.7 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        act = activations[i]
        weight = next(iter(act.parameters()), None)                 # evaluate where the module lives
        y = act(x if weight is None else x.to(weight.device)).float().cpu()
        ax.plot(x, gelu, "--", color="0.6", lw=1.0, label="GELU")
        ax.plot(x, y, color="C0", lw=1.4, label="learned")
        ax.set_title(f"layer {i}", fontsize=8)
        ax.tick_params(labelsize=6)
    axes.flat[0].legend(fontsize=6, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, stem)


def plot_budget(series: dict[str, Sequence[tuple[float, float, float, float]]], stem: str | Path,
                title: str | None = None, ylabel: str = "score") -> list[Path]:
    """PARADE Figure 2: score against tunable parameters, one line per method.

    `series` maps a method to its points `(tunable params, median, q25, q75)`; the band is the
    interquartile range over seeds. Writes `{stem}.png` and `{stem}.pdf` and returns both paths.
    """
    if not series:
        raise ValueError("plot_budget needs at least one method")
    fig = Figure(figsize=(4.2, 3.0), layout="constrained")
    ax = fig.subplots()
    for i, (method, points) in enumerate(sorted(series.items())):
        pts = sorted(points)
        x = [p[0] for p in pts]
        ax.plot(x, [p[1] for p in pts], marker="o", color=f"C{i}", lw=1.4, label=method)
        ax.fill_between(x, [p[2] for p in pts], [p[3] for p in pts], color=f"C{i}", alpha=0.15, lw=0)
    ax.set_xscale("log")
    ax.set_xlabel("tunable parameters (weights, no biases)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, stem)


def plot_methods_budget(panels: dict[str, dict[str, tuple[float, float, float, float]]], floors: dict[str, float],
                        stem: str | Path, title: str | None = None, ylabel: str = "score") -> list[Path]:
    """Score against tunable parameters at each method's own budget (the paper's budget plot, one point
    per method): a panel per task, the IQR over seeds as error bars, the task's floor as a dashed line.

    `panels` maps task -> method -> (tunable params, median, q25, q75); `floors` task -> floor score."""
    if not panels:
        raise ValueError("plot_methods_budget needs at least one task")
    tasks = sorted(panels)
    fig = Figure(figsize=(3.6 * len(tasks), 3.2), layout="constrained")
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    methods = sorted({m for points in panels.values() for m in points})
    for ax, task in zip(axes, tasks):
        for method, (params, median, q25, q75) in sorted(panels[task].items()):
            i = methods.index(method)
            ax.errorbar([params], [median], yerr=[[median - q25], [q75 - median]], fmt="os^Dv<>ph*"[i % 10],
                        color=f"C{i % 10}", ms=5, capsize=2, label=method)
        if task in floors:
            ax.axhline(floors[task], color="0.5", ls="--", lw=1.0, label="floor")
        ax.set_xscale("log")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("tunable parameters (weights, no biases)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=6, loc="best")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, stem)


def save_figure(fig: Figure, stem: str | Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write `{stem}.{fmt}` for each format, atomically; return the paths. No creation date goes into a
    PDF, so the same figure gives the same bytes."""
    stem = Path(stem)
    paths = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150, metadata={"CreationDate": None} if fmt == "pdf" else None)
        paths.append(path)
    return paths

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
    stem = Path(stem)
    paths = []
    for fmt in ("png", "pdf"):
        path = stem.with_name(f"{stem.name}.{fmt}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150)
        paths.append(path)
    return paths

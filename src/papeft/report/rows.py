"""The data of a median table: a `Row` per (backbone, method), a `Cell` per task in it.

papeft.report.tables fills them from runs' records; papeft.report.formats renders them.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class Cell:
    """Aggregate of one (backbone, method, task) over its seeds; `failed` counts failed runs."""

    metric: str | None
    scores: list[float]
    failed: int = 0
    unscored: list[str] = field(default_factory=list)   # one line per run whose score is NaN, saying why

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def median(self) -> float:
        return statistics.median(self.scores)

    @property
    def iqr(self) -> float:
        return quantile(self.scores, 0.75) - quantile(self.scores, 0.25)


# The floor of every table: the frozen backbone with the task's prompts (a method that trains nothing,
# deterministic, so one run per task) and the training split's most frequent label answered for every
# test example. Floor rows come first, never take a best/second mark, never count as short of seeds.
ZERO_SHOT = "zero_shot"
MAJORITY = "majority class"
FLOOR_METHODS = (MAJORITY, ZERO_SHOT)
LOWER_IS_BETTER = frozenset({"loss", "perplexity", "ppl", "wer", "ter"})


@dataclass
class Row:
    """One table row: a (backbone, method) pair and its cells keyed by task."""

    backbone: str
    method: str
    params: list[int] = field(default_factory=list)
    cells: dict[str, Cell] = field(default_factory=dict)

    @property
    def floor(self) -> bool:
        return self.method in FLOOR_METHODS


def floors(rows: Sequence[Row]) -> dict[tuple[str, str], float]:
    """(backbone, task) -> the floor a trained cell must beat: the best of its floor rows' medians
    (majority class, zero-shot), by the metric's direction. The one floor rule of every table and claim."""
    out: dict[tuple[str, str], float] = {}
    for row in rows:
        for task, cell in row.cells.items() if row.floor else ():
            if cell.n:
                key, better = (row.backbone, task), max if str(cell.metric).lower() not in LOWER_IS_BETTER else min
                out[key] = better(out[key], cell.median) if key in out else cell.median
    return out


def quantile(values: Sequence[float], q: float) -> float:
    """Quantile with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

"""95% bootstrap intervals of a table cell and of paired differences between two methods.

A cell is the median over seeds of each seed's test score, and each seed's score is the mean of
per-example scores (accuracy: 100 or 0 per test example). Its uncertainty has two sources: which
seeds ran and which test examples were drawn. The interval resamples both (two-level percentile
bootstrap): a replicate draws S seeds with replacement and N test examples with replacement (the
same examples for every seed), then takes the median over the drawn seeds of their means on the
drawn examples. A paired difference (method A minus method B) does the same on the per-example
differences of the same seeds on the same examples, so what both methods share cancels.

Where a task's score is not a mean over examples (corpus BLEU), only seeds are resampled and the
interval says so. Replicates use a fixed generator seed: a table regenerates byte-identically.
"""
from __future__ import annotations

import functools
import json
import math
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

REPLICATES = 2000
LEVEL = 0.95
GENERATOR_SEED = 20261130


@dataclass(frozen=True)
class Interval:
    """A point estimate (median over seeds) with its bootstrap interval; `examples`: whether test
    examples were resampled too (False: seeds only)."""

    estimate: float
    low: float
    high: float
    n_seeds: int
    examples: bool

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def predictions_path(record: dict) -> Path | None:
    """The predictions.jsonl beside a collected run's metrics.json (None for a record not read from a file)."""
    source = record.get("_source")
    return Path(source).with_name("predictions.jsonl") if source else None


def prediction_rows(path: Path) -> list[dict]:
    """The rows of a predictions.jsonl, parsed once per file version (the scores and the no-label share
    both read them); raises OSError / ValueError for an unreadable file."""
    stat = path.stat()
    return _rows(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=512)
def _rows(path: str, mtime_ns: int, size: int) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def example_scores(record: dict) -> dict[str, float] | None:
    """uid -> per-example score of a finished run, read from the predictions.jsonl beside its
    metrics.json and scored by its task; None when the task's score is not a mean over examples, or
    (warned) when the file is missing or unreadable or its mean disagrees with the recorded score."""
    from papeft.tasks import get_task
    from papeft.tasks.base import Example
    try:
        task = get_task(record["task"])
    except KeyError:
        return None
    if not getattr(task, "label_words", None):            # free-text metrics: not per example here
        return None
    path = predictions_path(record)
    if path is None or not path.is_file():
        if path is not None:
            warnings.warn(f"{path}: missing; its cell's interval resamples seeds only", stacklevel=2)
        return None
    scores: dict[str, float] = {}
    try:
        for row in prediction_rows(path):
            answers = tuple(row["answers"])
            scores[row["uid"]] = task.score([row["prediction"]], [Example(row["uid"], "", answers[0], answers)])
        problem = None if scores else "no rows"
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        problem = f"unreadable ({type(exc).__name__}: {exc})"
    if problem is None and not math.isclose(statistics.fmean(scores.values()), float(record["score"]), abs_tol=1e-6):
        problem = f"its per-example scores do not average to the recorded score {record['score']}"
    if problem:
        warnings.warn(f"{path}: {problem}; its cell's interval resamples seeds only", stacklevel=2)
        return None
    return scores


def off_label_share(record: dict) -> float | None:
    """The share of a finished run's test answers that name none of its task's labels (read from the
    predictions.jsonl beside its metrics.json); None for a task without a label set or without the file."""
    from papeft.tasks import get_task
    from papeft.tasks.metrics import names_a_label
    try:
        labels = getattr(get_task(record["task"]), "labels", ())
    except KeyError:
        return None
    path = predictions_path(record)
    if not labels or path is None or not path.is_file():
        return None
    try:
        rows = prediction_rows(path)
        return sum(not names_a_label(r["prediction"], labels) for r in rows) / len(rows) if rows else None
    except (OSError, ValueError, KeyError, TypeError):
        return None                                       # example_scores warns about an unreadable file


def _matrix(runs: Sequence[dict[str, float]]) -> np.ndarray | None:
    """(S, N) scores of S runs on the test examples they all share (same uid order); None if none."""
    shared = sorted(set.intersection(*(set(r) for r in runs))) if runs else []
    if not shared:
        return None
    return np.array([[r[uid] for uid in shared] for r in runs], dtype=np.float64)    # (S, N)


def _bootstrap(matrix: np.ndarray) -> tuple[float, float]:
    """Percentile interval of median-over-seeds(mean-over-examples) under two-level resampling."""
    rng = np.random.default_rng(GENERATOR_SEED)
    n_seeds, n_examples = matrix.shape
    stats = np.empty(REPLICATES)
    for start in range(0, REPLICATES, 250):
        stop = min(start + 250, REPLICATES)
        examples = rng.integers(0, n_examples, size=(stop - start, n_examples))          # (b, N)
        seeds = rng.integers(0, n_seeds, size=(stop - start, n_seeds))                   # (b, S)
        means = matrix[:, examples].mean(axis=2)                                         # (S, b)
        drawn = np.take_along_axis(means.T, seeds, axis=1)                               # (b, S)
        stats[start:stop] = np.median(drawn, axis=1)
    tail = (1 - LEVEL) / 2 * 100
    return float(np.percentile(stats, tail)), float(np.percentile(stats, 100 - tail))


def _seed_bootstrap(values: Sequence[float]) -> tuple[float, float]:
    return _bootstrap(np.asarray(values, dtype=np.float64)[:, None])


def cell_interval(records: Sequence[dict], per_example: Sequence[dict[str, float] | None]) -> Interval | None:
    """The interval of one cell from its seeds' records (and their per-example scores, same order);
    None with fewer than two seeds."""
    scores = [float(r["score"]) for r in records]
    if len(scores) < 2:
        return None
    matrix = _matrix(per_example) if all(p is not None for p in per_example) else None
    low, high = _bootstrap(matrix) if matrix is not None else _seed_bootstrap(scores)
    return Interval(statistics.median(scores), low, high, len(scores), matrix is not None)


def paired_interval(a: dict[int, tuple[dict, dict | None]], b: dict[int, tuple[dict, dict | None]]) -> Interval | None:
    """Method A minus method B over the seeds both finished (seed -> (record, per-example scores)):
    the median over seeds of the per-seed difference, with its interval; None under two seeds."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diffs = [float(a[s][0]["score"]) - float(b[s][0]["score"]) for s in seeds]
    per_a, per_b = [a[s][1] for s in seeds], [b[s][1] for s in seeds]
    matrix = None
    if all(p is not None for p in per_a + per_b):
        ma, mb = _matrix(per_a + per_b), None
        if ma is not None:
            ma, mb = ma[:len(seeds)], ma[len(seeds):]
            matrix = ma - mb                                                             # (S, N) paired
    low, high = _bootstrap(matrix) if matrix is not None else _seed_bootstrap(diffs)
    return Interval(statistics.median(diffs), low, high, len(seeds), matrix is not None)

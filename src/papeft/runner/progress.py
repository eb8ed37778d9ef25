"""Where a sweep stands: each cell of `python run.py -m <overrides>` finished, failed, started or
pending, what is left, and a rough time to go.

    python -m papeft.runner.progress experiment=cpu_table1 [more overrides] [--list]

A cell is *finished* when its run folder holds a complete metrics.json of the same config hash (what
the sweep skips), *failed* when it holds a failed.json instead, *stale* when its metrics.json is of
another config (the sweep runs it again), *started* when an attempt left a config or a checkpoint
there (the sweep resumes it), else *pending*. The time to go is, per task, the median `cell_time_s`
of its finished cells times its unfinished ones (the overall median where a task has none yet; a
failed cell counts, as the sweep runs it again): a guide, since cell times include whatever else ran
on the machine. The unfinished cells' indices are printed in SLURM's `--array` syntax
(papeft.runner.sweep keeps the order of the multirun and of scripts/slurm/make_sbatch.py).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from papeft.paths import config_dir
from papeft.runner.cells import FAILED, METRICS, finished_metrics, parse_seeds, resolved_config, run_dir_for
from papeft.runner.sweep import expand
from papeft.train.checkpoint import CHECKPOINT_DIR, config_hash

STATES = ("finished", "failed", "stale", "started", "pending")


@dataclass(frozen=True)
class CellState:
    index: int                 # the cell's position in the multirun (SLURM array index)
    label: str                 # method / task / seed
    task: str
    run_dir: Path
    state: str
    cell_time_s: float | None  # finished cells: from their metrics.json


def cell_states(overrides: Sequence[str]) -> list[CellState]:
    """The state of every (cell, seed) of the sweep, in job order."""
    sweep, parser = expand(overrides, launcher=None), OverridesParser.create()
    out, composed = [], {}
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for index, cell in enumerate(sweep.cells):
            parsed = parser.parse_overrides(list(cell))
            rest = tuple(o.input_line for o in parsed if o.key_or_group != "seed")   # composed once for all seeds
            if rest not in composed:
                composed[rest] = compose("config", overrides=list(rest))
            cfg = composed[rest].copy()
            for o in parsed:
                if o.key_or_group == "seed":                                 # the value as Hydra types it
                    cfg.seed = o.value()
            for seed in parse_seeds(cfg.seed):
                run_dir = run_dir_for(cfg, seed)
                done = finished_metrics(run_dir, config_hash(resolved_config(cfg, seed)))
                if done:
                    state = "finished"
                elif (run_dir / FAILED).is_file():
                    state = "failed"
                elif (run_dir / METRICS).is_file():
                    state = "stale"
                elif (run_dir / "config.yaml").is_file() or (run_dir / CHECKPOINT_DIR).is_dir():
                    state = "started"
                else:
                    state = "pending"
                seconds = done.get("cell_time_s") if done else None
                out.append(CellState(index, f"{cfg.method.name} / {cfg.task.name} / seed {seed}", str(cfg.task.name),
                                     run_dir, state, float(seconds) if isinstance(seconds, (int, float)) else None))
    return out


def seconds_to_go(states: Sequence[CellState]) -> float | None:
    """Median finished cell time per task x that task's unfinished cells; None before any cell finished."""
    times: dict[str, list[float]] = {}
    for s in states:
        if s.cell_time_s is not None:
            times.setdefault(s.task, []).append(s.cell_time_s)
    if not times:
        return None
    overall = statistics.median(t for ts in times.values() for t in ts)
    return sum(statistics.median(times[s.task]) if s.task in times else overall
               for s in states if s.state != "finished")


def array_spec(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (SLURM's --array syntax)."""
    runs: list[list[int]] = []
    for i in sorted(set(indices)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def summary(states: Sequence[CellState], name: str) -> list[str]:
    counts = Counter(s.state for s in states)
    lines = [f"{name}: {len(states)} cells: " + ", ".join(f"{counts[k]} {k}" for k in STATES)]
    for task in dict.fromkeys(s.task for s in states):
        mine = [s for s in states if s.task == task]
        times = [s.cell_time_s for s in mine if s.cell_time_s is not None]
        median = f" (median cell {statistics.median(times):.0f} s)" if times else ""
        lines.append(f"  {task}: {sum(s.state == 'finished' for s in mine)} of {len(mine)} finished{median}")
    to_go = seconds_to_go(states)
    if to_go is not None:
        lines.append(f"to go: about {to_go / 3600:.1f} h (median finished cell time per task x cells left)")
    failed = [s for s in states if s.state == "failed"]
    lines += [f"failed: {s.label} (see {s.run_dir / FAILED})" for s in failed]
    left = [s.index for s in states if s.state != "finished"]
    if left:
        lines.append(f"unfinished array indices: {array_spec(left)}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m papeft.runner.progress", description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="+", help="the overrides of `python run.py -m`, e.g. experiment=cpu_table1")
    ap.add_argument("--list", action="store_true", help="also print every cell with its state")
    args = ap.parse_args(argv)
    states = cell_states(args.overrides)
    if not states:
        print(f"error: {' '.join(args.overrides)} has no cells", file=sys.stderr)
        return 1
    if args.list:
        for s in states:
            print(f"{s.index:4d}  {s.state:8s}  {s.label}  {s.run_dir}")
    print("\n".join(summary(states, " ".join(args.overrides))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

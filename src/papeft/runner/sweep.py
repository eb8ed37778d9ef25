"""The cells of a sweep, exactly as `python run.py -m <overrides>` would run them.

Hydra's BasicSweeper takes the experiment's `hydra.sweeper.params`, then the command line's
(non-hydra) overrides, and runs the Cartesian product in that key order. `expand` calls the same
code (Hydra's override parser and `BasicSweeper.split_arguments`), so cell i here is job i of the
multirun; scripts/slurm/make_sbatch.py turns the cells into one SLURM array task each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from papeft.paths import config_dir



@dataclass
class Sweep:
    """A sweep's cells (each a list of `key=value` overrides), split into what every cell shares
    (`common`) and what tells them apart (`varying`, one list per cell), plus the composed config
    (with the hydra node, launcher included) of the fixed overrides."""

    cells: list[list[str]]
    common: list[str]
    varying: list[list[str]]
    sizes: dict[str, int]        # swept key -> number of values
    config: DictConfig

    def __len__(self) -> int:
        return len(self.cells)


def compose_config(overrides: Sequence[str], launcher: str | None = "slurm") -> DictConfig:
    """The config `run.py` would see for these (non-sweep) overrides, hydra node included;
    `launcher` is the default `hydra/launcher` choice when the overrides name none."""
    overrides = list(overrides)
    if launcher and not any(o.startswith("hydra/launcher=") for o in overrides):
        overrides.insert(0, f"hydra/launcher={launcher}")
    if GlobalHydra.instance().is_initialized():               # inside a Hydra app or a test's initialize()
        return compose("config", overrides=overrides, return_hydra_config=True)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def expand(overrides: Sequence[str], launcher: str | None = "slurm") -> Sweep:
    """Every cell of `python run.py -m <overrides>`, in Hydra's job order."""
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(list(overrides))
    cfg = compose_config([o.input_line for o in parsed if not o.is_sweep_override()], launcher)
    params = cfg.hydra.sweeper.get("params") or {}
    job_args = [f"{k}={v}" for k, v in params.items()] + [o.input_line for o in parsed if not o.is_hydra_override()]
    job_overrides = parser.parse_overrides(job_args)
    cells = BasicSweeper.split_arguments(job_overrides, None)[0]
    keys = [c.split("=", 1)[0] for c in cells[0]] if cells else []
    sizes = {k: len({cell[i] for cell in cells}) for i, k in enumerate(keys)}
    common = [cells[0][i] for i, k in enumerate(keys) if sizes[k] == 1] if cells else []
    varying = [[c for i, c in enumerate(cell) if sizes[keys[i]] > 1] for cell in cells]
    return Sweep(cells, common, varying, {k: n for k, n in sizes.items() if n > 1}, cfg)

"""Where the project's folders are, decided once.

`configs/` is found, in this order, at `$PAPEFT_CONFIGS`, in the checkout this package was
imported from (`python run.py`, an editable install), or in the working directory or one of its
parents (a regular install run from a checkout). Every module asks here; none counts `parents[N]`.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

PACKAGE_CHECKOUT = Path(__file__).resolve().parents[2]   # <checkout>/src/papeft/paths.py, when run from one


def _has_configs(root: Path) -> bool:
    return (root / "configs" / "config.yaml").is_file()


@lru_cache(maxsize=None)
def project_root() -> Path | None:
    """The checkout holding `configs/`, or None (configs given by $PAPEFT_CONFIGS, or not found)."""
    for root in (PACKAGE_CHECKOUT, Path.cwd(), *Path.cwd().parents):
        if _has_configs(root):
            return root
    return None


def config_dir() -> Path:
    """The `configs/` folder (Hydra's config path)."""
    env = os.environ.get("PAPEFT_CONFIGS")
    if env:
        path = Path(env).expanduser()
        if not (path / "config.yaml").is_file():
            raise FileNotFoundError(f"PAPEFT_CONFIGS={env}: expected a folder holding config.yaml (papeft's configs/)")
        return path
    root = project_root()
    if root is None:
        raise FileNotFoundError(
            f"papeft's configs/ not found: looked beside the package ({PACKAGE_CHECKOUT}) and in {Path.cwd()} "
            "and its parents; run from the checkout or set PAPEFT_CONFIGS=<checkout>/configs")
    return root / "configs"


def config_group(group: str) -> Path:
    """One config group's folder, e.g. `config_group("backbone")` -> configs/backbone."""
    return config_dir() / group


def group_file(group: str, name: str) -> dict:
    """configs/<group>/<name>.yaml loaded on its own and resolved: for a file without a defaults list (a
    method, a backbone); one with a defaults list (a task) is read with `composed`."""
    from omegaconf import OmegaConf

    path = config_group(group) / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in config_group(group).glob("*.yaml"))
        raise FileNotFoundError(f"{group} '{name}': {path} does not exist; known: {known}")
    cfg = OmegaConf.load(path)
    if "defaults" in cfg:
        raise ValueError(f"{path} has a defaults list: read it with papeft.paths.composed({group!r}, {name!r})")
    return OmegaConf.to_container(cfg, resolve=True)


def composed(group: str, name: str) -> dict:
    """configs/<group>/<name>.yaml as a run composes it (its defaults list merged in), resolved: what a
    script outside Hydra's entry point must use instead of loading the file (a task file's split settings
    live in task/shared/split.yaml)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    # the paper's trainer, whose file sets no key of another group: the default trainer (the CPU protocol)
    # also sets task keys (split, caps), which are not the task file's
    overrides = [f"{group}={name}"] + (["trainer=default"] if group != "trainer" else [])
    if GlobalHydra.instance().is_initialized():             # inside run.py (or a test's initialize())
        cfg = compose("config", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
    return OmegaConf.to_container(cfg[group], resolve=True)

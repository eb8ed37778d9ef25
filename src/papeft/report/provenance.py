"""Where a result came from: package versions, the device, and the project's git commit.

Every run's `metrics.json` carries `environment()`; the report prints the commits of the
runs it tabulates under each table, so a number can always be traced to the code that made it.
"""
from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from papeft.paths import project_root

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "tokenizers",
            "hydra-core", "omegaconf", "numpy", "gguf", "evaluate", "sqlparse", "rouge-score")


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution, None where it is not installed."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(root: Path | None = None) -> dict[str, Any]:
    """{"commit": sha or None, "dirty": bool or None} of the checkout holding papeft (else the working
    directory). Dirty: tracked files changed since the commit; results/ (the sweep's own outputs) excluded."""
    for root in [root] if root is not None else [project_root() or Path.cwd(), Path.cwd()]:
        commit = _git(root, "rev-parse", "HEAD")
        if commit is not None:
            break
    else:
        return {"commit": None, "dirty": None}
    status = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


CODE_PATHS = ("src", "scripts", "configs", "run.py", "pyproject.toml", "constraints.txt")


def code_commit(root: Path | None = None) -> str | None:
    """'abc1234' (or 'abc1234+dirty') of the last commit that changed the code (CODE_PATHS), not the results
    committed since: what a benchmark of hours ran while a sweep committed its cells. None outside git."""
    root = root or project_root() or Path.cwd()
    paths = [f":(top){p}" for p in CODE_PATHS]                # from anywhere in the checkout
    commit = _git(root, "log", "-1", "--format=%H", "--", *paths)
    if not commit:
        return None
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no", "--", *paths)
    return commit[:7] + ("+dirty" if dirty else "")


def device_name(device) -> str:
    """'cuda: NVIDIA H200' or 'cpu: <processor>, N threads' for a torch device or its name."""
    import torch
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {cpu_model()}, {torch.get_num_threads()} threads"


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def process_git_state() -> tuple[tuple[str, Any], ...]:
    """The checkout's git state at this process's first read (the start of its first run): a sweep
    runs for hours and the code it runs is what it imported then, whatever is committed meanwhile."""
    return tuple(git_state().items())


def environment(device="cpu") -> dict[str, Any]:
    """The block every metrics.json records."""
    return {"packages": package_versions(), "python": platform.python_version(),
            "platform": platform.platform(), "device": device_name(device), "git": dict(process_git_state())}


def short_commit(env: dict | None) -> str | None:
    """'abc1234' or 'abc1234+dirty' from an environment block; None when unknown."""
    git = (env or {}).get("git") or {}
    commit = git.get("commit")
    if not isinstance(commit, str) or not commit:
        return None
    return commit[:7] + ("+dirty" if git.get("dirty") else "")

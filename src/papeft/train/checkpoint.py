"""Resumable training: checkpoints, the config hash that says which run they belong to, pre-emption.

A checkpoint is ONE file, `{run_dir}/checkpoint/last.safetensors`: every tensor (current and
best-so-far trainable weights, optimizer moments, RNG states) as safetensors, and everything
else (step, the epoch's data order and position, dev history, early-stopping counters,
scheduler, optimizer scalars, Python/NumPy RNG) as JSON in the file's metadata header. No
pickle. It is written to a temporary name and renamed, so a run killed at any point (SIGKILL
included) leaves either the previous checkpoint or the new one, never half of one.

Pre-emption: inside `PreemptionGuard`, SIGTERM, SIGUSR1 and SIGUSR2 (SLURM's and submitit's
warning signals) only set a flag; the trainer saves a checkpoint at the next step boundary and
then hands over to the previous handler (submitit requeues the job) or exits with
`EXIT_PREEMPTED` (75, EX_TEMPFAIL: "try again"), which scripts/slurm/*.sbatch requeue.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from papeft.io import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "last.safetensors"
FORMAT_VERSION = 1
EXIT_PREEMPTED = 75                    # sysexits.h EX_TEMPFAIL: the sbatch scripts requeue on it
PREEMPT_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGUSR1", "SIGUSR2")) if s)

# Keys that cannot change a run's result: where files go, logging, resuming, progress bars; and the CPU
# protocol's lookup tables (configs/trainer/cpu.yaml: task -> split / steps / test size, method -> rate),
# whose selected entries are resolved into `task.*` and `trainer.*`, which the hash covers; so filling in
# another method's rate does not invalidate a finished cell of this one.
HASH_EXCLUDED = frozenset({"output_root", "tables_root", "experiment_name", "cuts", "floor_run", "resume", "wandb", "hydra",
                           "data.root", "trainer.progress", "trainer.checkpoint_every",
                           "split_protocols", "cpu_steps", "cpu_tests", "lrs"})


class Preempted(SystemExit):
    """Raised after a checkpoint was saved on a pre-emption signal; exits with `EXIT_PREEMPTED`."""

    def __init__(self, signum: int, step: int):
        super().__init__(EXIT_PREEMPTED)
        self.signum, self.step = signum, step

    def __str__(self) -> str:
        return f"pre-empted by {signal.Signals(self.signum).name} at step {self.step}: checkpoint saved"


class NonFiniteLossError(RuntimeError):
    """A loss or gradient norm became NaN or infinite; the last good checkpoint is kept."""


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be resumed (truncated, garbled, not this code's layout)."""

    def __init__(self, path: Path, cause: BaseException):
        super().__init__(f"{path} cannot be resumed ({type(cause).__name__}: {cause}). Delete it, or rerun this "
                         f"cell with resume=never to start it from scratch.")
        self.path = path


# ---------------------------------------------------------------------------- config hash

def _strip(node: Any, prefix: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _strip(v, f"{prefix}{k}.") for k, v in sorted(node.items())
                if f"{prefix}{k}" not in HASH_EXCLUDED and k != "cache_dir"}
    if isinstance(node, (list, tuple)):
        return [_strip(v, prefix) for v in node]
    return node


def config_hash(resolved: dict) -> str:
    """16 hex digits of sha256 over the resolved run config, without keys that cannot change the
    result (paths, logging, resume policy, `cache_dir`s, progress bars, checkpoint frequency, the CPU
    protocol's lookup tables: `HASH_EXCLUDED`)."""
    text = json.dumps(_strip(resolved), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- state <-> tensors + JSON

def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    head = f"{prefix}/"
    return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict split into tensors (`{param_index}/{key}`) and JSON."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}/{key}"] = value
            else:
                scalars[f"{idx}/{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = flat.split("/", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state(data_generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """Every random number generator a run draws from: Python, NumPy, torch (CPU, CUDA), data order."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "data": data_generator.get_state(),
               "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss_next = random.getstate()
    meta = {"python": [version, list(internal), gauss_next], "numpy": [kind, int(pos), int(has_gauss), float(gauss)]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict, data_generator: torch.Generator) -> None:
    torch.set_rng_state(tensors["torch"])
    data_generator.set_state(tensors["data"])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------- the file

class Checkpointer:
    """Reads and writes one run's checkpoint; a checkpoint of another config is never resumed."""

    def __init__(self, directory: str | Path, config_hash: str, every: int = 0, write: bool = True):
        self.directory, self.config_hash, self.every, self.write = Path(directory), config_hash, every, write

    @property
    def path(self) -> Path:
        return self.directory / CHECKPOINT_FILE

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Atomically replace the checkpoint (no-op on processes that do not write files)."""
        if not self.write:
            return
        header = {"format": FORMAT_VERSION, "config_hash": self.config_hash, "state": state}
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        with atomic_path(self.path) as tmp:
            save_file(cpu, str(tmp), metadata={"papeft": json.dumps(header)})
        log.info("checkpoint at step %s -> %s", state.get("train", {}).get("step"), self.path)

    def load(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors, state) of this config's checkpoint; None when there is none (or it is another config's);
        CheckpointError (naming the file and what to do) when it cannot be read."""
        if not self.path.exists():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get("papeft", "{}"))
                if header.get("format") != FORMAT_VERSION or header.get("config_hash") != self.config_hash:
                    log.warning("ignoring %s: written for another config (hash %s, this run %s)",
                                self.path, header.get("config_hash"), self.config_hash)
                    return None
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if not isinstance(header.get("state"), dict) or not isinstance(header["state"].get("train"), dict):
                raise ValueError("its header has no training state")
        except Exception as exc:  # noqa: BLE001  (safetensors, JSON and layout errors alike)
            raise CheckpointError(self.path, exc) from exc
        return tensors, header["state"]

    def clear(self) -> None:
        if self.write and self.directory.exists():
            shutil.rmtree(self.directory)


def peek_step(run_dir: str | Path) -> int | None:
    """The step of the checkpoint under `run_dir`, read from the header only (None if absent or unreadable)."""
    path = Path(run_dir) / CHECKPOINT_DIR / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            step = json.loads(f.metadata()["papeft"])["state"]["train"]["step"]
    except Exception as exc:  # noqa: BLE001  (recording a failure must not fail on the checkpoint)
        log.warning("cannot read the step of %s: %s: %s", path, type(exc).__name__, exc)
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


# ---------------------------------------------------------------------------- pre-emption

class PreemptionGuard:
    """While active, SIGTERM/SIGUSR1/SIGUSR2 set `signum` instead of killing the process.

    `handover()` (after the caller saved a checkpoint) restores the previous handlers and passes
    the signal on: a Python handler (submitit's requeue) is called; otherwise, or if it returns,
    `Preempted` is raised. Outside the main thread no handler can be installed: a no-op.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _flag(self, signum, frame) -> None:
        log.warning("caught %s: checkpoint at the next step boundary", signal.Signals(signum).name)
        self.signum = signum

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._flag) for s in PREEMPT_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def handover(self, step: int) -> None:
        signum, previous = self.signum, self._previous.get(self.signum)
        self.__exit__()
        if callable(previous):
            previous(signum, None)
        raise Preempted(signum, step)

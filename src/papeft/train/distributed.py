"""How the trainer spreads work over processes: one process (default) or data parallel via accelerate.

`trainer.distributed: none` is the plain single-process path (CPU or one GPU): every method here
is then the identity, so that path is unchanged. `trainer.distributed: accelerate` runs under
`accelerate launch` or `torchrun` (one process per GPU; scripts/slurm/ has both launchers):
every process holds the whole batch, takes its slice `batch[rank::world]`, and DDP averages the
gradients; the trainer scales the loss by `world` so the update equals the single-process one.
Dev loss is summed over processes, generation is split over them and gathered. Only rank 0
writes files (checkpoints, adapter, predictions, metrics) and logs to wandb.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Sequence

import torch
from torch import nn

MODES = ("none", "accelerate")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Parallel:
    """Rank, world size, device and the few collective operations the trainer needs."""

    def __init__(self, mode: str = "none", device: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"trainer.distributed={mode!r}; expected one of {MODES}")
        self.mode, self.accelerator = mode, None
        self.rank, self.world = 0, 1
        if mode == "accelerate":
            from accelerate import Accelerator
            from accelerate.utils import DistributedDataParallelKwargs
            # find_unused_parameters: bi-level methods leave some trainable weights without a gradient
            self.accelerator = Accelerator(cpu=device == "cpu", kwargs_handlers=[
                DistributedDataParallelKwargs(find_unused_parameters=True)])
            self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
            self.device = self.accelerator.device
        else:
            self.device = pick_device(device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def is_main_process() -> bool:
        """Rank 0 by the launcher's environment (before any `Parallel` exists)."""
        return int(os.environ.get("RANK", "0")) == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to run training forwards through (DDP around `model` when world > 1)."""
        return model if self.world == 1 else self.accelerator.prepare_model(model)

    def shard(self, items: Sequence) -> list:
        return list(items) if self.world == 1 else list(items[self.rank::self.world])

    def sum(self, *values: float) -> tuple[float, ...]:
        """Element-wise sum over processes (float64)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return tuple(t.tolist())

    def any(self, flag: bool) -> bool:
        return bool(flag) if self.world == 1 else self.sum(float(bool(flag)))[0] > 0

    def gather(self, items: list) -> list:
        """Concatenate every process's `items` in rank order (on every process)."""
        if self.world == 1:
            return items
        from accelerate.utils import gather_object
        return gather_object(items)

    def no_sync(self, model: nn.Module, sync: bool):
        """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
        if self.world == 1 or sync:
            return contextlib.nullcontext()
        return model.no_sync()

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def describe(self) -> dict[str, Any]:
        return {"distributed": self.mode, "world_size": self.world, "device": str(self.device)}

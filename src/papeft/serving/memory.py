"""Peak-memory probes for one generate call, on CPU and CUDA (used by scripts/bench_multitenant.py)."""
from __future__ import annotations

import ctypes
import gc
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def vm_bytes(key: str) -> int:
    """A /proc/self/status field (VmRSS, VmHWM) in bytes."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


class PeakMemory:
    """Peak extra memory of one call: CUDA allocator stats; on CPU the process's peak RSS (VmHWM, reset
    through /proc/self/clear_refs after malloc_trim; NaN where the reset is refused)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)                   # give freed memory back first
        except OSError:
            pass
        self.base = vm_bytes("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")             # reset the peak RSS (Linux >= 4.0)
            self.reset = True
        except OSError:
            self.reset = False

    def extra(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() - self.base
        return max(0, vm_bytes("VmHWM") - self.base) if self.reset else float("nan")


class TensorPeak(TorchDispatchMode):
    """Peak bytes of the tensor storages a call creates and keeps alive, on any device: what
    torch.cuda.max_memory_allocated counts, without the allocator. Slows every op: untimed runs only."""

    def __init__(self, existing):
        super().__init__()
        self.live = {t.untyped_storage().data_ptr() for t in existing}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.live:
                storage = t.untyped_storage()
                ptr, n = storage.data_ptr(), storage.nbytes()
                if ptr:
                    self.live.add(ptr)
                    self.now += n
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, ptr, n)
        return out

    def _free(self, ptr: int, n: int) -> None:
        self.live.discard(ptr)
        self.now -= n

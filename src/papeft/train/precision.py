"""`trainer.precision`: the compute dtype of training, dev loss and generation.

fp32   plain float32 everywhere.
bf16   autocast to bfloat16 (CPU and CUDA); the frozen backbone's parameters are stored in
       bfloat16 (half the memory, no per-call weight casts); trainable weights, their
       gradients and the optimizer state stay float32.
fp16   the same with float16, plus a dynamic loss scale (torch.amp.GradScaler) so small
       gradients do not flush to zero; a step whose gradients overflow is skipped and the
       scale lowered, as GradScaler does.
auto   (the default) per device, from scripts/bench_train.py (README, trainer section):
       CUDA: bf16 where the chip has it (Ampere and later), else fp16.
       CPU: bf16 where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX: oneDNN's
       bf16 kernels), else fp32: without them bfloat16 matmuls run on slow fallback kernels.
Buffers (rotary frequencies) are never cast: the backbone computes positions in float32.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHOICES = ("auto", *PRECISIONS)


def cpu_has_native_bf16() -> bool:
    """oneDNN has bf16 kernels for this CPU (AVX512-BF16 or AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve(name: str, device: torch.device) -> str:
    """`auto` -> the default of this device; anything else checked and returned."""
    if name not in CHOICES:
        raise ValueError(f"trainer.precision={name!r}; expected one of {CHOICES}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


class Precision:
    """Autocast, weight storage and (fp16) loss scaling for one trainer."""

    def __init__(self, name: str, device: torch.device):
        self.name = resolve(name, device)
        self.dtype = PRECISIONS[self.name]
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type) if self.name == "fp16" else None

    def autocast(self):
        """The context every forward runs in (training, dev loss, generation)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def store_frozen(self, model: nn.Module) -> None:
        """bf16/fp16: frozen floating-point parameters in the compute dtype, trainable ones in float32.
        fp32: nothing changes (a backbone loaded in bfloat16, `backbone.dtype`, stays so)."""
        if self.dtype == torch.float32:
            return
        for p in model.parameters():
            if p.is_floating_point():
                want = torch.float32 if p.requires_grad else self.dtype
                if p.dtype != want:
                    p.data = p.data.to(want)

    # ---- the optimizer step: identity operations unless fp16 ----
    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients back to their true size (before clipping and the non-finite check)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    @property
    def skips_overflow(self) -> bool:
        """A non-finite gradient norm is a skipped step (fp16), not a failed run."""
        return self.scaler is not None

    def state_dict(self) -> dict:
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

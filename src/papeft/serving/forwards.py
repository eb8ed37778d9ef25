"""Forwards patched for one engine call or one decode step: a module's output (or input) scaled per row.

Patching `module.forward` is cheaper than a forward hook: a decode step runs 3 of these per layer.
"""
from __future__ import annotations

import torch
from torch import nn

from papeft.methods.role_scaling import scale_rows


def scaled_forward(base, s: torch.Tensor, side: str):
    """A module's forward (`base`) with its output (side "out") or input (side "in") scaled by s (P, 1, W):
    one scale per prompt (its beams share it, role_scaling.scale_rows) or, P = rows, one per row.

    The output of a linear is fresh and is scaled in place; an input may be shared (q, k, v), so out of place.
    """
    if side == "out":
        def forward(*args, **kwargs):
            return scale_rows(base(*args, **kwargs), s, in_place=True)      # (P*beams, T, W)
    else:
        def forward(x, *args, **kwargs):
            return base(scale_rows(x, s), *args, **kwargs)
    return forward


class PatchedForwards:
    """Forwards replaced for one call: `patch(module, wrap)` sets module.forward = wrap(its current
    forward); `restore()` gives every module back what it had before (the class's forward, or an
    instance patch such as accelerate's), last patched first."""

    def __init__(self):
        self.patched: list[tuple[nn.Module, object]] = []

    def patch(self, module: nn.Module, wrap) -> None:
        self.patched.append((module, module.__dict__.get("forward")))
        module.forward = wrap(module.forward)

    def restore(self) -> None:
        for mod, own in reversed(self.patched):
            if own is None:
                del mod.forward
            else:
                mod.forward = own
        self.patched.clear()

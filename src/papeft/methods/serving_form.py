"""What a server needs from a method: its *serving form*, one of four ways a batch row can be adapted.

A server keeps one frozen backbone and mixes many tenants in one batch. What it does for a
row depends only on the form of that row's method, never on the method itself:

* `PromptVectors`  per-row scaling vectors, computed at prefill from the row's prompt by one
                   generator per layer (PARADE, PARA, PEDRO);
* `StaticScales`   fixed vectors scaling a module's output or input features ((IA)3, ours and peft's);
* `LowRankDeltas`  LoRA's A and B per module: y = W x + (alpha / r) B A x;
* `SoftPrompts`    an (m, d) prompt made for each request and prepended to its embeddings (LoPA).

A method declares its form where it is defined: `AdaptedModel.serving_form(backbone)` returns
one of these (None: the method cannot be served). A servable new method is therefore its
module and its YAML; the server (stage 4) reads only this protocol, and this module (stage 2)
never imports the server.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from papeft.backbone.architectures import RoleSite

SiteKey = tuple[int, str, str]   # (layer, module path in the layer, "out" | "in")


class ServingForm:
    """Base of the forms. `placed` puts the weights where the server computes."""

    def placed(self, device: torch.device, dtype: torch.dtype) -> "ServingForm":
        """This form with its weights on `device`, in `dtype` (float32 or wider) where the form keeps
        plain tensors; modules keep their own dtype (their maths casts its inputs)."""
        return self


@dataclass
class PromptVectors(ServingForm):
    """One `VectorGenerator` per layer, run at prefill on each row's prompt; its vectors scale `sites`."""
    generators: nn.ModuleList            # layer i -> VectorGenerator, weights loaded
    sites: list[RoleSite]                # where each role's vector acts (architectures.role_sites, scaling)

    def placed(self, device, dtype) -> "PromptVectors":
        self.generators = self.generators.to(device).eval()
        return self


@dataclass
class StaticScales(ServingForm):
    """Per (layer, module, side) one scale over the module's full feature width (1 where no role acts)."""
    scales: dict[SiteKey, torch.Tensor] = field(default_factory=dict)    # (width,)

    def placed(self, device, dtype) -> "StaticScales":
        self.scales = {k: v.to(device, dtype) for k, v in self.scales.items()}
        return self


@dataclass
class LowRankDeltas(ServingForm):
    """LoRA: per (layer, module path) A (r, in) and B (out, r); the delta is (alpha / r) B A x."""
    rank: int
    alpha: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def placed(self, device, dtype) -> "LowRankDeltas":
        self.weights = {k: (A.to(device, dtype), B.to(device, dtype)) for k, (A, B) in self.weights.items()}
        return self


@dataclass
class SoftPrompts(ServingForm):
    """A request's prompt ids (T,) -> its soft prompt (m, d); the method's own weights, already placed
    by the method next to the serving backbone it reads."""
    make: Callable[[torch.Tensor], torch.Tensor]
    weights: dict[str, torch.Tensor]     # what the tenant keeps resident (for memory accounting)


def layer_tensors(state: dict[str, torch.Tensor], suffix: str) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, module path): tensor} for state keys ending in `suffix`, e.g. peft's
    `...layers.3.self_attn.q_proj.lora_A.default.weight` or GPT-2's `...h.3.attn.c_attn...`."""
    pattern = re.compile(rf"\.(?:layers|h)\.(\d+)\.(.+)\.{re.escape(suffix)}$")
    out = {}
    for name, t in state.items():
        m = pattern.search(name)
        if m:
            out[(int(m.group(1)), m.group(2))] = t
    return out

"""Bottleneck adapters: Houlsby (sequential), Parallel (He et al. 2021) and AdapterDrop, as PARADE configures them.

One module, `Bottleneck`: x -> up(act(down(x))), with `up` zero-initialised so
every adapter adds exactly nothing at step 0. Where it sits is the method:

* `houlsby` (PARADE App. E: bottleneck 18): after the attention block and
  after the FFN, y' = y + adapter(y) on the outputs of the `o` and `down`
  roles; 32 x 2 x 2 x 4096 x 18 = 9.44M weights on LLaMA-2 7B (paper: 9.4M).
* `parallel` (bottleneck 36): beside the whole decoder layer, reading the
  layer's input x and adding adapter(x) to the layer's output;
  32 x 2 x 4096 x 36 = 9.44M weights on LLaMA-2 7B (paper: 9.4M).
* `adapterdrop`: Houlsby adapters with the lowest layers' adapters removed.

Counts are weights only (the papers' convention); the adapters' biases are
reported in the with-bias count.

Our reading where the papers are silent:
* Houlsby placement in a pre-norm decoder: on the sublayer's output projection
  (o_proj / down_proj), before the residual add; a forward hook on those role
  modules places it the same way on every architecture.
* Activation ReLU (the adapters of He et al. 2021); `down` ~ N(0, 0.02), zero biases.
* AdapterDrop drops ceil(`drop_fraction` x L) lowest layers. 1/32 (one layer on
  LLaMA-2 7B) gives 31 x 294,912 = 9.14M, the closest count to the paper's 9.2M
  (no drop: 9.44M); on other depths the same fraction drops at least one layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from papeft.backbone.architectures import ROLE_PATHS, decoder_layers, model_type
from papeft.config_checks import at_least, between, one_of
from papeft.methods.base import AdaptedModel, register_method
from papeft.methods.vector_generator import ACTIVATIONS

PLACEMENTS = {"houlsby": "sequential", "adapterdrop": "sequential", "parallel": "parallel"}
SEQUENTIAL_ROLES = ("o", "down")     # after attention, after the FFN


@dataclass
class AdapterConfig:
    bottleneck: int = 18
    activation: str = "relu"
    drop_fraction: float = 0.0       # share of the lowest layers without adapters (AdapterDrop)

    CHECKS: ClassVar[dict] = {"bottleneck": at_least(1), "activation": one_of(*ACTIVATIONS),
                              "drop_fraction": between(0, 1, high_open=True)}


class Bottleneck(nn.Module):
    """up(act(down(x))): d -> r -> d, exactly zero at init."""

    def __init__(self, d: int, r: int, activation: str):
        super().__init__()
        self.down = nn.Linear(d, r)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(r, d)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:               # (B, T, d) -> (B, T, d)
        return self.up(self.act(self.down(x.to(self.down.weight.dtype)))).to(x.dtype)


def dropped_layers(num_layers: int, drop_fraction: float) -> int:
    if not 0.0 <= drop_fraction < 1.0:
        raise ValueError(f"method.drop_fraction={drop_fraction}: expected a share of layers in [0, 1)")
    return math.ceil(drop_fraction * num_layers - 1e-9)


class AdapterModel(AdaptedModel):
    def __init__(self, model: nn.Module, config: AdapterConfig, method: str):
        super().__init__(model, method, config)
        if config.bottleneck < 1:
            raise ValueError(f"method.bottleneck={config.bottleneck}: expected a positive size")
        if config.activation not in ACTIVATIONS:
            raise ValueError(f"method.activation='{config.activation}': expected one of {sorted(ACTIVATIONS)}")
        self.placement = PLACEMENTS[method]
        layers = decoder_layers(model)
        self.first_adapted_layer = dropped_layers(len(layers), config.drop_fraction)
        d, r = model.config.hidden_size, config.bottleneck
        names = ("block",) if self.placement == "parallel" else SEQUENTIAL_ROLES
        self.adapters = nn.ModuleList(                                # [layer][name]; empty if dropped
            nn.ModuleDict({} if i < self.first_adapted_layer else
                          {name: Bottleneck(d, r, config.activation) for name in names})
            for i in range(len(layers)))
        paths = ROLE_PATHS[model_type(model)]
        for layer, adapters in zip(layers, self.adapters):
            for name, adapter in adapters.items():
                if name == "block":
                    layer.register_forward_hook(self._parallel_hook(adapter), with_kwargs=True)
                else:
                    layer.get_submodule(paths[name]).register_forward_hook(self._sequential_hook(adapter))

    @staticmethod
    def _sequential_hook(adapter: Bottleneck):
        def hook(module, args, out):                                  # out: (B, T, d)
            return out + adapter(out)
        return hook

    @staticmethod
    def _parallel_hook(adapter: Bottleneck):
        def hook(layer, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]          # layer input (B, T, d)
            if isinstance(out, tuple):                                # (hidden_states, *extras)
                return (out[0] + adapter(x), *out[1:])
            return out + adapter(x)
        return hook


@register_method("houlsby", AdapterConfig)
@register_method("parallel", AdapterConfig)
@register_method("adapterdrop", AdapterConfig)
def apply_adapters(model: nn.Module, config: AdapterConfig, name: str) -> AdapterModel:
    return AdapterModel(model, config, name)

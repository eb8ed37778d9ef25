"""(IA)3 and BitFit as PARADE configures them: a learned low-dim vector per layer and role, projected up.

PARADE Appendix E sizes both baselines to its budget by learning each vector
in a small dimension r' and projecting it up with a learnable matrix:

    delta = v P                      # v: (r',) learned, P: (r', width) learned
    (IA)3:  y' = (1 + delta) * y     # "scale":  multiplies the role's activations
    BitFit: y' = y + delta           # "add":    a bias on the role's activations

(IA)3 (`type: ia3`): Query, Key and Up activations (on a non-gated FFN, the
activation's output: architectures.role_sites), r'=16; 9.83M on LLaMA-2 7B
(paper: 9.8M). BitFit (`type: bitfit`): all seven linear outputs, r'=8;
10.88M on LLaMA-2 7B (paper: 10.9M). Neither reads the prompt: the vectors
are the same for every input, so they can be folded into the backbone.

One forward hook per scaled module applies every role that lives in it; for a
fused QKV module (GPT-2 `c_attn`, GPT-NeoX `query_key_value`) only the role's
features (`RoleSite.index`) move, the rest of the output is untouched.

Our reading where the paper is silent:
* Init: v ~ N(0, `vector_init_std`=0.02) and P = 0, so delta = 0 at step 0 and
  both methods are exactly the backbone; P gets gradients through v at once
  (if both started at zero neither would ever move). For (IA)3 the constant 1
  is not learned: it puts the identity at delta = 0.
* No parameter is named "bias", so both counts (with / without biases) are equal.
* BitFit is defined over "all linears": with the seven linear roles as targets,
  roles the architecture lacks (GPT-2 / GPT-NeoX have no gate) are skipped.
  Any other target list must name roles that exist.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from papeft.backbone.architectures import (LINEAR_ROLES, RoleSite, decoder_layers, full_width, module_width,
                                           resolve_targets, role_sites, sites_by_module)
from papeft.config_checks import at_least, role_names
from papeft.methods.base import AdaptedModel, register_method
from papeft.methods.role_scaling import hook_role_sites, scale_rows
from papeft.methods.serving_form import StaticScales

OPERATIONS = {"ia3": "scale", "bitfit": "add"}   # registry key -> how delta acts on the output


@dataclass
class ProjectedVectorConfig:
    r: int = 16                                  # r': the learned vector's dimension
    targets: list[str] = field(default_factory=lambda: ["q", "k", "up"])
    vector_init_std: float = 0.02

    CHECKS: ClassVar[dict] = {"r": at_least(1), "targets": role_names(LINEAR_ROLES), "vector_init_std": at_least(0.0)}


class ProjectedVector(nn.Module):
    """delta = v P: an r-dim learned vector projected up to `width` features (zero at init)."""

    def __init__(self, r: int, width: int, init_std: float):
        super().__init__()
        self.vector = nn.Parameter(torch.randn(r) * init_std)          # (r,)
        self.projection = nn.Parameter(torch.zeros(r, width))         # (r, width)

    def forward(self) -> torch.Tensor:
        return self.vector @ self.projection                          # (width,)


class ProjectedVectorModel(AdaptedModel):
    def __init__(self, model: nn.Module, config: ProjectedVectorConfig, method: str):
        super().__init__(model, method, config)
        if config.r < 1:
            raise ValueError(f"method.r={config.r}: expected a positive vector dimension")
        if config.vector_init_std <= 0:
            raise ValueError(f"method.vector_init_std={config.vector_init_std}: expected > 0 "
                             "(a zero vector and a zero projection would never train)")
        self.operation = OPERATIONS[method]
        self.sites = role_sites(model, resolve_targets(model, list(config.targets)),
                                scaling=self.operation == "scale")
        self.vectors = nn.ModuleList(                                 # [layer][role] -> ProjectedVector
            nn.ModuleDict({s.role: ProjectedVector(config.r, s.width, config.vector_init_std)
                           for s in self.sites})
            for _ in decoder_layers(model))
        hook_role_sites(model, self.sites, self._make_hook)

    def _deltas(self, i: int, sites: list[RoleSite], width: int) -> torch.Tensor:
        """Layer i's delta over a module's `width` features: v P on each role's slice, 0 elsewhere."""
        return full_width(sites, {s.role: self.vectors[i][s.role]() for s in sites}, width, 0.0)   # (width,)

    def _make_hook(self, i: int, sites: list[RoleSite]):
        def apply(x):                                                 # (B, T, width)
            delta = self._deltas(i, sites, x.shape[-1]).to(x.dtype)
            return scale_rows(x, 1 + delta) if self.operation == "scale" else x + delta
        return apply

    def serving_form(self, backbone: nn.Module) -> StaticScales | None:
        """(IA)3: the scales 1 + v P are the same for every input; BitFit (an added bias) is not served."""
        if self.operation != "scale":
            return None
        layers = decoder_layers(self.model)
        scales = {}
        for i in range(len(layers)):
            for (path, side), sites in sites_by_module(self.sites).items():
                width = module_width(layers[0].get_submodule(path), side)
                scales[(i, path, side)] = 1 + self._deltas(i, sites, width).detach()
        return StaticScales(scales)


@register_method("ia3", ProjectedVectorConfig)
@register_method("bitfit", ProjectedVectorConfig)
def apply_projected_vectors(model: nn.Module, config: ProjectedVectorConfig, name: str) -> ProjectedVectorModel:
    return ProjectedVectorModel(model, config, name)

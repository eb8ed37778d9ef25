"""Role vectors acting on a module's features: one mechanism for training and serving.

PARADE's l_q, l_v, l_u (eq. 4-5) and the (IA)3 / BitFit vectors each belong to a role; a role
lives in a slice of one module's output (or input) features (`architectures.RoleSite`; GPT-2's
fused `c_attn` holds Q, K and V). Every user goes through the same three steps:

* `architectures.full_width`: a module's feature vector from its roles' vectors (other features: 1 or 0);
* `scale_rows`: features (R, T, W) times per-row scales (P, 1, W), R = P * beams (beams prompt-major);
* `hook_role_sites`: one hook per (layer, module, side) applying a method's transform during training.

The serving engine builds its scales with `full_width` and applies them with `scale_rows` in
forwards patched for one call (serving/engine.py).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from papeft.backbone.architectures import RoleSite, decoder_layers, hook_features, sites_by_module

Transform = Callable[[torch.Tensor], torch.Tensor]


def scale_rows(x: torch.Tensor, s: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """x (R, T, W) scaled by s (P, 1, W), one scale per prompt, or by s (W,), one for every row.

    R = P * beams with each prompt's beams on adjacent rows: beams fold into the token axis.
    `in_place` only on a fresh tensor nothing else reads (a linear's output at inference).
    """
    same = s.dim() < 3 or s.shape[0] == x.shape[0]
    rows = x if same else (x.view if in_place else x.reshape)(s.shape[0], -1, x.shape[-1])
    if in_place:
        rows.mul_(s)                                          # (P, beams*T, W) view of x
        return x
    return rows * s if rows is x else (rows * s).view_as(x)


def hook_role_sites(model: nn.Module, sites: list[RoleSite],
                    transform_for: Callable[[int, list[RoleSite]], Transform]) -> None:
    """On every decoder layer i, hook each module (and side) where `sites` act with
    `transform_for(i, the sites acting there)`: features (B, T, W) -> features (B, T, W)."""
    for i, layer in enumerate(decoder_layers(model)):
        for (path, side), here in sites_by_module(sites).items():
            hook_features(layer.get_submodule(path), side, transform_for(i, here))

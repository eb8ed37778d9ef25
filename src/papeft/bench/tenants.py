"""Tenants for the serving benchmarks: saved adapters with random weights of a method's shapes
(speed does not depend on the values; random ones make each tenant's answers differ)."""
from __future__ import annotations

from pathlib import Path

import torch

from papeft.methods import build_method
from papeft.paths import group_file
from papeft.serving.tenants import meta_skeleton


def random_adapter(hf_config, method_yaml: str, seed: int, directory: Path) -> Path:
    """A saved adapter with random weights of the method's shapes (built on a meta skeleton)."""
    cfg = group_file("method", method_yaml)
    adapted = build_method(meta_skeleton(hf_config), cfg)
    g = torch.Generator().manual_seed(seed)
    state = adapted.trainable_state_dict()
    for name, p in state.items():
        if ".act." not in name:                                      # keep PEDRO's rational at its init
            state[name] = torch.randn(p.shape, generator=g) * 0.02 + (1.0 if name.endswith("up.bias") else 0.0)
    adapted.load_trainable_state_dict(state)                         # meta parameters take the tensors
    return adapted.save_adapter(directory)

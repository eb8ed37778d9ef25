"""One map per architecture from *roles* (q, k, v, o, gate, up, down) to modules.

Every method reads this map instead of hard-coding module names, so a method is
written once and works on Llama, Gemma, Mistral, Qwen2, GPT-2 and GPT-NeoX.

A role lives at a `RoleSite`: a module inside a decoder layer plus the output
features that belong to the role. Most architectures have one linear per role
(`index=None`, the whole output). GPT-2's fused `c_attn` holds Q, K and V as
three contiguous thirds; GPT-NeoX's `query_key_value` interleaves them per head
as (heads, 3, head_dim), so its roles are strided index sets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

LLAMA_LIKE = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
    "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
# model_type -> role -> module path inside one decoder layer (fused roles share a path)
ROLE_PATHS: dict[str, dict[str, str]] = {
    "llama": LLAMA_LIKE, "mistral": LLAMA_LIKE, "qwen2": LLAMA_LIKE,
    "gemma": LLAMA_LIKE, "gemma2": LLAMA_LIKE,
    "gpt2": {"q": "attn.c_attn", "k": "attn.c_attn", "v": "attn.c_attn",
             "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
    "gpt_neox": {"q": "attention.query_key_value", "k": "attention.query_key_value",
                 "v": "attention.query_key_value", "o": "attention.dense",
                 "up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"},
}
LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class RoleSite:
    role: str
    path: str                  # module path inside the decoder layer
    width: int                 # number of output features that belong to the role
    index: torch.Tensor | None  # (width,) positions in the module output, None = all of it


def model_type(model: nn.Module) -> str:
    mt = model.config.model_type
    if mt not in ROLE_PATHS:
        raise ValueError(f"architecture '{mt}' has no role map; known: {sorted(ROLE_PATHS)}")
    return mt


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a *CausalLM (or a peft wrapper of one)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = base.base_model
    for name in ("layers", "h"):
        if hasattr(inner, name):
            return getattr(inner, name)
    raise ValueError(f"cannot find the decoder layers of {type(base).__name__}")


def _out_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.weight.shape[1]  # transformers' Conv1D stores (in, out)


def role_sites(model: nn.Module, roles: list[str]) -> list[RoleSite]:
    """Where each requested role lives in a decoder layer (layer 0 is representative)."""
    mt = model_type(model)
    cfg = model.config
    layer = decoder_layers(model)[0]
    sites = []
    for role in roles:
        if role not in ROLE_PATHS[mt]:
            raise ValueError(f"role '{role}' does not exist in architecture '{mt}' "
                             f"(it has {sorted(ROLE_PATHS[mt])})")
        path = ROLE_PATHS[mt][role]
        out = _out_features(layer.get_submodule(path))
        index = None
        if mt == "gpt2" and role in ("q", "k", "v"):          # [Q | K | V], each d wide
            d = out // 3
            start = "qkv".index(role) * d
            index = torch.arange(start, start + d)
        elif mt == "gpt_neox" and role in ("q", "k", "v"):    # (heads, 3, head_dim) interleaved
            heads = cfg.num_attention_heads
            hd = out // (3 * heads)
            grid = torch.arange(out).view(heads, 3, hd)
            index = grid[:, "qkv".index(role), :].reshape(-1)
        width = out if index is None else index.numel()
        sites.append(RoleSite(role, path, width, index))
    return sites


def lora_target_modules(model: nn.Module, roles: list[str]) -> list[str]:
    """peft `target_modules` (leaf names) for the given roles; fused roles collapse to one module."""
    mt = model_type(model)
    return sorted({ROLE_PATHS[mt][r].split(".")[-1] for r in roles})

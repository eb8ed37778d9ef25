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
    width: int                 # number of features that belong to the role
    index: torch.Tensor | None  # (width,) positions among the module's features, None = all of them
    side: str = "out"          # "out": the module's output features; "in": its input features


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


def module_width(module: nn.Module, side: str = "out") -> int:
    """Output (or input) features of a linear or of transformers' Conv1D, which stores (in, out)."""
    if isinstance(module, nn.Linear):
        return module.out_features if side == "out" else module.in_features
    return module.weight.shape[1 if side == "out" else 0]


def is_gated(model: nn.Module) -> bool:
    """A gated FFN, down(act(gate x) * up x), as Llama and Gemma have; GPT-2 and GPT-NeoX have down(act(up x))."""
    return "gate" in ROLE_PATHS[model_type(model)]


def role_sites(model: nn.Module, roles: list[str], scaling: bool = False) -> list[RoleSite]:
    """Where each requested role lives in a decoder layer (layer 0 is representative).

    `scaling`: the sites where a vector that *scales* the role's activations acts (PARADE eq. 5,
    (IA)3). The same, except `up` on a non-gated FFN: there it scales the activation's output,
    the input of `down` (our reading). In a gated FFN, scaling U scales act(G) * U, the input of
    `down`, so both architectures scale the same representation; scaling the output of GPT-2's
    `c_fc` would instead scale the activation's input. (IA)3 scales there for T5's non-gated FFN.
    """
    mt = model_type(model)
    cfg = model.config
    layer = decoder_layers(model)[0]
    sites = []
    for role in roles:
        if role not in ROLE_PATHS[mt]:
            raise ValueError(f"role '{role}' does not exist in architecture '{mt}' "
                             f"(it has {sorted(ROLE_PATHS[mt])})")
        if scaling and role == "up" and not is_gated(model):
            down = ROLE_PATHS[mt]["down"]
            sites.append(RoleSite(role, down, module_width(layer.get_submodule(down), "in"), None, "in"))
            continue
        path = ROLE_PATHS[mt][role]
        out = module_width(layer.get_submodule(path))
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


def resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The roles to adapt; only the full set of linears drops roles this architecture lacks."""
    unknown = sorted(set(targets) - set(LINEAR_ROLES))
    if unknown or not targets:
        raise ValueError(f"method.targets={list(targets)}: expected a non-empty list of roles "
                         f"from {list(LINEAR_ROLES)}")
    present = ROLE_PATHS[model_type(model)]
    if set(targets) == set(LINEAR_ROLES):
        return [r for r in LINEAR_ROLES if r in present]
    missing = [r for r in targets if r not in present]
    if missing:
        raise ValueError(f"method.targets: role(s) {missing} do not exist in architecture "
                         f"'{model_type(model)}' (it has {sorted(present)})")
    return list(targets)


def lora_target_modules(model: nn.Module, roles: list[str]) -> list[str]:
    """peft `target_modules` for the given roles: module paths inside a decoder layer, which peft matches as
    name suffixes, so `o` on GPT-2 adapts `attn.c_proj` and never `mlp.c_proj`.

    A fused module (GPT-2 `c_attn`, GPT-NeoX `query_key_value`) takes one LoRA over its whole output,
    so it is adapted only when every role it holds is targeted; a subset is refused (peft cannot adapt a
    slice of a module's output), never widened in silence."""
    mt = model_type(model)
    paths = ROLE_PATHS[mt]
    for role in roles:
        fused = sorted(r for r, p in paths.items() if p == paths[role])
        if not set(fused) <= set(roles):
            raise ValueError(f"method.targets={list(roles)}: on '{mt}' the roles {fused} share the fused module "
                             f"'{paths[role]}', which LoRA adapts as a whole; target all of {fused} or none")
    return sorted({paths[r] for r in roles})


def sites_by_module(sites: list[RoleSite]) -> dict[tuple[str, str], list[RoleSite]]:
    """(module path, side) -> the sites that act there (fused QKV: several roles on one module)."""
    grouped: dict[tuple[str, str], list[RoleSite]] = {}
    for s in sites:
        grouped.setdefault((s.path, s.side), []).append(s)
    return grouped


def full_width(sites: list[RoleSite], vectors: dict[str, torch.Tensor], width: int, fill: float) -> torch.Tensor:
    """One module's features from its roles' vectors {role: (..., role width)}: each role's slice holds its
    vector, features of no role hold `fill` (1 for a scale, 0 for a bias). -> (..., width)."""
    if len(sites) == 1 and sites[0].index is None:
        return vectors[sites[0].role]
    first = vectors[sites[0].role]
    out = first.new_full((*first.shape[:-1], width), fill)
    for s in sites:
        out = out.index_copy(-1 % out.dim(), s.index.to(out.device), vectors[s.role].to(out.dtype))
    return out


def hook_features(module: nn.Module, side: str, fn) -> torch.utils.hooks.RemovableHandle:
    """Register `fn(features) -> features` on a module's output (side "out") or its first input ("in")."""
    if side == "out":
        return module.register_forward_hook(lambda mod, args, out: fn(out))
    return module.register_forward_pre_hook(lambda mod, args: (fn(args[0]), *args[1:]))

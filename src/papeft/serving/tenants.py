"""Tenants: saved adapters turned into weights that a batch can gather row by row.

A tenant is loaded from the directory `AdaptedModel.save_adapter` writes
(`adapter_config.json` with `method`, `config`, `backbone` fingerprint, and
`adapter.safetensors`). Loading refuses, with a `TenantError` that names the
directory and says why, every malformed adapter: a missing or unreadable
directory or config, a config of the wrong shape, a method nobody registered,
config values of the wrong type or range (the method's own checks), an adapter
saved for another backbone, a corrupt or truncated safetensors file, tensors
that are not floating point, not finite, or beyond the serving dtype's range,
tensors whose names or shapes do not fit the method; any other failure while
rebuilding it is refused the same way. The engine then runs one probe prompt
through the new tenant and refuses it when the outputs are not finite (weights
that would make every answer meaningless).

The method is rebuilt on a *meta-device skeleton* of the serving backbone (same
config, no weight memory), which both validates the saved tensors against the
method's own layout and, for modules created off the skeleton (vector
generators), holds the loaded weights. The serving backbone is never touched.

Tenant kinds (what the engine does with each row):
* `VectorTenant`       PARADE / PARA / PEDRO (any `PromptAwareModel`): per-layer vector
                       generators, run at prefill on the row's prompt.
* `StaticScaleTenant`  (IA)3, ours and peft's: fixed per-layer vectors scaling a
                       module's output or input; no prompt dependence.
* `LoraTenant`         LoRA A/B per module (served gathered or through peft).
* `SoftPromptTenant`   LoPA: the tenant's prompt encoder makes each request's (m, d)
                       soft prompt before the batch runs; it is prepended to that row's
                       embeddings. LoPA is rebuilt on the serving backbone itself, which
                       it only reads (input embeddings for its `encoder: backbone`).
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call, vmap
from transformers import AutoModelForCausalLM

from papeft.backbone.architectures import ROLE_PATHS, decoder_layers, model_type, module_width
from papeft.methods import build_method  # registers every method
from papeft.methods.base import ADAPTER_CONFIG, ADAPTER_WEIGHTS, METHODS, AdaptedModel, backbone_fingerprint
from papeft.methods.prompt_aware import PromptAwareModel


class TenantError(ValueError):
    """An adapter the engine cannot serve; the message names the directory and the reason."""


# ---- tenant kinds ----------------------------------------------------------
SiteKey = tuple[int, str, str]   # (layer, module path in the layer, "out" | "in")


@dataclass
class Tenant:
    name: str
    method: str
    directory: Path
    kind: str = "bare"


@dataclass
class VectorTenant(Tenant):
    generators: nn.ModuleList = None     # one VectorGenerator per layer, weights loaded
    kind: str = "vector"


@dataclass
class StaticScaleTenant(Tenant):
    scales: dict[SiteKey, torch.Tensor] = field(default_factory=dict)   # full module width
    kind: str = "static"


@dataclass
class LoraTenant(Tenant):
    rank: int = 0
    alpha: float = 0.0
    # (layer, module path) -> (A (r, in), B (out, r))
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    kind: str = "lora"

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass
class SoftPromptTenant(Tenant):
    model: AdaptedModel = None           # a SoftPromptModel (LoPA) on the serving backbone
    kind: str = "soft_prompt"

    @torch.no_grad()
    def make_prompt(self, ids: torch.Tensor) -> torch.Tensor:
        """Prompt ids (T,) -> this request's soft prompt (m, d)."""
        x = ids[None]
        return self.model.soft_prompt(x, torch.ones_like(x), torch.ones_like(x))[0]


# ---- reading and validating a saved adapter --------------------------------
def meta_skeleton(config) -> nn.Module:
    """The backbone's architecture on the meta device: shapes without weight memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def read_adapter(directory: str | Path, backbone: nn.Module) -> tuple[AdaptedModel, dict, dict]:
    """(method rebuilt on a skeleton with the weights checked, adapter_config, state); else TenantError."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        method, config, saved_for = meta["method"], meta["config"], meta["backbone"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TenantError(f"{directory}: no readable {ADAPTER_CONFIG} ({type(e).__name__}: {e})") from e
    if not isinstance(method, str) or not isinstance(config, dict) or not isinstance(saved_for, dict):
        raise TenantError(f"{directory}: {ADAPTER_CONFIG} has method {method!r}, config {type(config).__name__}, "
                          f"backbone {type(saved_for).__name__}; expected a string and two mappings")
    if method not in METHODS:
        raise TenantError(f"{directory}: method '{method}' is not registered; known: {sorted(METHODS)}")
    serving = backbone_fingerprint(backbone)
    if saved_for != serving:
        raise TenantError(f"{directory}: adapter was saved for backbone {saved_for}, "
                          f"this engine serves {serving}")
    try:
        state = load_file(str(directory / ADAPTER_WEIGHTS))
    except Exception as e:                       # truncated / garbled header / missing file
        raise TenantError(f"{directory}: corrupt or unreadable {ADAPTER_WEIGHTS} "
                          f"({type(e).__name__}: {e})") from e
    check_values(directory, state, next(backbone.parameters()).dtype)
    try:
        adapted = build_method(meta_skeleton(backbone.config), {"type": method, **config})
        adapted.load_trainable_state_dict(state)
    except Exception as e:  # noqa: BLE001  (whatever the method raises on a bad config: this adapter is refused)
        raise TenantError(f"{directory}: adapter does not fit method '{method}': {e}") from e
    return adapted, meta, state


def check_values(directory: Path, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Every tensor floating point, finite, and within the range of the serving dtype; else TenantError."""
    odd = [f"{n} ({t.dtype})" for n, t in state.items() if not t.is_floating_point()]
    if odd:
        raise TenantError(f"{directory}: {ADAPTER_WEIGHTS} has tensors that are not floating point: {odd[:3]}")
    bad = [n for n, t in state.items() if not torch.isfinite(t).all()]
    if bad:
        raise TenantError(f"{directory}: {ADAPTER_WEIGHTS} has non-finite values in {bad[:3]} (corrupt?)")
    limit = torch.finfo(dtype).max if dtype.is_floating_point else float("inf")
    big = [n for n, t in state.items() if t.numel() and t.abs().max().item() > limit]
    if big:
        raise TenantError(f"{directory}: {ADAPTER_WEIGHTS} has values beyond the serving dtype {dtype} "
                          f"(|x| > {limit:.3g}) in {big[:3]}")


def per_layer(state: dict[str, torch.Tensor], suffix: str) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, module path): tensor} for state keys ending in `suffix` (peft naming:
    `...layers.3.self_attn.q_proj.lora_A.default.weight`, GPT-2's `...h.3.attn.c_attn...`)."""
    pattern = re.compile(rf"\.(?:layers|h)\.(\d+)\.(.+)\.{re.escape(suffix)}$")
    out = {}
    for name, t in state.items():
        m = pattern.search(name)
        if m:
            out[(int(m.group(1)), m.group(2))] = t
    return out


# ---- one loader per kind ----------------------------------------------------
def _lora(name, directory, adapted, meta, state, **_) -> LoraTenant:
    A, B = per_layer(state, "lora_A.default.weight"), per_layer(state, "lora_B.default.weight")
    if not A or set(A) != set(B):
        raise TenantError(f"{directory}: LoRA tensors are not paired A/B per module")
    cfg = adapted.config                         # checked, defaults filled in
    return LoraTenant(name, meta["method"], directory, rank=int(cfg.r), alpha=float(cfg.alpha),
                      weights={k: (A[k], B[k]) for k in sorted(A)})


def _projected_ia3(name, directory, adapted, meta, state, **_) -> StaticScaleTenant:
    """Ours (projected_vectors.py): scale = 1 + v P on each role's features, 1 elsewhere in the module."""
    layers = decoder_layers(adapted.model)
    scales: dict[SiteKey, torch.Tensor] = {}
    for i, vecs in enumerate(adapted.vectors):
        for site in adapted.sites:
            key = (i, site.path, site.side)
            delta = vecs[site.role]().detach()
            if key not in scales:
                scales[key] = torch.ones(module_width(layers[0].get_submodule(site.path), site.side),
                                         dtype=delta.dtype)
            cols = slice(None) if site.index is None else site.index
            scales[key][cols] = 1 + delta
    return StaticScaleTenant(name, meta["method"], directory, scales=scales)


def _peft_ia3(name, directory, adapted, meta, state, **_) -> StaticScaleTenant:
    """peft's IA3: `ia3_l` scales a module's output, or its input for feed-forward modules."""
    paths = ROLE_PATHS[model_type(adapted.backbone)]
    inputs = {paths[r] for r in adapted.config.feedforward}       # checked, defaults filled in
    scales = {(i, path, "in" if path in inputs else "out"): t.flatten()
              for (i, path), t in per_layer(state, "ia3_l.default").items()}
    if not scales:
        raise TenantError(f"{directory}: no ia3_l tensors in the adapter")
    return StaticScaleTenant(name, meta["method"], directory, scales=scales)


def _lopa(name, directory, adapted, meta, state, backbone=None, tokenizer=None) -> SoftPromptTenant:
    """LoPA on the serving backbone (it installs nothing there); `tokenizer` serves `encoder: minilm`."""
    with torch.random.fork_rng(devices=[]):        # its Z_S init samples tokens: leave the global RNG alone
        model = build_method(backbone, {"type": meta["method"], **meta["config"]})
    device = next(backbone.parameters()).device
    for child_name, child in model.named_children():   # its own weights only, never the backbone
        if child_name != "model":
            child.to(device)
    for p in model._parameters.values():
        p.data = p.data.to(device)
    model.load_trainable_state_dict(state)
    if tokenizer is not None and hasattr(model, "set_tokenizer"):
        model.set_tokenizer(tokenizer)
    return SoftPromptTenant(name, meta["method"], directory, model=model.eval())


# method -> loader; vector methods are recognised by class (PromptAwareModel and subclasses)
LOADERS: dict[str, Callable[..., Tenant]] = {"lora": _lora, "ia3": _projected_ia3, "ia3_peft": _peft_ia3,
                                             "lopa": _lopa}


def load_tenant(name: str, directory: str | Path, backbone: nn.Module, tokenizer=None) -> Tenant:
    """A tenant from its saved adapter, its weights on the backbone's device, in float32 or the backbone's
    dtype where that is wider (every tenant of an engine alike, so their tensors stack)."""
    directory = Path(directory)
    adapted, meta, state = read_adapter(directory, backbone)
    weight = next(backbone.parameters())
    device, dtype = weight.device, torch.promote_types(weight.dtype, torch.float32)
    method = meta["method"]
    if isinstance(adapted, PromptAwareModel):
        return VectorTenant(name, method, directory, generators=adapted.generators.to(device).eval())
    if method not in LOADERS:
        raise TenantError(f"{directory}: method '{method}' has no serving kind; servable: "
                          f"{sorted(LOADERS)} and the prompt-aware methods")
    try:
        tenant = LOADERS[method](name, directory, adapted, meta, state, backbone=backbone, tokenizer=tokenizer)
    except TenantError:
        raise
    except Exception as e:  # noqa: BLE001  (a tenant's own failure is its refusal, never the engine's crash)
        raise TenantError(f"{directory}: cannot serve this '{method}' adapter: {type(e).__name__}: {e}") from e
    if isinstance(tenant, StaticScaleTenant):
        tenant.scales = {k: v.to(device, dtype) for k, v in tenant.scales.items()}
    if isinstance(tenant, LoraTenant):
        tenant.weights = {k: (A.to(device, dtype), B.to(device, dtype)) for k, (A, B) in tenant.weights.items()}
    return tenant


# ---- stacked weights ---------------------------------------------------------
class SlotStack:
    """Same-shaped tensors of many tenants stacked on dim 0, one slot per tenant.

    With `zero_slot`, slot 0 is never given out and stays zero: the "no adapter"
    row (gathered LoRA). Adding writes one slot; when none is free the stack
    grows by exactly one (a copy of the stack: adding is rare, memory stays
    exact). Removing zeroes and frees a slot for the next add, so other
    tenants' slots never move.
    """

    def __init__(self, zero_slot: bool = False):
        self.tensors: dict[str, torch.Tensor] = {}     # key -> (capacity, *shape)
        self.slot_of: dict[str, int] = {}
        self._free: list[int] = []
        self._first = int(zero_slot)

    def __len__(self) -> int:
        return len(self.slot_of)

    def add(self, name: str, weights: dict[str, torch.Tensor]) -> int:
        if self.tensors and (set(weights) != set(self.tensors) or any(
                w.shape != self.tensors[k].shape[1:] for k, w in weights.items())):
            raise TenantError(f"tenant '{name}': weights do not match the stack's layout")
        if not self.tensors:
            self.tensors = {k: w.new_zeros((self._first, *w.shape)) for k, w in weights.items()}
        if self._free:
            slot = self._free.pop()
        else:
            slot = next(iter(self.tensors.values())).shape[0]
            self.tensors = {k: torch.cat([t, t.new_zeros((1, *t.shape[1:]))]) for k, t in self.tensors.items()}
        for k, w in weights.items():
            self.tensors[k][slot] = w
        self.slot_of[name] = slot
        return slot

    def remove(self, name: str) -> None:
        slot = self.slot_of.pop(name)
        for t in self.tensors.values():
            t[slot].zero_()
        self._free.append(slot)

    def gather(self, key: str, slots: torch.Tensor) -> torch.Tensor:
        return self.tensors[key].index_select(0, slots)     # (B, *shape), one indexing op

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def module_signature(m: nn.Module) -> tuple:
    """What makes two modules interchangeable under `functional_call`: class, parameter shapes, settings."""
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in m.named_parameters())
    settings = tuple(sorted((k, v) for k, v in vars(m).items()
                            if not k.startswith("_") and isinstance(v, (int, float, str, bool))))
    return type(m).__qualname__, params, settings, m.extra_repr()


def per_row(module: nn.Module, params: dict[str, torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """`module` applied to each row of `inputs` with that row's own `params` (each (B, ...)).

    Parameter-free modules are row-independent and run once on the whole batch;
    modules that declare `rowwise_params` take the (B, ...) parameters as they are;
    others run vectorised over rows (torch.func.vmap), no Python loop.
    """
    if not params:
        return module(*inputs)
    if getattr(module, "rowwise_params", False):
        return functional_call(module, params, inputs)
    one = lambda p, *xs: functional_call(module, p, tuple(x[None] for x in xs))[0]   # noqa: E731
    return vmap(one)(params, *inputs)


class VectorBank:
    """Vector generators of tenants with one structure, stacked so every row gathers its own.

    Per layer i: W_down (d, r), W_up (r, W), b_up (W,), plus the pooler's and the
    activation's parameters (capsule weights, PEDRO's rational coefficients).
    """

    def __init__(self, template: nn.ModuleList):
        self.template = copy.deepcopy(template)     # structure for functional_call; its weights are unused,
        if not list(self.template.buffers()):       # so they go to the meta device (buffers would be read)
            self.template.to("meta")
        self.roles, self.widths = template[0].roles, template[0].widths
        self.stack = SlotStack()

    @staticmethod
    def signature(tenant: VectorTenant) -> tuple:
        g = tenant.generators[0]
        return (len(tenant.generators), tuple(g.roles), tuple(g.widths), tuple(g.down.weight.shape),
                module_signature(g.pooler), module_signature(g.act), g.down.weight.dtype)

    @classmethod
    def for_tenant(cls, tenant: VectorTenant) -> "VectorBank":
        return cls(tenant.generators)

    def add(self, tenant: VectorTenant) -> None:
        weights = {}
        for i, g in enumerate(tenant.generators):
            weights[f"{i}.down"] = g.down.weight.detach().T           # (d, r)
            weights[f"{i}.up"] = g.up.weight.detach().T               # (r, W)
            weights[f"{i}.bias"] = g.up.bias.detach()                 # (W,)
            for part in ("pooler", "act"):
                for n, p in getattr(g, part).named_parameters():
                    weights[f"{i}.{part}.{n}"] = p.detach()
        self.stack.add(tenant.name, weights)

    def _params(self, prefix: str, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: self.stack.gather(k, slots) for k in self.stack.tensors if k.startswith(prefix)}

    def vectors(self, i: int, h: torch.Tensor, mask: torch.Tensor, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """Layer i's vectors for rows `h` (b, T, d) with prompt `mask` (b, T): role -> (b, width)."""
        g = self.template[i]
        down = self.stack.gather(f"{i}.down", slots)                  # (b, d, r)
        x = torch.bmm(h.to(down.dtype), down)                         # (b, T, r)
        pooled = per_row(g.pooler, self._params(f"{i}.pooler.", slots), x, mask)   # (b, r)
        a = per_row(g.act, self._params(f"{i}.act.", slots), pooled)               # (b, r)
        up, bias = self.stack.gather(f"{i}.up", slots), self.stack.gather(f"{i}.bias", slots)
        l = torch.baddbmm(bias[:, None, :], a[:, None, :], up)[:, 0]  # (b, W)
        return dict(zip(self.roles, l.split(self.widths, dim=-1)))


class StaticBank:
    """Static-scale tenants with one layout: {(layer, path, side): (width,)} stacked per site."""

    def __init__(self, sites: tuple[SiteKey, ...]):
        self.sites = sites
        self.stack = SlotStack()

    @staticmethod
    def signature(tenant: StaticScaleTenant) -> tuple:
        return tuple(sorted(tenant.scales))

    @classmethod
    def for_tenant(cls, tenant: StaticScaleTenant) -> "StaticBank":
        return cls(cls.signature(tenant))

    def add(self, tenant: StaticScaleTenant) -> None:
        self.stack.add(tenant.name, {"|".join(map(str, k)): v for k, v in tenant.scales.items()})

    def gather(self, slots: torch.Tensor) -> dict[SiteKey, torch.Tensor]:
        """Per site, the rows' scales (B, width)."""
        return {k: self.stack.gather("|".join(map(str, k)), slots) for k in self.sites}

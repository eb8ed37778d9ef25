"""Tenants: saved adapters turned into the serving form a batch reads row by row.

A tenant is loaded from the directory `AdaptedModel.save_adapter` writes
(`adapter_config.json` with `method`, `config`, `backbone` fingerprint, and
`adapter.safetensors`). Loading refuses, with a `TenantError` that names the
directory and says why, every malformed adapter: a missing or unreadable
directory or config, a config of the wrong shape, a method nobody registered,
config values of the wrong type or range (the method's own checks), an adapter
saved for another backbone, a corrupt or truncated safetensors file, tensors
that are not floating point, not finite, or beyond the serving dtype's range,
tensors whose names or shapes do not fit the method, a method without a serving
form; any other failure while rebuilding it is refused the same way. The engine
then runs one probe prompt through the new tenant and refuses it when the outputs
are not finite (weights that would make every answer meaningless).

The method is rebuilt on a *meta-device skeleton* of the serving backbone (same
config, no weight memory), which validates the saved tensors against the
method's own layout; the loaded tensors become the skeleton's adapter weights.
The method then gives its serving form (`AdaptedModel.serving_form`, one of
methods/serving_form.py's: prompt vectors, static scales, low-rank deltas, soft
prompts); the serving backbone is never changed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from papeft.methods import build_method  # registers every method
from papeft.methods.base import ADAPTER_CONFIG, ADAPTER_WEIGHTS, METHODS, AdaptedModel, backbone_fingerprint
from papeft.methods.serving_form import ServingForm


class TenantError(ValueError):
    """An adapter the engine cannot serve; the message names the directory and the reason."""


@dataclass
class Tenant:
    name: str
    method: str
    directory: Path
    served_as: type[ServingForm]          # the form's class
    form: ServingForm | None = None       # its weights, until the engine puts them in a bank


# ---- reading and validating a saved adapter --------------------------------
def meta_skeleton(config) -> nn.Module:
    """The backbone's architecture on the meta device: shapes without weight memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def read_adapter(directory: str | Path, backbone: nn.Module) -> AdaptedModel:
    """The method rebuilt on a skeleton of `backbone` holding the checked weights; else TenantError."""
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
    return adapted


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


def load_tenant(name: str, directory: str | Path, backbone: nn.Module, tokenizer=None) -> Tenant:
    """A tenant with its serving form, the weights on the backbone's device, in float32 or the backbone's
    dtype where that is wider (every tenant of an engine alike, so their tensors stack)."""
    directory = Path(directory)
    adapted = read_adapter(directory, backbone)
    weight = next(backbone.parameters())
    device, dtype = weight.device, torch.promote_types(weight.dtype, torch.float32)
    if tokenizer is not None:
        adapted.set_tokenizer(tokenizer)
    try:
        form = adapted.serving_form(backbone)
    except Exception as e:  # noqa: BLE001  (a tenant's own failure is its refusal, never the engine's crash)
        raise TenantError(f"{directory}: cannot serve this '{adapted.method}' adapter: {type(e).__name__}: {e}") from e
    if form is None:
        raise TenantError(f"{directory}: method '{adapted.method}' has no serving form ({type(adapted).__name__}"
                          f".serving_form gives none): it cannot be served")
    return Tenant(name, adapted.method, directory, type(form), form.placed(device, dtype))

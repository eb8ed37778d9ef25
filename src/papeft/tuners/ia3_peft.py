"""Hugging Face peft's standard (IA)3 (Liu et al. 2022), targeted by roles (`type: ia3_peft`).

peft's default for Llama: learned vectors scale the outputs of k_proj and
v_proj, and the *input* of down_proj (its feed-forward module); all start at 1,
so the model equals the backbone at step 0. On LLaMA-2 7B that is
32 x (4096 + 4096 + 11008) = 614,400 parameters. This is the library's method,
not the paper's projected variant (`type: ia3`, projected_vectors.py).

On fused QKV modules (GPT-2 `c_attn`, GPT-NeoX `query_key_value`) peft scales
the whole fused output, Q included: that is peft's own behaviour there, kept
as is. Modules are named by their path inside the decoder layer, so GPT-2's
`mlp.c_proj` (down) is never confused with `attn.c_proj` (o).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from peft import IA3Config, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from papeft.architectures import ROLE_PATHS, decoder_layers, model_type
from papeft.tuners.base import AdaptedModel, register_method
from papeft.tuners.projected_vectors import resolve_targets


@dataclass
class PeftIA3Config:
    targets: list[str] = field(default_factory=lambda: ["k", "v", "down"])
    feedforward: list[str] = field(default_factory=lambda: ["down"])   # scaled on their input


@register_method("ia3_peft", PeftIA3Config)
def apply_ia3_peft(model: nn.Module, config: PeftIA3Config, name: str) -> AdaptedModel:
    roles = resolve_targets(model, list(config.targets))
    stray = sorted(set(config.feedforward) - set(roles))
    if stray:
        raise ValueError(f"method.feedforward={list(config.feedforward)}: role(s) {stray} are not "
                         f"in method.targets={list(config.targets)}")
    paths = ROLE_PATHS[model_type(model)]
    conv1d = isinstance(decoder_layers(model)[0].get_submodule(paths[roles[0]]), Conv1D)  # GPT-2
    peft_config = IA3Config(target_modules=sorted({paths[r] for r in roles}),
                            feedforward_modules=sorted({paths[r] for r in config.feedforward}),
                            fan_in_fan_out=conv1d, task_type="CAUSAL_LM")
    return AdaptedModel(get_peft_model(model, peft_config), name, config)

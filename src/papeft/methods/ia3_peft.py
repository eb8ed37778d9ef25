"""Hugging Face peft's standard (IA)3 (Liu et al. 2022), with peft's own targets (`type: ia3_peft`).

Learned vectors scale the outputs of the target modules and the *input* of the
feed-forward ones; all start at 1, so the model equals the backbone at step 0.
By default (`targets: null`) the modules are the ones peft itself picks for the
backbone's model type (peft.utils.TRANSFORMERS_MODELS_TO_IA3_*_MAPPING):

    llama, mistral   k_proj, v_proj outputs; down_proj input
    gemma, qwen2     q_proj, v_proj outputs; down_proj input
    gpt2             c_attn output (Q, K and V fused); mlp.c_proj input
    gpt_neox         query_key_value output (fused); dense_4h_to_h input

On LLaMA-2 7B that is 32 x (4096 + 4096 + 11008) = 614,400 parameters. This is
the library's method, not the paper's projected variant (`type: ia3`,
projected_vectors.py).

`targets` may instead name roles (q, k, v, o, gate, up, down); `feedforward`
then names the roles scaled on their input (null: those peft treats as
feed-forward). The roles actually adapted are written back into the config, so
a saved adapter rebuilds the same modules whatever peft's defaults become.
On fused QKV modules peft scales the whole fused output, Q included: peft's own
behaviour, kept. Modules are named by their path inside the decoder layer, so
GPT-2's `mlp.c_proj` (down) is never confused with `attn.c_proj` (o).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from peft import IA3Config, get_peft_model
from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as PEFT_FEEDFORWARD
from peft.utils import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as PEFT_TARGETS
from torch import nn
from transformers.pytorch_utils import Conv1D

from papeft.backbone.architectures import ROLE_PATHS, decoder_layers, model_type, resolve_targets
from papeft.methods.base import AdaptedModel, register_method
from papeft.methods.serving_form import StaticScales, layer_tensors


@dataclass
class PeftIA3Config:
    targets: list[str] | None = None       # roles; None = peft's default modules for the model type
    feedforward: list[str] | None = None   # roles scaled on their input; None = peft's feed-forward ones


def roles_of_modules(model: nn.Module, modules: list[str]) -> list[str]:
    """The roles whose module path is one of peft's module names (peft matches a name as a path suffix)."""
    paths = ROLE_PATHS[model_type(model)]
    return [role for role, path in paths.items()
            if any(path == m or path.endswith("." + m) for m in modules)]


class PeftIA3Model(AdaptedModel):
    def serving_form(self, backbone: nn.Module) -> StaticScales:
        """peft's `ia3_l` scales a module's output, or its input for the feed-forward modules."""
        paths = ROLE_PATHS[model_type(self.backbone)]
        inputs = {paths[r] for r in self.config.feedforward}       # resolved when the method was built
        tensors = layer_tensors(self.trainable_state_dict(), f"ia3_l.{self.model.active_adapter}")
        if not tensors:
            raise ValueError("no ia3_l tensors in the adapter")
        return StaticScales({(i, path, "in" if path in inputs else "out"): t.flatten()
                             for (i, path), t in tensors.items()})


@register_method("ia3_peft", PeftIA3Config)
def apply_ia3_peft(model: nn.Module, config: PeftIA3Config, name: str) -> PeftIA3Model:
    mt = model_type(model)
    if config.targets is not None:
        roles = resolve_targets(model, list(config.targets))
    elif mt in PEFT_TARGETS:
        roles = roles_of_modules(model, PEFT_TARGETS[mt])
    else:
        raise ValueError(f"method.targets=null: peft has no default IA3 modules for '{mt}'; name the roles")
    if config.feedforward is None:
        feedforward = [r for r in roles_of_modules(model, PEFT_FEEDFORWARD.get(mt, [])) if r in roles]
    else:
        feedforward = list(config.feedforward)
        stray = sorted(set(feedforward) - set(roles))
        if stray:
            raise ValueError(f"method.feedforward={feedforward}: role(s) {stray} are not "
                             f"in method.targets={roles}")
    paths = ROLE_PATHS[mt]
    conv1d = isinstance(decoder_layers(model)[0].get_submodule(paths[roles[0]]), Conv1D)  # GPT-2
    peft_config = IA3Config(target_modules=sorted({paths[r] for r in roles}),
                            feedforward_modules=sorted({paths[r] for r in feedforward}),
                            fan_in_fan_out=conv1d, task_type="CAUSAL_LM")
    resolved = dataclasses.replace(config, targets=roles, feedforward=feedforward)
    return PeftIA3Model(get_peft_model(model, peft_config), name, resolved)

"""LoRA through Hugging Face peft, targeted by roles so one config serves every architecture.

PARADE Appendix E: rank 4 on all seven linears (q, k, v, o, gate, up, down),
left unmerged. The paper does not give alpha or dropout; we keep peft's
defaults (alpha 8, dropout 0.0): our reading.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from peft import LoraConfig, get_peft_model
from torch import nn

from papeft.backbone.architectures import LINEAR_ROLES, lora_target_modules, model_type, resolve_targets
from papeft.config_checks import above, at_least, between, role_names
from papeft.methods.base import AdaptedModel, register_method
from papeft.methods.serving_form import LowRankDeltas, layer_tensors


@dataclass
class LoraMethodConfig:
    r: int = 4
    alpha: float = 8.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LINEAR_ROLES))

    CHECKS: ClassVar[dict] = {"r": at_least(1), "alpha": above(0.0), "dropout": between(0, 1, high_open=True),
                              "targets": role_names(LINEAR_ROLES)}


class LoraModel(AdaptedModel):
    def serving_form(self, backbone: nn.Module) -> LowRankDeltas:
        """A and B of every adapted module, read from peft's tensors."""
        state, adapter = self.trainable_state_dict(), self.model.active_adapter
        A, B = layer_tensors(state, f"lora_A.{adapter}.weight"), layer_tensors(state, f"lora_B.{adapter}.weight")
        if not A or set(A) != set(B):
            raise ValueError("LoRA tensors are not paired A/B per module")
        return LowRankDeltas(int(self.config.r), float(self.config.alpha), {k: (A[k], B[k]) for k in sorted(A)})


@register_method("lora", LoraMethodConfig)
def apply_lora(model: nn.Module, config: LoraMethodConfig, name: str) -> LoraModel:
    roles = resolve_targets(model, list(config.targets))
    peft_config = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                             target_modules=lora_target_modules(model, roles), bias="none",
                             task_type="CAUSAL_LM")
    return LoraModel(get_peft_model(model, peft_config), name, config)

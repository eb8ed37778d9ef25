"""PEDRO: the PARA / PARADE vector generator with a learnable rational activation, trained bi-level.

Each layer's generator computes l = R( Pool(h W_down) ) W_up + b_up, where R is
a per-layer safe Pade activation unit (rational.py) initialised to GELU. The
rational coefficients are the *outer* level and everything else the *inner*:
the shared trainer alternates one step of the generator weights on a D_train
batch with one step of the coefficients on a held-out D_val batch, each with
its own AdamW (trainer.py `OuterStepper`). The coefficients are trainable
parameters, so they are part of the saved adapter.

Our readings (the PEDRO paper is not public in our sources, only its abstract):
* Pooler: the last prompt token, as for PARA. PEDRO's Figure 1 describes the
  generator as "pooler, down-projection, activation, up-projection", PARA's
  wording by the same group; `pooler` stays configurable (capsule, mean, ...).
* Bi-level optimisation is first-order DARTS, D_val a `val_fraction` slice of
  the training set, the outer AdamW at lr 1e-3 without weight decay.
* `activation: rational_pau` starts the same learnable, bi-level PAU from the METHODS.md
  coefficients instead of our [-5, 5] refit (rational.py says why the refit is the default).
* The activation plot (PEDRO Figure 2, drawn by the runner from `learned_activations`)
  has one panel per layer, R(x) against GELU on [-5, 5].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from papeft.methods.base import register_method
from papeft.methods.prompt_aware import PromptAwareConfig, PromptAwareModel
from papeft.methods.rational import RationalActivation

LEARNABLE_ACTIVATIONS = ("rational", "rational_pau")   # the same safe PAU, from our GELU refit or the spec's


@dataclass
class PedroConfig(PromptAwareConfig):
    pooler: str = "last"                 # our reading: PARA's pooler (PEDRO builds on PARA)
    activation: str = "rational"
    val_fraction: float = 0.1            # share of the training set held out as D_val
    outer_lr: float = 1e-3               # AdamW lr of the rational coefficients (our reading)
    outer_weight_decay: float = 0.0

    def __post_init__(self):
        if self.activation not in LEARNABLE_ACTIVATIONS:
            raise ValueError(f"method.activation='{self.activation}': PEDRO learns its activation, "
                             f"expected one of {list(LEARNABLE_ACTIVATIONS)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"method.val_fraction={self.val_fraction}: expected a fraction in (0, 1)")
        if self.outer_lr < 0 or self.outer_weight_decay < 0:
            raise ValueError(f"method.outer_lr={self.outer_lr} and method.outer_weight_decay="
                             f"{self.outer_weight_decay} must be >= 0")


class PedroModel(PromptAwareModel):
    config: PedroConfig

    def learned_activations(self) -> list[RationalActivation]:
        """The per-layer rational activations, layer 0 first (the runner plots them: PEDRO Figure 2)."""
        return [g.act for g in self.generators]

    def outer_parameters(self) -> list[nn.Parameter]:
        return [p for act in self.learned_activations() for p in act.parameters()]

    def bilevel_options(self) -> dict[str, Any]:
        c = self.config
        return {"val_fraction": c.val_fraction, "lr": c.outer_lr, "weight_decay": c.outer_weight_decay}


@register_method("pedro", PedroConfig)
def apply_pedro(model: nn.Module, config: PedroConfig, name: str) -> PedroModel:
    return PedroModel(model, config, name)

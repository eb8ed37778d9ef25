"""The zero-shot floor: the frozen backbone with the task's own prompts and decoding, nothing tuned.

Every table carries it as a row (with the task's majority-class rate): a method that does not beat
it has learned nothing from the training set. It has no tunable weight, so the shared trainer
evaluates its dev loss once and takes no step (`Trainer.fit`); generation is the backbone's own.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from papeft.methods.base import AdaptedModel, register_method


@dataclass
class ZeroShotConfig:
    """No keys: the floor has nothing to configure."""


@register_method("zero_shot", ZeroShotConfig, tunes_weights=False)
def apply_zero_shot(model: nn.Module, config: ZeroShotConfig, name: str) -> AdaptedModel:
    return AdaptedModel(model, name, config)

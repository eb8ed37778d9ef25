"""Methods, found through one registry: importing this package registers all of them."""
from papeft.methods.base import METHODS, AdaptedModel, build_method, register_method
from papeft.methods import (adalora, adapters, ia3_peft, lopa, lora, pedro, projected_vectors,
                           prompt_aware, prompt_learning, zero_shot)  # noqa: F401  (registration)

__all__ = ["METHODS", "AdaptedModel", "build_method", "register_method"]

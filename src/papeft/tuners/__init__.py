"""Methods, found through one registry: importing this package registers all of them."""
from papeft.tuners.base import METHODS, AdaptedModel, build_method, register_method
from papeft.tuners import adapters, ia3_peft, lora, pedro, projected_vectors, prompt_aware  # noqa: F401  (registration)

__all__ = ["METHODS", "AdaptedModel", "build_method", "register_method"]

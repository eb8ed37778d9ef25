"""Methods, found through one registry: importing this package registers all of them."""
from papeft.tuners.base import METHODS, AdaptedModel, build_method, register_method
from papeft.tuners import lora, prompt_aware  # noqa: F401  (registration side effects)

__all__ = ["METHODS", "AdaptedModel", "build_method", "register_method"]

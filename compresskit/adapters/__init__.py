"""Model-family adapters: how to load, calibrate and evaluate a family; which targets stay dense."""
from compresskit.adapters.base import (
    ENTRY_POINT_GROUP,
    Adapter,
    DataSpec,
    EvalSpec,
    LoadedModel,
    Option,
    adapter_for,
    available_adapters,
    get_adapter,
    register_adapter,
)
from compresskit.adapters.diffusion import DiTAdapter  # registers "dit"
from compresskit.adapters.gaussians import GaussianSplatAdapter  # registers "gaussians"
from compresskit.adapters.lm import CausalLMAdapter  # registers "lm"

__all__ = [
    "ENTRY_POINT_GROUP",
    "Adapter",
    "CausalLMAdapter",
    "DataSpec",
    "DiTAdapter",
    "EvalSpec",
    "GaussianSplatAdapter",
    "LoadedModel",
    "Option",
    "adapter_for",
    "available_adapters",
    "get_adapter",
    "register_adapter",
]

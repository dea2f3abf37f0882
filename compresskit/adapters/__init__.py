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
from compresskit.adapters.llama import LlamaAdapter

__all__ = [
    "ENTRY_POINT_GROUP",
    "Adapter",
    "DataSpec",
    "EvalSpec",
    "LlamaAdapter",
    "LoadedModel",
    "Option",
    "adapter_for",
    "available_adapters",
    "get_adapter",
    "register_adapter",
]

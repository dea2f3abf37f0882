"""Model-family adapters: how to load, calibrate and evaluate a family; which modules stay dense."""
from compresskit.adapters.base import (
    ENTRY_POINT_GROUP,
    Adapter,
    LoadedModel,
    available_adapters,
    get_adapter,
    register_adapter,
)
from compresskit.adapters.llama import LlamaAdapter

__all__ = [
    "ENTRY_POINT_GROUP",
    "Adapter",
    "LlamaAdapter",
    "LoadedModel",
    "available_adapters",
    "get_adapter",
    "register_adapter",
]

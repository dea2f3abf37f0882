"""The quantizer registry: names -> quantizer classes.

Built-in quantizers register with :func:`register_quantizer`; other packages add theirs through the
entry-point group ``compresskit.quantizers`` (``name = "package.module:QuantizerClass"``), loaded
the first time the registry is read.
"""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Callable, TypeVar

from compresskit.errors import CompressKitError

ENTRY_POINT_GROUP = "compresskit.quantizers"

_REGISTRY: dict[str, type] = {}
_entry_points_loaded = False

Q = TypeVar("Q", bound=type)


def register_quantizer(name: str) -> Callable[[Q], Q]:
    """Class decorator: make a :class:`~compresskit.quantizers.base.Quantizer` available by ``name``."""

    def decorate(cls: Q) -> Q:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise CompressKitError(f"a quantizer named {name!r} is already registered ({existing.__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        cls = ep.load()
        register_quantizer(ep.name)(cls)


def _ensure_builtins() -> None:
    import compresskit.quantizers  # noqa: F401  (registers the built-ins)


def available_quantizers() -> dict[str, type]:
    """Every registered quantizer, built-in and from entry points, by name."""
    _ensure_builtins()
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_quantizer(name: str) -> type:
    """The quantizer class registered as ``name``; a one-line error naming the choices otherwise."""
    registry = available_quantizers()
    if name not in registry:
        raise CompressKitError(f"unknown method {name!r}; available: {', '.join(registry)}")
    return registry[name]

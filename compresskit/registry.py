"""Registries: names -> classes, filled by a decorator and by Python entry points.

Built-in quantizers register with :func:`register_quantizer`; other packages add theirs through the
entry-point group ``compresskit.quantizers`` (``name = "package.module:QuantizerClass"``), loaded
the first time the registry is read. Adapters use the same mechanism (``compresskit.adapters``).
"""
from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points
from typing import Callable, TypeVar

from compresskit.errors import CompressKitError

ENTRY_POINT_GROUP = "compresskit.quantizers"

C = TypeVar("C", bound=type)


class Registry:
    """Classes by name. ``what`` names an entry in messages ("method"); ``group`` is the entry-point
    group; ``builtins`` is the module whose import registers the built-in classes."""

    def __init__(self, what: str, group: str, builtins: str):
        self.what, self.group, self.builtins = what, group, builtins
        self._classes: dict[str, type] = {}
        self._entry_points_loaded = False

    def register(self, name: str) -> Callable[[C], C]:
        """Class decorator: make ``cls`` available as ``name`` (and set ``cls.name``)."""

        def decorate(cls: C) -> C:
            existing = self._classes.get(name)
            if existing is not None and existing is not cls:
                raise CompressKitError(f"a {self.what} named {name!r} is already registered ({existing.__qualname__})")
            cls.name = name
            self._classes[name] = cls
            return cls

        return decorate

    def available(self) -> dict[str, type]:
        """Every registered class, built-in and from entry points, by name."""
        import_module(self.builtins)
        if not self._entry_points_loaded:
            self._entry_points_loaded = True
            for ep in entry_points(group=self.group):
                if ep.name not in self._classes:
                    self.register(ep.name)(ep.load())
        return dict(sorted(self._classes.items()))

    def get(self, name: str) -> type:
        """The class registered as ``name``; a one-line error naming the choices otherwise."""
        classes = self.available()
        if name not in classes:
            raise CompressKitError(f"unknown {self.what} {name!r}; available: {', '.join(classes)}")
        return classes[name]


QUANTIZERS = Registry("method", ENTRY_POINT_GROUP, "compresskit.quantizers")
register_quantizer = QUANTIZERS.register
available_quantizers = QUANTIZERS.available
get_quantizer = QUANTIZERS.get

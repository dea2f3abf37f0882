"""Optional dependencies: import one, or fail with one line naming the extra that installs it."""
from __future__ import annotations

from importlib import import_module
from types import ModuleType

from compresskit.errors import CompressKitError


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``; if it is missing, raise one line saying what needs it and which extra to install.

    ``require("transformers", "lm", "language models")`` ->
    ``language models need the 'transformers' package: pip install 'compresskit[lm]'``.
    """
    try:
        return import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise CompressKitError(f"{purpose} need the {top!r} package: pip install 'compresskit[{extra}]'") from None

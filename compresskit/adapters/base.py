"""The adapter contract: what compresskit needs to know about one model family, and the registry.

Adapters are mostly data. One small file per family says how to load a model, which modules to keep
dense (fnmatch patterns, each with its reason), which repeated blocks calibration walks through, what
calibration batches and task loss the family uses, and how to evaluate it. Adapters hold no
compression loop: :func:`compresskit.compress` is the only one, and it calls the adapter.

Built-in adapters register with :func:`register_adapter`; other packages add theirs through the
entry-point group ``compresskit.adapters`` (``name = "package.module:AdapterClass"``), loaded the first
time the registry is read.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from compresskit.errors import CompressKitError
from compresskit.registry import Registry

ENTRY_POINT_GROUP = "compresskit.adapters"


@dataclass
class LoadedModel:
    """A model as an adapter loaded it, with where it came from.

    ``source`` is what the user asked for (an alias, a hub id, a path); ``resolved`` is the file or
    directory actually read; ``revision`` is the commit hash when known (hub-cache snapshots carry
    it), else ``None``. ``extras`` holds what the family needs besides the module (e.g. ``tokenizer``).
    """

    model: nn.Module
    source: str
    resolved: str
    revision: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


Batch = dict[str, torch.Tensor]  # keyword arguments of one model call


class Adapter(ABC):
    """What compresskit needs to know about one model family. Subclasses set the class attributes
    and implement every abstract method with exactly these signatures.

    ``keep_dense`` is a tuple of ``(fnmatch pattern, reason)`` over module names
    (``model.named_modules()``); a module matching any pattern is never compressed. ``target_types``
    are the module types compressed when not kept dense.
    """

    name: ClassVar[str] = ""
    keep_dense: ClassVar[tuple[tuple[str, str], ...]] = ()
    # quantizer parameters this family uses unless the user sets them: {method: ({param: value}, why)}
    method_defaults: ClassVar[dict[str, tuple[dict[str, Any], str]]] = {}
    target_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)

    # ---- the contract -----------------------------------------------------------------------
    @abstractmethod
    def load(self, spec: str | None) -> LoadedModel:
        """Load the model named by ``spec`` (``None``: the family's default), in eval mode, float32.

        Raise one :class:`CompressKitError` saying what was tried and how to provide the model when it
        cannot be found; never reach the network unless the user asked for it.
        """

    @abstractmethod
    def blocks(self, model: nn.Module) -> list[str]:
        """Names of the repeated blocks, in execution order (``model.layers.0``, ...), for
        block-by-block calibration."""

    @abstractmethod
    def example_inputs(self, loaded: LoadedModel) -> tuple[tuple, dict[str, Any]]:
        """A small ``(args, kwargs)`` example of one forward call, for graph tracing (``torch.export``)."""

    @abstractmethod
    def calibration_batches(
        self, loaded: LoadedModel, source: str | None, n_samples: int, seq_len: int, seed: int = 0
    ) -> list[Batch]:
        """``n_samples`` model-call kwargs drawn from ``source`` (``None``: the family's default data),
        deterministic for a given seed, and never overlapping what :meth:`evaluate` reads."""

    @abstractmethod
    def task_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The scalar loss the model is trained on, for one batch (next-token cross-entropy for LMs)."""

    @abstractmethod
    def evaluate(
        self, loaded: LoadedModel, source: str | None = None, n_tokens: int = 8192, window: int = 512
    ) -> dict[str, float]:
        """Quality on a fixed evaluation slice of ``source``, e.g. ``{"perplexity": ..., "n_tokens": ...,
        "seconds": ...}``; same model and arguments, same numbers."""

    # ---- optional: persistence and zero-data calibration ------------------------------------
    def save_architecture(self, loaded: LoadedModel, directory: Path) -> None:
        """Write what :meth:`load_architecture` needs to rebuild an empty model (config, tokenizer)."""
        raise CompressKitError(f"the {self.name!r} adapter cannot save its architecture; use compresskit.load(dir, model=...)")

    def load_architecture(self, directory: Path) -> LoadedModel:
        """An uncompressed model of the saved architecture (weights are then loaded by compresskit)."""
        raise CompressKitError(f"the {self.name!r} adapter cannot rebuild a model; use compresskit.load(dir, model=...)")

    def export_dense(self, loaded: LoadedModel, directory: Path) -> None:
        """Write an ordinary dequantized checkpoint that the family's own library loads."""
        raise CompressKitError(f"the {self.name!r} adapter has no dense export")

    def noise_batches(self, loaded: LoadedModel, n_samples: int, seq_len: int, seed: int = 0) -> list[Batch]:
        """Zero-data calibration (VQ4DiT): model-call kwargs built from Gaussian noise, no real data."""
        raise CompressKitError(f"the {self.name!r} adapter has no zero-data calibration inputs")

    def distill_targets(self, model: nn.Module, batch: Batch) -> Any:
        """What the uncompressed ``model`` predicts on ``batch``, compact enough to keep for every
        M-step batch (for the distillation M-step, ``--m-objective distill``)."""
        raise CompressKitError(f"the {self.name!r} adapter has no distillation loss; use --m-objective task or block")

    def distill_loss(self, model: nn.Module, batch: Batch, targets: Any) -> torch.Tensor:
        """How far ``model``'s prediction on ``batch`` is from ``targets`` (scalar, 0 when equal)."""
        raise CompressKitError(f"the {self.name!r} adapter has no distillation loss; use --m-objective task or block")

    # ---- derived from the data above (not meant to be overridden) ---------------------------
    def dense_reason(self, module_name: str) -> str | None:
        """Why ``module_name`` is kept dense, or ``None`` when it may be compressed."""
        for pattern, reason in self.keep_dense:
            if fnmatchcase(module_name, pattern):
                return reason
        return None

    def compress_targets(self, model: nn.Module) -> list[str]:
        """Names of the modules to compress: every ``target_types`` module not kept dense, in
        ``named_modules`` order. A weight shared with a dense module (a tied ``lm_head``) is skipped too."""
        dense_params = {
            id(p)
            for name, module in model.named_modules()
            if self.dense_reason(name) is not None
            for p in module.parameters(recurse=False)
        }
        return [
            name
            for name, module in model.named_modules()
            if isinstance(module, self.target_types)
            and self.dense_reason(name) is None
            and id(module.weight) not in dense_params
        ]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ---- registry -------------------------------------------------------------------------------
ADAPTERS = Registry("model family", ENTRY_POINT_GROUP, "compresskit.adapters")
register_adapter = ADAPTERS.register  # class decorator: make an Adapter subclass available by name
available_adapters = ADAPTERS.available
get_adapter = ADAPTERS.get

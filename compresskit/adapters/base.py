"""The adapter contract: what compresskit needs to know about one model family, and the registry.

Adapters are mostly data. One small folder per family says how to load a model, which modules to keep
dense (fnmatch patterns, each with its reason), how calibration data is drawn, what task loss the
family trains on and how it is evaluated. Adapters hold no compression loop:
:func:`compresskit.compress` is the only one, and it calls the adapter.

Nothing here names a family's vocabulary. Calibration data is whatever model-call keyword arguments
the family needs (:class:`DataSpec` says how many, from where, with which seed, plus the family's own
:attr:`Adapter.calib_options`); :meth:`Adapter.evaluate` returns the family's metrics, one of them
named :attr:`Adapter.primary_metric`.

Built-in adapters register with :func:`register_adapter`; other packages add theirs through the
entry-point group ``compresskit.adapters`` (``name = "package.module:AdapterClass"``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from compresskit.calib.config import CalibrationConfig
from compresskit.errors import CompressKitError
from compresskit.registry import Registry
from compresskit.targets import Layout

ENTRY_POINT_GROUP = "compresskit.adapters"

Batch = dict[str, Any]  # keyword arguments of one model call: model(**batch)


@dataclass
class LoadedModel:
    """A model as an adapter loaded it, with where it came from.

    ``source`` is what the user asked for (an alias, a hub id, a path); ``resolved`` is the file or
    directory actually read; ``revision`` is the commit hash when known, else ``None``. ``extras``
    holds what the family needs besides the module (a tokenizer, a noise schedule, cameras).
    """

    model: nn.Module
    source: str
    resolved: str
    revision: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Option:
    """One family-specific data option: its default (whose type the value must have), what it means,
    and, for an option that takes one of a few words, those ``choices`` (checked with the type)."""

    default: Any
    help: str
    choices: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class DataSpec:
    """Which calibration data to draw: ``n_samples`` samples from ``source`` (``None``: the family's
    default data), deterministic for ``seed``; ``options`` are the family's :attr:`Adapter.calib_options`
    (defaults filled in by :meth:`Adapter.calib_spec`)."""

    source: str | None = None
    n_samples: int = 16
    seed: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalSpec:
    """Which evaluation to run: on ``source`` (``None``: the family's default), with ``seed`` and the
    family's :attr:`Adapter.eval_options` (defaults filled in by :meth:`Adapter.eval_spec`)."""

    source: str | None = None
    seed: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)


class Adapter(ABC):
    """What compresskit needs to know about one model family.

    Data: ``keep_dense`` ``(fnmatch pattern, reason)`` pairs over module / target names, never
    compressed; ``target_methods`` ``(fnmatch pattern, {"method": ..., "bits": ..., **params}, reason)``
    for targets the family compresses with their own method whatever the user's (a 3DGS scene's
    opacities: scalar), applied before the user's overrides, which win; ``method_defaults`` ``{method: ({param: value}, why)}`` quantizer parameters the family
    uses unless the user sets them (a key ``"method:bits"``, e.g. ``"pq:1"``, holds a layout for that width only,
    dropped whole where the user sets any of its keys: :meth:`CompressConfig.params_for`); ``preset_settings`` ``{preset: ({setting: value}, why)}`` calibration
    settings a named preset takes on this family (:meth:`calibration_preset`), under the user's; ``primary_metric`` the key of :meth:`evaluate`'s result that ranks
    models, and ``higher_is_better``; ``calib_options`` / ``eval_options`` the family's data options;
    ``prepare_options`` the settings of the family's preparation step (:meth:`prepare`).

    Required: :meth:`load`, :meth:`calibration_batches`, :meth:`evaluate`. Everything else is optional
    and says so with one clear error when a feature that needs it is asked for; an image family adds
    :meth:`sample` and :meth:`class_names` (and ``sample_options``) for ``compresskit sample``.
    """

    name: ClassVar[str] = ""
    keep_dense: ClassVar[tuple[tuple[str, str], ...]] = ()
    target_methods: ClassVar[tuple[tuple[str, dict[str, Any], str], ...]] = ()
    method_defaults: ClassVar[dict[str, tuple[dict[str, Any], str]]] = {}
    preset_settings: ClassVar[dict[str, tuple[dict[str, Any], str]]] = {}
    primary_metric: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = False
    calib_options: ClassVar[dict[str, Option]] = {}
    eval_options: ClassVar[dict[str, Option]] = {}
    sample_options: ClassVar[dict[str, Option]] = {}  # for :meth:`sample`, when the family can draw pictures
    prepare_options: ClassVar[dict[str, Option]] = {}  # for :meth:`prepare` (CompressConfig.prepare)
    # batch entries the task loss reads but the model does not take (a diffusion batch's noise): the
    # calibrator leaves them out of every model call
    loss_keys: ClassVar[tuple[str, ...]] = ()

    # ---- required ---------------------------------------------------------------------------
    @abstractmethod
    def load(self, spec: str | None) -> LoadedModel:
        """Load the model named by ``spec`` (``None``: the family's default), in eval mode, float32.

        Raise one :class:`CompressKitError` saying what was tried and how to provide the model when it
        cannot be found; never reach the network.
        """

    @abstractmethod
    def calibration_batches(self, loaded: LoadedModel, data: DataSpec) -> list[Batch]:
        """``data.n_samples`` model-call kwargs, one sample each (leading dimension 1), deterministic
        for ``data.seed`` and never overlapping what :meth:`evaluate` reads. The calibrator groups
        them into batches."""

    @abstractmethod
    def evaluate(self, loaded: LoadedModel, spec: EvalSpec) -> dict[str, float | str]:
        """The family's metrics on a fixed evaluation set, including :attr:`primary_metric`; same
        model and spec, same numbers. A metric that could not be computed may be reported as a
        one-line reason under its own key (e.g. ``fid_effnet_skipped``)."""

    # ---- optional: recognising, structure, calibration --------------------------------------
    @classmethod
    def recognises(cls, spec: str | None) -> bool:
        """Can this adapter load ``spec`` (by alias, file type, config class)? Used to pick the
        adapter when the user names none; it must be cheap and never load weights. When ``spec`` has
        this family's form but a package needed to look further is missing, raise the one-line
        :class:`CompressKitError` naming the extra to install."""
        return False

    def blocks(self, model: nn.Module) -> list[str] | None:
        """Names of the repeated blocks in execution order, for block-by-block calibration; ``None``
        calibrates layer by layer. Blocks need not be chained (a U-Net's are not)."""
        return None

    def example_inputs(self, loaded: LoadedModel) -> tuple[tuple, dict[str, Any]] | None:
        """A small ``(args, kwargs)`` forward-call example for graph tracing (``torch.export``), or
        ``None`` to find layers from the module tree."""
        return None

    def layouts(self) -> dict[type[nn.Module], tuple[str, Layout]]:
        """Module types of this family that are layers the core does not know: ``{type: (kind, layout)}``."""
        return {}

    def embeddings(self, model: nn.Module) -> dict[str, str]:
        """Targets that are lookup tables or output heads (an LM's token embedding and ``lm_head``),
        as ``{name: reason}``: kept dense unless ``CompressConfig(include_embeddings=True)`` (CLI
        ``--embeddings``). Found from the model's structure, not from names."""
        return {}

    def extra_targets(self, model: nn.Module) -> dict[str, Layout]:
        """Bare tensors to compress, as ``{"owner.attr": layout}`` (parameters or buffers of ``model``)."""
        return {}

    def clean_block_call(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """A block call captured during calibration, made safe to replay many times (e.g. drop a
        cache that each call would append to). Default: unchanged."""
        return args, kwargs

    def task_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The scalar loss the family trains on, for one batch (for the task-loss M-step)."""
        raise CompressKitError(f"the {self.name!r} adapter has no task loss; use the layer or block objective")

    def noise_batches(self, loaded: LoadedModel, data: DataSpec) -> list[Batch]:
        """Zero-data calibration (VQ4DiT): model-call kwargs built from noise, no real data."""
        raise CompressKitError(f"the {self.name!r} adapter has no zero-data calibration inputs")

    def distill_targets(self, model: nn.Module, batch: Batch) -> Any:
        """What the uncompressed ``model`` predicts on ``batch``, compact enough to keep for every
        M-step batch (for the distillation M-step)."""
        raise CompressKitError(f"the {self.name!r} adapter has no distillation loss; use the task or block objective")

    def distill_loss(self, model: nn.Module, batch: Batch, targets: Any) -> torch.Tensor:
        """How far ``model``'s prediction on ``batch`` is from ``targets`` (scalar, 0 when equal)."""
        raise CompressKitError(f"the {self.name!r} adapter has no distillation loss; use the task or block objective")

    def latent_lr(self, loaded: LoadedModel, target: str) -> float | None:
        """The learning rate of target ``target``'s float latent in quantization in the loop
        (``latent_steps``, ``docs/calibration.md``), for a family whose tensors train at rates of their
        own (3DGS's per-attribute ones). Default None: the calibration's ``latent_lr``."""
        return None

    def prepare(self, loaded: LoadedModel, options: Mapping[str, Any], progress=None) -> dict[str, Any]:
        """Change ``loaded.model`` in place before :func:`compresskit.compress` finds its targets (a 3DGS
        scene pruned and fine-tuned); ``options`` are :meth:`prepare_settings`' (defaults filled in),
        ``progress(description, i, total)`` as :func:`compress`'s. Returns a JSON-able record of what
        was done (``{}``: nothing), kept as ``CompressionReport.preparation`` and in the manifest.
        Whatever evaluation compares with (the uncompressed model) must stay the original. Default:
        nothing to prepare."""
        return {}

    def prepare_settings(self, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """:attr:`prepare_options` validated, their defaults filled in (what :meth:`prepare` gets); a
        family may add its own range checks on top (one line each, before anything is loaded)."""
        return _options(self.name, "preparation", self.prepare_options, options or {})

    def option(self, spec: DataSpec | EvalSpec, key: str) -> Any:
        """``spec.options[key]``, or this adapter's declared default when the spec was built without it."""
        declared = self.calib_options if isinstance(spec, DataSpec) else self.eval_options
        return spec.options.get(key, declared[key].default)

    def calibration_preset(self, name: str, **overrides: Any) -> CalibrationConfig:
        """The calibration preset ``name`` as this family runs it: the shared recipe
        (:meth:`CalibrationConfig.preset`), this family's ``preset_settings[name]`` on top, then
        ``overrides``; validated. What the CLI's ``--preset`` resolves to. The family's settings are
        marked (``from_family``), so a codebook-only one does not refuse a gptq or rtn run."""
        family, _ = self.preset_settings.get(name, ({}, ""))
        config = CalibrationConfig.preset(name, **{**family, **overrides})
        return replace(config, from_family=frozenset(family) - set(overrides))

    def supports(self, feature: str) -> bool:
        """Does this adapter implement the optional method ``feature`` (e.g. ``"distill_loss"``)?"""
        return getattr(type(self), feature) is not getattr(Adapter, feature)

    # ---- optional: pictures (``compresskit sample``) -------------------------------------------
    def sample(self, loaded: LoadedModel, labels: torch.Tensor, seed: int = 0, options: Mapping[str, Any] | None = None) -> torch.Tensor:
        """Images of classes ``labels`` (long ``[N]``, each in ``range(len(class_names(loaded)))``):
        float ``[N, C, H, W]`` in [-1, 1], ``C`` 1 (grey) or 3 (RGB). The same model, labels, seed and
        options give the same images; ``options`` are :attr:`sample_options` (see :meth:`sample_settings`)."""
        raise CompressKitError(f"the {self.name!r} adapter cannot sample pictures; `compresskit sample` needs an image model (e.g. the dit or unet adapter)")

    def class_names(self, loaded: LoadedModel) -> tuple[str, ...]:
        """The names of the classes :meth:`sample` takes, label ``i``'s at index ``i``."""
        raise CompressKitError(f"the {self.name!r} adapter has no classes to sample")

    # ---- optional: streaming (``compresskit quantize --stream``) -----------------------------
    def load_empty(self, spec: str | None) -> "tuple[LoadedModel, Any]":
        """``(LoadedModel, weights)``: the model with its parameters on the meta device (no memory;
        buffers real) and a :class:`~compresskit.stream.ShardedWeights` over its checkpoint, so
        :func:`compresskit.stream.compress_streaming` reads one block at a time."""
        raise CompressKitError(f"the {self.name!r} adapter cannot stream a model block by block; drop --stream / --resume")

    # ---- optional: persistence ----------------------------------------------------------------
    def save_architecture(self, loaded: LoadedModel, directory: Path) -> None:
        """Write what :meth:`load_architecture` needs to rebuild an empty model (config, tokenizer)."""
        raise CompressKitError(f"the {self.name!r} adapter cannot save its architecture; use compresskit.load(dir, model=...)")

    def load_architecture(self, directory: Path) -> LoadedModel:
        """An uncompressed model of the saved architecture (weights are then loaded by compresskit)."""
        raise CompressKitError(f"the {self.name!r} adapter cannot rebuild a model; use compresskit.load(dir, model=...)")

    def export_dense(self, loaded: LoadedModel, directory: Path) -> None:
        """Write an ordinary dequantized checkpoint that the family's own library loads."""
        raise CompressKitError(f"the {self.name!r} adapter has no dense export")

    def decompress(self, loaded: LoadedModel, out: Path, overwrite: bool = False) -> Path:
        """Write the decoded model as one file in the family's standard format (``compresskit decompress``)."""
        raise CompressKitError(f"the {self.name!r} adapter cannot decompress to one file; use `compresskit quantize --export dense`")

    # ---- optional: views of a scene (``compresskit render``) ---------------------------------
    def render_pair(self, loaded: LoadedModel, n_views: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(uncompressed, this model)`` pictures of the first ``n_views`` evaluation views at most
        ``size`` pixels on a side, float ``[V, 3, H, W]`` in [0, 1]."""
        raise CompressKitError(f"the {self.name!r} adapter cannot render views; `compresskit render` needs a 3DGS scene")

    # ---- derived from the data above (not meant to be overridden) ---------------------------
    def dense_reason(self, name: str) -> str | None:
        """Why target ``name`` is kept dense, or ``None`` when it may be compressed."""
        for pattern, reason in self.keep_dense:
            if fnmatchcase(name, pattern):
                return reason
        return None

    def calib_spec(self, source: str | None = None, n_samples: int = 16, seed: int = 0, options: Mapping[str, Any] | None = None) -> DataSpec:
        """A :class:`DataSpec` with this family's options validated and their defaults filled in."""
        return DataSpec(source, n_samples, seed, _options(self.name, "calibration", self.calib_options, options or {}))

    def eval_spec(self, source: str | None = None, seed: int = 0, options: Mapping[str, Any] | None = None) -> EvalSpec:
        """An :class:`EvalSpec` with this family's options validated and their defaults filled in."""
        return EvalSpec(source, seed, _options(self.name, "evaluation", self.eval_options, options or {}))

    def sample_settings(self, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """:attr:`sample_options` validated, their defaults filled in (what :meth:`sample` will use)."""
        return _options(self.name, "sampling", self.sample_options, options or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _options(adapter: str, what: str, declared: dict[str, Option], given: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(given) - set(declared))
    if unknown:
        valid = ", ".join(declared) or "none"
        raise CompressKitError(f"the {adapter!r} adapter has no {what} option {', '.join(map(repr, unknown))}; valid: {valid}")
    out = {}
    for key, option in declared.items():
        value = given.get(key, option.default)
        kind = type(option.default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # --option cfg_scale=2 means 2.0
        if option.default is not None and not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise CompressKitError(f"{what} option {key!r} must be a {kind.__name__} ({option.help}), got {value!r}")
        if option.choices is not None and value not in option.choices:
            raise CompressKitError(f"{what} option {key!r} must be one of {', '.join(map(str, option.choices))} ({option.help}), got {value!r}")
        out[key] = value
    return out


# ---- registry -------------------------------------------------------------------------------
ADAPTERS = Registry("model family", ENTRY_POINT_GROUP, "compresskit.adapters")
register_adapter = ADAPTERS.register  # class decorator: make an Adapter subclass available by name
available_adapters = ADAPTERS.available
get_adapter = ADAPTERS.get


def adapter_for(spec: str | None) -> type[Adapter]:
    """The adapter class that recognises model ``spec``; one error naming the choices when none does."""
    found = [cls for cls in available_adapters().values() if cls.recognises(spec)]
    if not found:
        names = ", ".join(available_adapters())
        if spec is not None and not Path(spec).expanduser().exists():
            raise CompressKitError(
                f"model {spec!r} not found: it is no local file or directory, and no adapter ({names}) knows it as an "
                "alias or a hub id in the local cache; check the path, or copy the model here"
            )
        raise CompressKitError(f"no adapter recognises the model {spec!r}; pass --adapter NAME (available: {names})")
    return found[0]

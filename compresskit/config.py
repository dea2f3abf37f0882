"""What to compress and how: one typed config (CLI strings such as ``rtn:4`` are parsed by
``compresskit.rewrite.parse_override``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from compresskit.errors import CompressKitError
from compresskit.registry import get_quantizer

DENSE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class CompressConfig:
    """How to compress a model.

    ``method``/``bits``/``params`` build the quantizer of every selected layer; ``overrides`` is an
    ordered list of ``(fnmatch pattern, {"method": ..., "bits": ..., **params})`` applied per layer
    (later patterns win); ``include``/``exclude`` select layers by name; ``keep_dense`` adds to the
    adapter's layers kept dense; ``include_embeddings`` makes embeddings (and an adapter's
    :meth:`~compresskit.adapters.Adapter.embeddings`, e.g. an LM head) candidates too.
    ``method_defaults`` are ``{method: {param: value}}`` used where the user set nothing (an
    adapter's defaults, filled in by :func:`compresskit.compress`); a key ``"method:bits"`` (``"pq:1"``,
    the CLI's spelling of a method at a width) holds defaults for that width only, on top of the
    method's. Those are a layout (``d`` and ``k`` together set the rate), so a layer whose user
    parameters set any of its keys gets none of them (see :meth:`params_for`).
    ``prepare`` are the family's preparation options (:attr:`Adapter.prepare_options`, e.g. a 3DGS
    scene's ``{"prune": 0.5}``): :func:`compresskit.compress` hands them to the adapter's
    :meth:`~compresskit.adapters.Adapter.prepare`, which changes the model before its targets are found.
    """

    method: str = "pq"
    bits: int = 3
    params: dict[str, Any] = field(default_factory=dict)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    keep_dense: tuple[str, ...] = ()
    overrides: tuple[tuple[str, dict[str, Any]], ...] = ()
    include_embeddings: bool = False
    dense_dtype: str = "float16"  # how everything kept dense is stored (and rounded to in memory)
    method_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    prepare: dict[str, Any] = field(default_factory=dict)

    def validated(self) -> "CompressConfig":
        """Check that every method named exists and its parameters are accepted; returns self."""
        if self.dense_dtype not in DENSE_DTYPES:
            raise CompressKitError(f"dense_dtype must be one of {', '.join(DENSE_DTYPES)}, got {self.dense_dtype!r}")
        self.layer_quantizer(None)._validate_params()
        for _, o in self.overrides:
            self.layer_quantizer(o)._validate_params()
        return self

    def quantizer_for(self, method: str, bits: int, params: dict[str, Any]):
        cls = get_quantizer(method)
        known = cls.param_defaults()
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise CompressKitError(f"{method}: unknown parameter(s) {', '.join(unknown)}; valid: {', '.join(known)}")
        return cls(bits=bits, **params) if "bits" in known else cls(**params)

    def params_for(self, method: str, bits: int, user: dict[str, Any]) -> dict[str, Any]:
        """The parameters a ``method`` quantizer at ``bits`` gets: the method's defaults, then its
        defaults at this width (``"method:bits"``), then ``user``'s. The width's defaults are taken
        whole or not at all: ``--param d=8`` at 1 bit with a ``{"d": 4, "k": 16}`` default must not
        become d=8, k=16 (half a bit per weight)."""
        at_width = self.method_defaults.get(f"{method}:{bits}", {})
        if set(at_width) & set(user):
            at_width = {}
        return {**self.method_defaults.get(method, {}), **at_width, **user}

    def layer_quantizer(self, layer_override: dict[str, Any] | None):
        """A fresh quantizer for one layer (the config's method, or the layer's override)."""
        o = layer_override or {}
        method = o.get("method", self.method)
        bits = o.get("bits", self.bits)
        user = {**(self.params if method == self.method else {}), **_params_of(o)}
        return self.quantizer_for(method, bits, self.params_for(method, bits, user))


def _params_of(override: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in override.items() if k not in ("method", "bits")}

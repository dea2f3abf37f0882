"""Choose which layers to compress and with what, from ``fnmatch`` patterns on module names.

Rules, applied to every layer of a :class:`~compresskit.rewrite.graph.TargetGraph`:

* a layer is a candidate if it matches some ``include`` pattern and no ``exclude`` pattern
  (exclude wins) and no ``keep_dense`` pattern (the caller's defaults, e.g. an adapter's; a
  pattern may come with its reason as ``(pattern, reason)``, which the selection reports);
* layers whose weight is tied to another module are compressed only if every module sharing the
  weight is a candidate too; otherwise they stay dense (compressing one copy of a shared tensor
  saves nothing and silently unties it);
* per-layer overrides are an ordered list of ``(pattern, params)``: the **last** matching pattern
  wins, whole (dicts are not merged, so ``rtn`` never inherits ``pq``-only parameters).

A layer matches a pattern if its name or one of its aliases does. User patterns (``include``,
``exclude``, overrides) that match no layer at all raise :class:`CompressKitError`: a typo must not
pass silently. ``keep_dense`` patterns are not checked, since adapters list names that some models
of a family lack.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Iterable, Sequence

from compresskit.errors import CompressKitError
from compresskit.rewrite.graph import TargetGraph
from compresskit.targets import Target

Override = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class Selection:
    """``compress`` maps each layer to compress (execution order) to its override params (``{}`` =
    the global config); ``dense`` maps each layer left dense to why."""

    compress: dict[str, dict[str, Any]]
    dense: dict[str, str]


def select_targets(
    layers: TargetGraph | Iterable[Target],
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    keep_dense: Sequence[str | tuple[str, str]] = (),
    overrides: Sequence[Override] = (),
) -> Selection:
    """Split ``layers`` into those to compress (with per-layer params) and those kept dense."""
    layers = list(layers)
    _check_all_match(layers, [*include, *exclude, *(pattern for pattern, _ in overrides)])

    dense: dict[str, str] = {}
    for layer in layers:
        if (pattern := _first_match(layer, exclude)) is not None:
            dense[layer.name] = f"excluded by {pattern!r}"
        elif (reason := _kept(layer, keep_dense)) is not None:
            dense[layer.name] = reason
        elif _first_match(layer, include) is None:
            dense[layer.name] = "not matched by any include pattern"

    listed = {layer.name for layer in layers}
    for layer in layers:
        blocker = next((n for n in layer.tied_to if n in dense or n not in listed), None)
        if layer.name not in dense and blocker is not None:
            dense[layer.name] = f"weight tied to {blocker!r}, which stays dense"

    compress = {}
    for layer in layers:
        if layer.name not in dense:
            chosen = [params for pattern, params in overrides if _matches(layer, pattern)]
            compress[layer.name] = dict(chosen[-1]) if chosen else {}
    return Selection(compress, dense)


_SPEC = re.compile(r"(?P<method>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<bits>\d+))?")


def parse_override(text: str) -> Override:
    """``"*.mlp.*=rtn:4"`` -> ``("*.mlp.*", {"method": "rtn", "bits": 4})``; the bits are optional, and
    quantizer parameters may follow after commas: ``"gaussians.f_rest=pq:1,d=45,k=256"`` ->
    ``("gaussians.f_rest", {"method": "pq", "bits": 1, "d": 45, "k": 256})`` (values read as JSON, else
    as text; whether the method takes them is checked with the rest of the config)."""
    pattern, sep, rest = text.partition("=")
    spec, *extra = rest.split(",")
    pattern, spec = pattern.strip(), spec.strip()
    match = _SPEC.fullmatch(spec)
    if not sep or not pattern or match is None:
        raise CompressKitError(
            f"cannot parse layer override {text!r}; write PATTERN=METHOD[:BITS][,NAME=VALUE...], e.g. '*.mlp.*=rtn:4'"
        )
    params: dict[str, Any] = {"method": match["method"]}
    if match["bits"] is not None:
        bits = int(match["bits"])
        if not 1 <= bits <= 16:
            raise CompressKitError(f"bits must be between 1 and 16 in layer override {text!r}, got {bits}")
        params["bits"] = bits
    for item in extra:
        key, eq, raw = (x.strip() for x in item.partition("="))
        if not eq or not key or not raw or key in ("method", "bits"):
            raise CompressKitError(
                f"cannot parse parameter {item.strip()!r} in layer override {text!r}; write PATTERN=METHOD[:BITS],NAME=VALUE, e.g. 'gaussians.f_rest=pq:1,d=45'"
            )
        params[key] = parse_value(raw)
    return pattern, params


def parse_value(raw: str) -> Any:
    """A parameter's value from text: JSON (``256``, ``0.5``, ``true``, case-insensitive ``True``), else the text itself."""
    try:
        return json.loads(raw.lower() if raw.lower() in ("true", "false", "null") else raw)
    except json.JSONDecodeError:
        return raw


def _kept(layer: Target, keep_dense: Sequence[str | tuple[str, str]]) -> str | None:
    """Why ``layer`` is kept dense: the reason given with the first matching ``(pattern, reason)``,
    or a plain pattern's default wording; None when no pattern matches."""
    for entry in keep_dense:
        pattern, reason = (entry, f"kept dense by default ({entry!r})") if isinstance(entry, str) else entry
        if _matches(layer, pattern):
            return reason
    return None


def _matches(layer: Target, pattern: str) -> bool:
    return any(fnmatchcase(name, pattern) for name in (layer.name, *layer.aliases))


def _first_match(layer: Target, patterns: Sequence[str]) -> str | None:
    return next((p for p in patterns if _matches(layer, p)), None)


def _check_all_match(layers: list[Target], patterns: list[str]) -> None:
    if not layers:  # nothing to select; the caller reports a model without compressible layers
        return
    unmatched = [p for p in dict.fromkeys(patterns) if not any(_matches(layer, p) for layer in layers)]
    if unmatched:
        names = ", ".join(repr(p) for p in unmatched)
        raise CompressKitError(
            f"layer pattern(s) {names} match no compressible layer; check the spelling against the "
            f"layer names, e.g. {layers[0].name!r}"
        )

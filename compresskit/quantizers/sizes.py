"""Exact size accounting: how many bits each part of a compressed tensor costs.

Every fitted quantizer reports a :class:`SizeReport`; so does ``Quantizer.estimate`` for a bare
shape. Units are in the names: ``*_bits`` are bits, ``bits_per_weight`` is all-in (codes, codebooks
or pool, projection table, scales and anything kept dense, divided by the number of weights).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SizeReport:
    """Bits per stored component of one compressed tensor.

    ``parts_bits`` maps a component name (``codes``, ``pool``, ``projection``, ``scales``...) to its
    size in bits, exactly as stored by the file format.
    """

    n_weights: int
    parts_bits: dict[str, int] = field(default_factory=dict)

    @property
    def total_bits(self) -> int:
        return sum(self.parts_bits.values())

    @property
    def total_bytes(self) -> float:
        return self.total_bits / 8

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / self.n_weights if self.n_weights else 0.0

    def __add__(self, other: "SizeReport") -> "SizeReport":
        parts = dict(self.parts_bits)
        for name, bits in other.parts_bits.items():
            parts[name] = parts.get(name, 0) + bits
        return SizeReport(self.n_weights + other.n_weights, parts)

    def to_dict(self) -> dict:
        return {
            "n_weights": self.n_weights,
            "parts_bits": dict(self.parts_bits),
            "total_bits": self.total_bits,
            "total_bytes": self.total_bytes,
            "bits_per_weight": self.bits_per_weight,
        }


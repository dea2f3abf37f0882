"""A 3DGS scene as an ``nn.Module``: the six attribute tensors as parameters, nothing else.

The units and shapes are those of ``docs/gaussians.md`` (and of the original 3DGS ``GaussianModel``,
whose ``.ply`` :mod:`compresskit.adapters.gaussians.ply` reads and writes): ``means`` world
coordinates, ``f_dc`` / ``f_rest`` SH coefficients with the channel last, ``opacities`` logits,
``scales`` log standard deviations, ``quats`` unnormalised ``w x y z``. There is no ``forward``: the
renderer reads the attributes.

Everything reads the attributes through ``getattr``, so a parametrization the compression core
registers on a parameter (``torch.nn.utils.parametrize``, e.g. a quantizer's decode) is what
:meth:`GaussianScene.sh`, :meth:`~GaussianScene.to_ply`, :meth:`~GaussianScene.select` and
:meth:`~GaussianScene.cat` see. ``select`` (pruning) and ``cat`` (densification) return new plain
scenes of the decoded values, with fresh parameters.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from compresskit.adapters.gaussians.ply import ATTRIBUTES, PlyGaussians, check_shapes, read_ply, write_ply
from compresskit.errors import CompressKitError


class GaussianScene(nn.Module):
    """N Gaussians with SH colour of degree ``sh_degree`` (0..3, ``K = (sh_degree + 1)^2``).

    Parameters (float32): ``means [N, 3]``, ``f_dc [N, 3]``, ``f_rest [N, K - 1, 3]`` (``[N, 0, 3]``
    at degree 0), ``opacities [N]``, ``scales [N, 3]``, ``quats [N, 4]``. The tensors given become
    the parameters' data without a copy when they already are float32 (as ``nn.Parameter`` does);
    they must all be on one device.
    """

    def __init__(self, means: torch.Tensor, f_dc: torch.Tensor, f_rest: torch.Tensor,
                 opacities: torch.Tensor, scales: torch.Tensor, quats: torch.Tensor):
        super().__init__()
        values = dict(means=means, f_dc=f_dc, f_rest=f_rest, opacities=opacities, scales=scales, quats=quats)
        for name, value in values.items():
            value = torch.as_tensor(value)
            if not value.is_floating_point():
                raise CompressKitError(f"GaussianScene.{name} must be a floating tensor, got {value.dtype}")
            values[name] = value.detach().to(torch.float32)
        devices = {str(v.device) for v in values.values()}
        if len(devices) > 1:
            raise CompressKitError(f"GaussianScene attributes must be on one device, got {', '.join(sorted(devices))}")
        self.sh_degree = check_shapes("GaussianScene", {name: v.shape for name, v in values.items()})
        for name, value in values.items():
            setattr(self, name, nn.Parameter(value))

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[0]

    def sh(self) -> torch.Tensor:
        """All SH coefficients, ``[N, K, 3]``: ``f_dc`` as coefficient 0, then ``f_rest``."""
        return torch.cat([self.f_dc.unsqueeze(1), self.f_rest], dim=1)

    # ---- .ply ------------------------------------------------------------------------------------
    @classmethod
    def from_ply(cls, data: PlyGaussians) -> "GaussianScene":
        """A scene holding copies of ``data``'s arrays."""
        return cls(**{name: torch.from_numpy(np.array(getattr(data, name))) for name in ATTRIBUTES})

    def to_ply(self) -> PlyGaussians:
        """The (parametrized) attribute values as float32 numpy copies, on the CPU."""
        return PlyGaussians(**{name: getattr(self, name).detach().cpu().numpy().copy() for name in ATTRIBUTES})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GaussianScene":
        """Read a 3DGS ``.ply`` (:func:`~compresskit.adapters.gaussians.ply.read_ply`) into a scene."""
        data = read_ply(path)  # fresh arrays nobody else holds: no need to copy them again
        return cls(**{name: torch.from_numpy(getattr(data, name)) for name in ATTRIBUTES})

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the scene as a standard 3DGS ``.ply``; refuses an existing file unless ``overwrite``."""
        values = {name: getattr(self, name).detach().cpu().numpy() for name in ATTRIBUTES}  # written, not kept
        return write_ply(path, PlyGaussians(**values), overwrite=overwrite)

    # ---- pruning and densification ---------------------------------------------------------------
    def select(self, index: torch.Tensor | np.ndarray | Sequence) -> "GaussianScene":
        """A new scene of the Gaussians picked by ``index``: a bool mask ``[N]`` (pruning keeps the
        ``True`` rows) or integer indices ``[M]`` in ``[-N, N)`` (rows in that order, repeats allowed)."""
        n = self.num_gaussians
        index = torch.as_tensor(index)
        if index.ndim != 1:
            raise CompressKitError(f"select expects a 1-D mask or index, got shape {list(index.shape)}")
        if index.dtype == torch.bool:
            if index.shape[0] != n:
                raise CompressKitError(f"select's mask has {index.shape[0]} entries for {n} Gaussians")
        elif index.numel() == 0:
            index = index.long()  # select([]): as_tensor made it float
        elif index.is_floating_point() or index.is_complex():
            raise CompressKitError(f"select expects a bool mask or integer indices, got {index.dtype}")
        else:
            if not (-n <= int(index.min()) and int(index.max()) < n):
                raise CompressKitError(f"select's indices must lie in [-{n}, {n}), got {int(index.min())}..{int(index.max())}")
            index = index.long()  # a uint8 index would be read as a mask
        index = index.to(self.means.device)
        values = {name: getattr(self, name).detach()[index] for name in ATTRIBUTES}  # indexing copies
        return parametrize.type_before_parametrizations(self)(**values)

    @staticmethod
    def cat(scenes: Sequence["GaussianScene"]) -> "GaussianScene":
        """A new scene of all of ``scenes``' Gaussians, in order (same SH degree and device)."""
        scenes = list(scenes)
        if not scenes or not all(isinstance(s, GaussianScene) for s in scenes):
            raise CompressKitError("GaussianScene.cat expects a non-empty sequence of GaussianScene")
        degrees = sorted({s.sh_degree for s in scenes})
        if len(degrees) > 1:
            raise CompressKitError(f"GaussianScene.cat needs one SH degree, got degrees {degrees}")
        devices = sorted({str(s.means.device) for s in scenes})
        if len(devices) > 1:
            raise CompressKitError(f"GaussianScene.cat needs one device, got {', '.join(devices)}")
        values = {name: torch.cat([getattr(s, name).detach() for s in scenes]) for name in ATTRIBUTES}
        return parametrize.type_before_parametrizations(scenes[0])(**values)

    def extra_repr(self) -> str:
        return f"num_gaussians={self.num_gaussians}, sh_degree={self.sh_degree}"

"""LDM / guided-diffusion ``UNetModel`` checkpoints (:mod:`.ldm`): the ``ldm-unet`` adapter.

Model specs, read from this machine only:

* an alias, one JSON file of ``configs/ldm/`` (``ldm-cin256-v2``, ``sd-v1-unet``): the architecture
  alone, for ``compresskit estimate``; loading weights needs the checkpoint file;
* a ``.ckpt`` / ``.pt`` / ``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors`` file of the
  layout: a bare ``UNetModel`` state dict, or a whole LDM / Stable Diffusion checkpoint (a training
  checkpoint's ``state_dict``), whose keys under ``model.diffusion_model.`` are taken with that prefix
  stripped (they are the EMA weights in the released files), plus ``cond_stage_model.embedding.weight``
  when the model is conditioned through LDM's ClassEmbedder. An optional ``<same name>.json`` beside it
  holds the config (the ``UNetModel`` arguments, bare or under ``"architecture"``); without one, the
  shapes are matched against the shipped configs (the heads and image size are not in the weights).

The blocks are ``input_blocks.N``, ``middle_block`` and ``output_blocks.N`` in execution order,
unchained (the output blocks read the input blocks' skips; ``calib/walk.py`` captures every block's
inputs in one pass). Convolutions (3x3 and the attention's 1x1 Conv1d / Conv2d) are compressed over
their flattened fan-in, as in the ``unet`` adapter; see ``docs/diffusion.md``.

The DDPM side (:mod:`.family`) needs ``model(x, t, y)``: class-conditional models only. With
``label_emb`` (guided-diffusion) there is no null class, so zero-data inputs never drop a label and
sampling has no classifier-free guidance; LDM's ClassEmbedder models (``context_classes``) have the
null class ``context_classes - 1`` and are calibrated as DiT is.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresskit.adapters.base import DataSpec, LoadedModel, register_adapter
from compresskit.adapters.diffusion import data as fmnist
from compresskit.adapters.diffusion import ddpm
from compresskit.adapters.diffusion.adapter import _named, _read_json, read_weights
from compresskit.adapters.diffusion.export import dense_copy, save_with_sidecar
from compresskit.adapters.diffusion.family import DiffusionAdapter
from compresskit.adapters.diffusion.ldm import LDMConfig, LDMUNet, config_from_shapes, looks_like_ldm, shipped_configs
from compresskit.adapters.diffusion.unet import CONV_IN_REASON, CONV_OUT_REASON, LABEL_REASON, TIME_REASON
from compresskit.errors import CompressKitError

ARCHITECTURE_FILE = "ldm.json"
DENSE_WEIGHTS = "unet.safetensors"  # what --export dense writes, with its unet.json sidecar
WEIGHT_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors")
PREFIX = "model.diffusion_model."  # where LatentDiffusion keeps its UNetModel
CLASS_TABLE = {"cond_stage_model.embedding.weight": "context_embed.weight"}  # LDM's ClassEmbedder, carried along


def unet_state(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The ``UNetModel`` tensors of a file (``device="meta"``: shapes only): a whole LDM checkpoint's
    ``model.diffusion_model.*`` (prefix stripped) and class table, else the file's own tensors."""
    state = read_weights(path, device=device)
    if not any(k.startswith(PREFIX) for k in state):
        return state
    out = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    out.update({ours: state[theirs] for theirs, ours in CLASS_TABLE.items() if theirs in state})
    return out


def checkpoint_state(state: dict[str, torch.Tensor], config: LDMConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`unet_state`: our ``LDMUNet`` tensors under the names a checkpoint of the
    model's codebase holds. With an LDM conditioning (a ClassEmbedder table or cross-attention), an LDM
    checkpoint's: ``model.diffusion_model.*`` and the class table under LDM's own name; otherwise
    (guided-diffusion's ``label_emb``, or unconditional) the bare ``UNetModel`` keys."""
    if config.context_classes is None and config.context_dim is None:
        return dict(state)
    ldm_name = {ours: theirs for theirs, ours in CLASS_TABLE.items()}
    return {ldm_name.get(k, PREFIX + k): v for k, v in state.items()}


def _config(model: nn.Module) -> LDMConfig:
    return model.config


@register_adapter("ldm-unet")
class LDMUNetAdapter(DiffusionAdapter):
    """The LDM / guided-diffusion ``UNetModel``: aliases and checkpoint files; see the module docstring."""

    @classmethod
    def recognises(cls, spec: str | None) -> bool:
        """An alias of ``configs/ldm/`` or a weights file whose keys have the layout; never reads weights."""
        if spec is None:
            return False
        if str(spec).lower() in shipped_configs():
            return True
        path = Path(str(spec)).expanduser()
        if not (path.is_file() and path.suffix.lower() in WEIGHT_SUFFIXES):
            return False
        try:
            return looks_like_ldm(unet_state(path, device="meta"))
        except CompressKitError:
            return False

    # ---- loading ----------------------------------------------------------------------------------
    def _build(self, spec: str | None, meta: bool) -> LoadedModel:
        if spec is None:
            raise CompressKitError(f"the ldm-unet adapter has no default model; pass a checkpoint file or an alias ({', '.join(shipped_configs())})")
        aliases = shipped_configs()
        if str(spec).lower() in aliases:
            entry = aliases[str(spec).lower()]
            if not meta:
                raise CompressKitError(
                    f"alias {spec!r} names the {entry['name']} architecture; its weights are not shipped: pass the checkpoint "
                    f"file ({entry.get('checkpoint', 'a .ckpt or .safetensors')}); `compresskit estimate --model {spec}` needs none"
                )
            with torch.device("meta"):
                model = LDMUNet(LDMConfig.from_dict(entry["architecture"]))
            return LoadedModel(model.eval(), str(spec), f"configs/ldm/{str(spec).lower()}.json", extras={"layout": "ldm", "weights": None})
        path = Path(str(spec)).expanduser()
        if not (path.is_file() and path.suffix.lower() in WEIGHT_SUFFIXES):
            raise CompressKitError(f"LDM UNet {spec!r} not found: no alias ({', '.join(aliases)}) and no {'/'.join(WEIGHT_SUFFIXES)} file there")
        return self._file(str(spec), path.resolve(), meta)

    def _file(self, spec: str, path: Path, meta: bool) -> LoadedModel:
        shapes = unet_state(path, device="meta")
        if not looks_like_ldm(shapes):
            raise CompressKitError(f"{path} holds no UNetModel of the LDM / guided-diffusion layout (no input_blocks.0.0.weight and middle_block); pass such a checkpoint")
        sidecar = _read_json(path.with_suffix(".json"))
        if sidecar is not None:
            config, matched = LDMConfig.from_dict(sidecar.get("architecture", sidecar)), None
        else:
            matched, config = config_from_shapes({k: tuple(v.shape) for k, v in shapes.items()})
        with torch.device("meta" if meta else "cpu"):
            model = LDMUNet(config)
        if not meta:
            try:
                model.load_state_dict({k: v.float() for k, v in unet_state(path).items()}, strict=True)
            except RuntimeError as err:
                raise CompressKitError(f"{path} does not match the LDM UNet config {config.to_dict()}: {str(err).splitlines()[0]}; put the right config next to it as {path.with_suffix('.json').name}") from None
        extras = {"layout": "ldm", "weights": None if meta else str(path), "config_from": "sidecar" if matched is None else f"shapes = {matched}"}
        return LoadedModel(model.float().eval(), spec, str(path), extras=extras)

    # ---- structure --------------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> list[str] | None:
        """``input_blocks.N``, ``middle_block``, ``output_blocks.N`` in execution order; unchained (skips)."""
        if not isinstance(model, LDMUNet):
            return None
        return [f"input_blocks.{i}" for i in range(len(model.input_blocks))] + ["middle_block"] + [f"output_blocks.{i}" for i in range(len(model.output_blocks))]

    def embeddings(self, model: nn.Module) -> dict[str, str]:
        """Kept dense by default: the input conv (``input_blocks.0.0``), ``out``, the timestep MLP and
        the class tables (``label_emb``, ``context_embed``), as the ``unet`` adapter keeps diffusers'."""
        if not isinstance(model, LDMUNet):
            return {}
        return _named(model, [
            (model.input_blocks[0], CONV_IN_REASON), (model.out, CONV_OUT_REASON), (model.time_embed, TIME_REASON),
            (getattr(model, "label_emb", None), LABEL_REASON), (getattr(model, "context_embed", None), LABEL_REASON),
        ])

    def example_inputs(self, loaded: LoadedModel) -> tuple[tuple, dict[str, Any]] | None:
        """One sample of the model's shapes: ``{"x", "t"}`` plus ``y`` (class-conditional) or ``context``."""
        c = _config(loaded.model)
        x = torch.randn(1, c.in_channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(0))  # [1, C, S, S]
        kwargs: dict[str, Any] = {"x": x, "t": torch.tensor([500])}
        if c.num_classes is not None or c.context_classes is not None:
            kwargs["y"] = torch.tensor([1])
        elif c.context_dim is not None:
            kwargs["context"] = torch.zeros(1, 4, c.context_dim)  # [1, L, context_dim]
        return (), kwargs

    # ---- the DDPM side (family.py) asks ----------------------------------------------------------
    def denoiser(self, loaded: LoadedModel, what: str) -> nn.Module:
        model = loaded.model
        c = _config(model)
        if c.num_classes is None and c.context_classes is None:
            kind = "text-conditioned (context)" if c.context_dim is not None else "unconditional"
            raise CompressKitError(
                f"LDM UNet {what} supports class-conditional models (called model(x, t, y)); this one is {kind}. "
                "Compress it from the weights alone (--preset none) or pass calibration_data, and --no-eval"
            )
        return model

    def fmnist_denoiser(self, loaded: LoadedModel, what: str) -> nn.Module:
        model = self.denoiser(loaded, what)
        c = _config(model)
        rows = c.num_classes if c.num_classes is not None else c.context_classes
        if (c.in_channels, c.image_size, rows) != (fmnist.IMAGE_SHAPE[0], fmnist.IMAGE_SHAPE[1], fmnist.NUM_CLASSES + 1):
            raise CompressKitError(
                f"LDM UNet {what} uses Fashion-MNIST (1 channel, 32 x 32 pixels, 10 classes + the null class 10); this model takes "
                f"{c.in_channels} channels of {c.image_size} x {c.image_size} and {rows} class rows. "
                "Use zero-data calibration (--preset zero-data) or pass calibration_data, and --no-eval"
            )
        return model

    def input_shapes(self, model: nn.Module) -> tuple[tuple[int, int, int], int]:
        """ClassEmbedder models: the last row is the null class; ``label_emb`` ones: every row is a class."""
        c = _config(model)
        classes = c.context_classes - 1 if c.context_classes is not None else c.num_classes
        return (c.in_channels, c.image_size, c.image_size), classes

    def noise_batches(self, loaded: LoadedModel, data: DataSpec) -> list:
        """Zero-data inputs; a ``label_emb`` model has no null class, so no label is dropped."""
        model = self.denoiser(loaded, "zero-data calibration")
        if _config(model).context_classes is not None:
            return super().noise_batches(loaded, data)
        shape, classes = self.input_shapes(model)
        return ddpm.noise_batches(data.n_samples, shape, classes, null_class=0, seed=data.seed, class_dropout=0.0)

    def sampling_variance(self, model: nn.Module) -> str:
        c = _config(model)
        return "learned" if c.out_channels == 2 * c.in_channels else "fixed_small"  # guided-diffusion's learn_sigma

    # ---- persistence ------------------------------------------------------------------------------
    def save_architecture(self, loaded: LoadedModel, directory: Path) -> None:
        """``ldm.json``: ``{"architecture": LDMConfig}``."""
        if not isinstance(loaded.model, LDMUNet):
            raise CompressKitError(f"the ldm-unet adapter cannot save the architecture of a {type(loaded.model).__name__}; use compresskit.load(dir, model=...)")
        (Path(directory) / ARCHITECTURE_FILE).write_text(json.dumps({"architecture": loaded.model.config.to_dict()}, indent=2))

    def export_dense(self, loaded: LoadedModel, directory: Path) -> None:
        """The dequantized model as a checkpoint of its own layout, the compressed model untouched:
        ``unet.safetensors`` (LDM's ``model.diffusion_model.*`` keys and class table for a model with
        an LDM conditioning, else guided-diffusion's bare ``UNetModel`` keys) and its ``unet.json``
        sidecar, so ``--model directory/unet.safetensors`` loads it again (:func:`checkpoint_state`)."""
        model = loaded.model
        if not isinstance(model, LDMUNet):
            raise CompressKitError(f"the ldm-unet adapter cannot export a {type(model).__name__} dense; export the UNetModel it was loaded as")
        fresh = dense_copy(model, LDMUNet(model.config))
        save_with_sidecar(checkpoint_state(fresh.state_dict(), model.config), Path(directory) / DENSE_WEIGHTS, model.config.to_dict())

    def load_architecture(self, directory: Path) -> LoadedModel:
        """A freshly initialised float32 model of the saved config (compresskit then loads the weights)."""
        path = Path(directory) / ARCHITECTURE_FILE
        saved = _read_json(path)
        if not saved or not isinstance(saved.get("architecture"), dict):
            raise CompressKitError(f"{path} is missing or holds no LDM UNet architecture; the compressed model directory is incomplete")
        model = LDMUNet(LDMConfig.from_dict(saved["architecture"]))
        return LoadedModel(model.float().eval(), str(directory), str(path), extras={"layout": "ldm", "weights": None})

"""diffusers U-Nets (``UNet2DModel``, ``UNet2DConditionModel``): the ``unet`` adapter.

Model specs, read from this machine only: ``fmnist-unet`` (the project's reference model,
:mod:`.reference`), a diffusers model directory (``config.json`` whose
``_class_name`` is ``UNet2DModel`` or ``UNet2DConditionModel``), a pipeline directory with such a
``unet/``, or the hub id of either in the local cache (``local_files_only=True``).

A class-conditional ``UNet2DModel`` (``num_class_embeds`` set) is loaded wrapped in
:class:`ClassConditionalUNet`, whose ``forward(x, t, y)`` is the diffusion family's model interface
(:mod:`.ddpm`), so the ``dit`` adapter's calibration data, DDPM task loss, zero-data inputs and
evaluation serve it unchanged (imported, not copied). The U-Net is its submodule ``unet``: targets
read ``unet.down_blocks.0.resnets.0.conv1``. Other U-Nets (unconditional, text-conditioned
``UNet2DConditionModel``) are loaded bare, for structure and size estimates only.

The blocks are ``down_blocks.N``, ``mid_block`` and ``up_blocks.N`` in execution order. They are
*not* chained: each up block reads the skip connections of the down blocks beside its input, so the
core captures every block's inputs in one forward pass per batch (``calib/walk.py``).

Convolutions are product-quantized over kernel patches, as PQF does: the quantizer sees
``weight.flatten(1)`` (``[C_out, C_in * kh * kw]``, columns ordered ``(C_in, kh, kw)``), so a
subvector of d consecutive columns is a run of one output channel's fan-in (d = 9: one 3 x 3 kernel
slice of one input channel). See ``docs/diffusion.md``, "U-Nets".
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresskit.adapters.base import LoadedModel, register_adapter
from compresskit.adapters.diffusion import data as fmnist
from compresskit.adapters.diffusion.adapter import _named, _read_json, cached_snapshot
from compresskit.adapters.diffusion.export import save_diffusers
from compresskit.adapters.diffusion.family import DiffusionAdapter
from compresskit.adapters.diffusion.reference import is_reference, reference_files
from compresskit.errors import CompressKitError
from compresskit.optional import require

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
ARCHITECTURE_FILE = "unet.json"

CONV_IN_REASON = "conv_in: the image's way in (C_in x 3 x 3 fan-in, a handful of channels), too small and too sensitive to share codebooks; DPQ compresses the blocks"
CONV_OUT_REASON = "conv_out writes the predicted noise, the most error-sensitive output; DPQ compresses only the blocks"
TIME_REASON = "the timestep embedding: a small MLP run once per step, outside the blocks DPQ compresses"
LABEL_REASON = "a lookup table (class labels in), not a block weight: each sample reads one row; DPQ keeps it dense"
ADDED_REASON = "an added conditioning embedding (text time, image), outside the blocks DPQ compresses"


def _diffusers():
    return require("diffusers", "diffusion", "diffusion models")


class ClassConditionalUNet(nn.Module):
    """A class-conditional ``UNet2DModel`` as the diffusion model interface ``model(x, t, y) -> eps``
    (``x`` float ``[B, C, H, W]``, ``t`` long ``[B]``, ``y`` long ``[B]``, null class ``num_class_embeds - 1``)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, class_labels=y).sample


def unet_dir(path: Path) -> tuple[Path, str] | None:
    """``(model directory, class name)`` of a diffusers U-Net model or pipeline directory, else None."""
    for folder in (path, path / "unet"):
        config = _read_json(folder / "config.json")
        if config is not None and config.get("_class_name") in UNET_CLASSES:
            return folder, config["_class_name"]
    return None


def _unet(model: nn.Module) -> nn.Module:
    """The diffusers U-Net inside ``model`` (the wrapper's ``unet``, or the model itself)."""
    return model.unet if isinstance(model, ClassConditionalUNet) else model


def _prefix(model: nn.Module) -> str:
    return "unet." if isinstance(model, ClassConditionalUNet) else ""


def _wrap(unet: nn.Module) -> nn.Module:
    """Class-conditional ``UNet2DModel`` -> :class:`ClassConditionalUNet`; any other U-Net unchanged."""
    if type(unet).__name__ == "UNet2DModel" and unet.config.get("num_class_embeds"):
        return ClassConditionalUNet(unet)
    return unet


@register_adapter("unet")
class UNetAdapter(DiffusionAdapter):
    """diffusers U-Nets; calibration and evaluation for class-conditional Fashion-MNIST ``UNet2DModel``s."""

    @classmethod
    def recognises(cls, spec: str | None) -> bool:
        """A diffusers U-Net directory (model or pipeline) or cached hub id; reads one JSON file."""
        if spec is None:
            return False
        if is_reference(spec, "unet2d"):
            return True
        path = Path(str(spec)).expanduser()
        if path.is_dir():
            return unet_dir(path) is not None
        snapshot = None if path.exists() else cached_snapshot(str(spec))
        return snapshot is not None and unet_dir(snapshot) is not None

    # ---- loading ----------------------------------------------------------------------------------
    def _build(self, spec: str | None, meta: bool) -> LoadedModel:
        if spec is None:
            raise CompressKitError("the unet adapter has no default model; pass fmnist-unet, a diffusers U-Net directory or a cached hub id")
        if is_reference(spec, "unet2d"):
            return self._reference(str(spec), meta)
        path = Path(str(spec)).expanduser()
        revision = None
        if path.is_dir():
            found = unet_dir(path)
            if found is None:
                raise CompressKitError(f"{path} has no config.json of a diffusers UNet2DModel or UNet2DConditionModel (nor unet/config.json); pass such a directory")
        else:
            snapshot = None if path.exists() else cached_snapshot(str(spec))
            found = unet_dir(snapshot) if snapshot is not None else None
            if found is None:
                raise CompressKitError(f"U-Net {spec!r} not found: no local diffusers directory and no hub-cache snapshot of that id; pass one of those (nothing is downloaded)")
            revision = snapshot.name
        folder, class_name = found
        cls = getattr(_diffusers(), class_name)
        try:
            if meta:
                with torch.device("meta"):
                    unet = cls.from_config(cls.load_config(str(folder), local_files_only=True))
            else:
                unet = cls.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CompressKitError(f"could not load the {class_name} in {folder}: {str(err).splitlines()[0] if str(err) else type(err).__name__}; check that config.json and the weights are complete") from None
        extras = {"layout": "diffusers", "class": class_name, "weights": None if meta else str(folder)}
        return LoadedModel(_wrap(unet.float().eval()).eval(), str(spec), str(folder.resolve()), revision, extras)

    def _reference(self, spec: str, meta: bool) -> LoadedModel:
        """``fmnist-unet``: the training script's ``UNet2DModel`` keyword arguments and EMA weights."""
        weights, config = reference_files(spec)
        with torch.device("meta" if meta else "cpu"):
            unet = _diffusers().UNet2DModel(**config["model"])
        if not meta:
            from safetensors.torch import load_file

            try:
                unet.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()}, strict=True)
            except RuntimeError as err:
                raise CompressKitError(f"{weights} does not match its .json config: {str(err).splitlines()[0]}; re-run bench/train_fmnist_reference.py --model unet") from None
        extras = {"layout": "diffusers", "class": "UNet2DModel", "weights": None if meta else str(weights)}
        return LoadedModel(_wrap(unet.float().eval()).eval(), spec, str(weights), None, extras)

    # ---- structure --------------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> list[str] | None:
        """``down_blocks.N``, ``mid_block``, ``up_blocks.N`` in execution order; unchained (skip connections)."""
        unet, prefix = _unet(model), _prefix(model)
        names = [f"down_blocks.{i}" for i in range(len(getattr(unet, "down_blocks", [])))]
        names += ["mid_block"] if isinstance(getattr(unet, "mid_block", None), nn.Module) else []
        names += [f"up_blocks.{i}" for i in range(len(getattr(unet, "up_blocks", [])))]
        return [prefix + n for n in names] or None

    def embeddings(self, model: nn.Module) -> dict[str, str]:
        """What stays dense by default: ``conv_in`` and ``conv_out`` (the image's way in and the noise
        prediction out), the timestep MLP and the class table (run once per step, outside the blocks,
        as DPQ keeps DiT's embedders); every conv and linear inside the blocks is compressed."""
        unet = _unet(model)
        return _named(model, [
            (getattr(unet, "conv_in", None), CONV_IN_REASON), (getattr(unet, "conv_out", None), CONV_OUT_REASON),
            (getattr(unet, "time_embedding", None), TIME_REASON), (getattr(unet, "class_embedding", None), LABEL_REASON),
            (getattr(unet, "add_embedding", None), ADDED_REASON), (getattr(unet, "encoder_hid_proj", None), ADDED_REASON),
        ])

    def example_inputs(self, loaded: LoadedModel) -> tuple[tuple, dict[str, Any]] | None:
        """One sample of the model's own shapes: ``{"x", "t", "y"}`` for the wrapper, diffusers' keywords otherwise."""
        model, unet = loaded.model, _unet(loaded.model)
        c = unet.config
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        x = torch.randn(1, c.in_channels, size, size, generator=torch.Generator().manual_seed(0))  # [1, C, S, S]
        if isinstance(model, ClassConditionalUNet):
            return (), {"x": x, "t": torch.tensor([500]), "y": torch.tensor([1])}
        kwargs: dict[str, Any] = {"sample": x, "timestep": torch.tensor([500]), "return_dict": False}
        if type(unet).__name__ == "UNet2DConditionModel":
            dim = c.cross_attention_dim if isinstance(c.cross_attention_dim, int) else c.cross_attention_dim[0]
            kwargs["encoder_hidden_states"] = torch.zeros(1, 4, dim)
        return (), kwargs

    # ---- the DDPM side (family.py) asks ----------------------------------------------------------
    def denoiser(self, loaded: LoadedModel, what: str) -> nn.Module:
        return _conditional(loaded, what)

    def fmnist_denoiser(self, loaded: LoadedModel, what: str) -> nn.Module:
        return _fmnist_unet(loaded, what)

    def input_shapes(self, model: nn.Module) -> tuple[tuple[int, int, int], int]:
        c = model.unet.config
        return (c.in_channels, c.sample_size, c.sample_size), c.num_class_embeds - 1  # the last id is the null class

    # ---- persistence ------------------------------------------------------------------------------
    def save_architecture(self, loaded: LoadedModel, directory: Path) -> None:
        """``unet.json``: ``{"class", "config"}``, the diffusers config the model was built from."""
        unet = _unet(loaded.model)
        if type(unet).__name__ not in UNET_CLASSES:
            raise CompressKitError(f"the unet adapter cannot save the architecture of a {type(unet).__name__}; use compresskit.load(dir, model=...)")
        saved = {"class": type(unet).__name__, "config": dict(unet.config)}
        (Path(directory) / ARCHITECTURE_FILE).write_text(json.dumps(saved, indent=2, default=str))

    def load_architecture(self, directory: Path) -> LoadedModel:
        """A freshly initialised float32 U-Net of the saved config, wrapped as it was loaded."""
        path = Path(directory) / ARCHITECTURE_FILE
        saved = _read_json(path)
        if not saved or saved.get("class") not in UNET_CLASSES or not isinstance(saved.get("config"), dict):
            raise CompressKitError(f"{path} is missing or holds no U-Net architecture; the compressed model directory is incomplete")
        unet = getattr(_diffusers(), saved["class"]).from_config(saved["config"])
        extras = {"layout": "diffusers", "class": saved["class"], "weights": None}
        return LoadedModel(_wrap(unet.float().eval()).eval(), str(directory), str(path), extras=extras)

    def export_dense(self, loaded: LoadedModel, directory: Path) -> None:
        """``save_pretrained`` of the dequantized U-Net (``config.json``, ``diffusion_pytorch_model.safetensors``),
        the compressed model untouched: ``UNet2DModel`` / ``UNet2DConditionModel.from_pretrained(directory)``
        loads it, and it drops into the pipeline it came from. A :class:`ClassConditionalUNet` is written as
        the ``UNet2DModel`` inside it (the wrapper is compresskit's calling convention, not a checkpoint)."""
        unet = _unet(loaded.model)
        if type(unet).__name__ not in UNET_CLASSES:
            raise CompressKitError(f"the unet adapter cannot export a {type(unet).__name__} dense; export the diffusers U-Net it was loaded as")
        save_diffusers(unet, directory)


def _conditional(loaded: LoadedModel, what: str) -> ClassConditionalUNet:
    if not isinstance(loaded.model, ClassConditionalUNet):
        raise CompressKitError(
            f"U-Net {what} supports class-conditional UNet2DModels (num_class_embeds set, called model(x, t, y)); this is "
            f"a {type(loaded.model).__name__}. Compress it from the weights alone (--preset none) or pass calibration_data, and --no-eval"
        )
    return loaded.model


def _fmnist_unet(loaded: LoadedModel, what: str) -> ClassConditionalUNet:
    """The model, when it is a pixel-space Fashion-MNIST U-Net (1 channel, 32 x 32, 10 classes + null)."""
    model = _conditional(loaded, what)
    c = model.unet.config
    want = (fmnist.IMAGE_SHAPE[0], fmnist.IMAGE_SHAPE[1], fmnist.NUM_CLASSES + 1)
    if (c.in_channels, c.sample_size, c.num_class_embeds) != want:
        raise CompressKitError(
            f"U-Net {what} uses Fashion-MNIST (1 channel, 32 x 32 pixels, 10 classes + the null class 10); this U-Net takes "
            f"{c.in_channels} channels of {c.sample_size} x {c.sample_size} and {c.num_class_embeds} class embeddings. "
            "Use zero-data calibration (--preset zero-data) or pass calibration_data, and --no-eval"
        )
    return model

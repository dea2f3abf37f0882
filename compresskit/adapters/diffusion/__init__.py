"""The diffusion family: DiT and PixArt transformers and diffusers U-Nets, in one folder.

``dit`` (our readable DiT with the original checkpoints' names, and its shipped configs),
``adapter`` (:class:`DiTAdapter`, registered as ``"dit"``) and ``unet`` (:class:`UNetAdapter`,
``"unet"``), ``ldm`` / ``ldm_adapter`` (the LDM / guided-diffusion ``UNetModel``,
:class:`LDMUNetAdapter`, ``"ldm-unet"``): loading, structure, architecture-only models for size
estimates, and for models of
Fashion-MNIST's shape the DDPM calibration data and loss (``ddpm``, ``data``) and the Fréchet /
IS-style evaluation (``metrics``); ``export`` writes a compressed model back as the plain checkpoint
it came from (``--export dense``). diffusers is imported only when a diffusers model is loaded, so
importing this package is cheap.
"""
from compresskit.adapters.diffusion.adapter import DEFAULT_SPEC, DiTAdapter, tie_copied_embedders
from compresskit.adapters.diffusion.dit import DiT, DiTConfig, config_from_shapes, shipped_configs
from compresskit.adapters.diffusion.unet import ClassConditionalUNet, UNetAdapter
from compresskit.adapters.diffusion.ldm import LDMConfig, LDMUNet
from compresskit.adapters.diffusion.ldm_adapter import LDMUNetAdapter  # registers "ldm-unet"

__all__ = ["DEFAULT_SPEC", "ClassConditionalUNet", "DiT", "DiTAdapter", "DiTConfig", "config_from_shapes", "shipped_configs", "tie_copied_embedders", "UNetAdapter",
           "LDMConfig", "LDMUNet", "LDMUNetAdapter"]

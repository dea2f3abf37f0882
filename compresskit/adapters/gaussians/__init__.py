"""3D Gaussian Splatting scenes: the standard ``.ply`` in and out, a pure-torch CPU renderer, the
render loss and PSNR / SSIM, and the ``gaussians`` adapter that hands a scene's attribute tensors to
the quantizers as bare-tensor targets (no fake layers). See ``docs/gaussians.md``."""
from compresskit.adapters.gaussians.adapter import GaussianSplatAdapter  # registers "gaussians"

__all__ = ["GaussianSplatAdapter"]

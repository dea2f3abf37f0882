"""Pictures of samples: a grid of captioned images, two grids side by side, written as PNG atomically.

Nothing here knows a model family: images are float tensors in [-1, 1], captions are strings. Each
image is upscaled by an integer factor (nearest neighbour, so pixels stay pixels) until it is at least
:data:`MIN_CELL_PX` wide, with its caption in a strip under it. Geometry, for ``n`` images of
``H x W`` at scale ``s`` in ``cols`` columns and ``rows = ceil(n / cols)`` rows::

    width  = cols * W * s + (cols + 1) * PAD_PX
    height = rows * (H * s + CAPTION_PX) + (rows + 1) * PAD_PX

:func:`side_by_side` puts panels next to each other, :data:`GAP_PX` apart, under a
:data:`TITLE_PX` strip holding each panel's title.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from compresskit.errors import CompressKitError
from compresskit.files import write_atomically
from compresskit.optional import require

MIN_CELL_PX = 64  # small images (Fashion-MNIST's 32 x 32) are upscaled to at least this width
PAD_PX = 4  # white margin around every cell
CAPTION_PX = 14  # the strip under each image holding its caption
TITLE_PX = 18  # the strip above each panel of side_by_side holding its title
GAP_PX = 12  # between the panels of side_by_side
MAX_COLUMNS = 8


def _pil():
    return require("PIL.Image", "diffusion", "sample pictures")


def columns_for(n: int) -> int:
    """About square, 4 to 8 columns (fewer only when there are fewer images)."""
    return min(n, max(4, min(MAX_COLUMNS, math.ceil(math.sqrt(n)))))


def scale_for(width: int) -> int:
    """The integer upscale that makes an image ``width`` pixels wide at least :data:`MIN_CELL_PX` wide."""
    return max(1, math.ceil(MIN_CELL_PX / width))


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Float ``[N, C, H, W]`` in [-1, 1] (``C`` 1 or 3) -> uint8 ``[N, H, W, C]`` in [0, 255]."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise CompressKitError(f"pictures must be [N, 1 or 3, H, W], got {tuple(images.shape)}")
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def _fit(draw, text: str, width: int, font) -> str:
    """``text``, cut and ended with '..' when it is wider than ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "..", font=font) > width:
        text = text[:-1]
    return text + ".."


def _centred(draw, text: str, box: tuple[int, int, int], font) -> None:
    """Write ``text`` centred in the strip ``(left, top, width)``, black."""
    left, top, width = box
    text = _fit(draw, text, width, font)
    draw.text((left + (width - draw.textlength(text, font=font)) / 2, top + 1), text, fill=0, font=font)


def image_grid(images: torch.Tensor, captions: Sequence[str], columns: int | None = None):
    """A PIL image of ``images`` (float ``[N, C, H, W]`` in [-1, 1]) in a grid, ``captions[i]`` under
    image ``i``; grey for ``C == 1``, RGB for ``C == 3``. ``columns``: default :func:`columns_for`."""
    Image = _pil()
    from PIL import ImageDraw, ImageFont

    pixels = to_pixels(images)  # [N, H, W, C] uint8
    n, h, w, c = pixels.shape
    if len(captions) != n:
        raise CompressKitError(f"{n} images need {n} captions, got {len(captions)}")
    cols = columns or columns_for(n)
    rows = math.ceil(n / cols)
    s = scale_for(w)
    cell_w, cell_h = w * s, h * s + CAPTION_PX
    mode = "L" if c == 1 else "RGB"
    canvas = Image.new(mode, (cols * cell_w + (cols + 1) * PAD_PX, rows * cell_h + (rows + 1) * PAD_PX), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for i, (image, caption) in enumerate(zip(pixels, captions)):
        r, col = divmod(i, cols)
        left, top = PAD_PX + col * (cell_w + PAD_PX), PAD_PX + r * (cell_h + PAD_PX)
        tile = Image.fromarray(image[..., 0].numpy() if c == 1 else image.numpy())  # [H, W] -> L, [H, W, 3] -> RGB
        canvas.paste(tile.resize((w * s, h * s), Image.Resampling.NEAREST), (left, top))
        _centred(draw, caption, (left, top + h * s, cell_w), font)
    return canvas


def side_by_side(panels: Sequence, titles: Sequence[str]):
    """One PIL image: ``panels`` left to right, :data:`GAP_PX` apart, each under its title."""
    Image = _pil()
    from PIL import ImageDraw, ImageFont

    if len(panels) != len(titles):
        raise CompressKitError(f"{len(panels)} panels need {len(panels)} titles, got {len(titles)}")
    mode = "L" if all(p.mode == "L" for p in panels) else "RGB"
    width = sum(p.width for p in panels) + GAP_PX * (len(panels) - 1)
    canvas = Image.new(mode, (width, TITLE_PX + max(p.height for p in panels)), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    left = 0
    for panel, title in zip(panels, titles):
        canvas.paste(panel.convert(mode), (left, TITLE_PX))
        _centred(draw, title, (left, 2, panel.width), font)
        left += panel.width + GAP_PX
    return canvas


def save_png(image, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``image`` (PIL) to ``path`` as PNG, atomically: a temporary file beside it, then ``os.replace``,
    so a reader never sees half a picture and a failure leaves nothing behind."""
    path = Path(path)
    check_png_path(path, overwrite)
    write_atomically(path, lambda stream: image.save(stream, format="PNG"))
    return path


def check_png_path(path: str | Path, overwrite: bool = False) -> None:
    """One error if ``path`` cannot take a new PNG: not ``.png``, no such directory, or there already (without ``overwrite``)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise CompressKitError(f"{path} must end in .png (the picture is written as PNG)")
    if not path.parent.is_dir():
        raise CompressKitError(f"the directory of {path} does not exist; create it first or choose another --out")
    if path.is_dir():
        raise CompressKitError(f"{path} is a directory; --out takes a .png file name")
    if path.exists() and not overwrite:
        raise CompressKitError(f"{path} already exists; choose another --out or pass --overwrite")

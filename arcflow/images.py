"""Images for people to look at: PSNR, tensors to PIL, and grids saved as PNG atomically."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor


def psnr(images: Tensor, reference: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [0, 1]: (B,)."""
    mse = (images.float() - reference.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


def to_pil(image: Tensor) -> Image.Image:
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def save_grid(rows: list[list[Tensor]], path: Path, pad: int = 2) -> None:
    """Rows of (3, H, W) images in [0, 1], left to right, as one PNG (written atomically)."""
    cell_h = max(img.shape[1] for row in rows for img in row)
    cell_w = max(img.shape[2] for row in rows for img in row)
    cols = max(len(row) for row in rows)
    grid = Image.new("RGB", (cols * (cell_w + pad) + pad, len(rows) * (cell_h + pad) + pad), "white")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid.paste(to_pil(img), (pad + c * (cell_w + pad), pad + r * (cell_h + pad)))
    tmp = path.with_name(path.name + ".tmp")
    grid.save(tmp, format="PNG")
    tmp.replace(path)

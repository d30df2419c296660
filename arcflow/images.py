"""Images for people to look at: PSNR, tensors to PIL, and labelled grids saved as PNG atomically."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

GRID_INFO_KEY = "arcflow-grid"
"""PNG text chunk of a grid: where each cell is and what labels it (JSON), so tools can cut cells out."""
FONT_SIZE = 11
_INK, _CAPTION_INK = (20, 20, 20), (70, 70, 70)


def psnr(images: Tensor, reference: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [0, 1]: (B,)."""
    mse = (images.float() - reference.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


def to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> uint8 on the CPU, rounded as a PNG stores it."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def read_png(path: Path) -> Tensor:
    """A PNG as a uint8 (3, H, W) tensor."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def to_pil(image: Tensor) -> Image.Image:
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=FONT_SIZE)


def _wrap(text: str, width_px: int, font: Any) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width_px`` (a single long word may overflow)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width_px:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


@dataclass
class GridLayout:
    """Pixel boxes of a grid: ``cells[r][c]`` is (left, top, width, height) of row r, column c."""

    size: tuple[int, int]
    cells: list[list[tuple[int, int, int, int]]]
    column_labels: list[str]
    row_captions: list[str]


def save_grid(rows: list[list[Tensor]], path: Path, pad: int = 2, column_labels: list[str] | None = None,
              row_captions: list[str] | None = None, info: dict[str, Any] | None = None) -> GridLayout:
    """Rows of (3, H, W) images in [0, 1], left to right, as one PNG (written atomically).

    ``column_labels`` go above the columns and ``row_captions`` (the prompts) under each row, wrapped
    to the grid's width. The layout and ``info`` are stored in the PNG's ``arcflow-grid`` text chunk.
    """
    font = _font()
    line_h = FONT_SIZE + 3
    row_h = [max(img.shape[1] for img in row) for row in rows]
    cell_w = max(img.shape[2] for row in rows for img in row)
    cols = max(len(row) for row in rows)
    labels = list(column_labels or [])
    col_w = cell_w
    if labels:  # columns widen for their labels (up to 3 cells), then the labels wrap
        col_w = max(cell_w, min(max(int(font.getlength(label)) + 6 for label in labels), 3 * max(cell_w, 64)))
    label_lines = [_wrap(label, col_w, font) for label in labels]
    header_h = (max(len(lines) for lines in label_lines) * line_h + pad) if labels else 0
    width = cols * (col_w + pad) + pad
    captions = [_wrap(text, width - 2 * pad, font) for text in (row_captions or [])]
    caption_h = [len(captions[r]) * line_h + pad if r < len(captions) else 0 for r in range(len(rows))]
    height = pad + header_h + sum(row_h[r] + pad + caption_h[r] for r in range(len(rows)))

    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(label_lines):
        for k, line in enumerate(lines):
            x = pad + c * (col_w + pad) + (col_w - font.getlength(line)) / 2
            draw.text((x, pad + k * line_h), line, fill=_INK, font=font)
    cells, top = [], pad + header_h
    for r, row in enumerate(rows):
        boxes = []
        for c, img in enumerate(row):
            left = pad + c * (col_w + pad) + (col_w - img.shape[2]) // 2
            grid.paste(to_pil(img), (left, top))
            boxes.append((left, top, int(img.shape[2]), int(img.shape[1])))
        cells.append(boxes)
        for k, line in enumerate(captions[r] if r < len(captions) else []):
            draw.text((pad, top + row_h[r] + pad + k * line_h), line, fill=_CAPTION_INK, font=font)
        top += row_h[r] + pad + caption_h[r]
    layout = GridLayout((width, height), cells, labels, list(row_captions or []))
    png_info = PngInfo()
    png_info.add_text(GRID_INFO_KEY, json.dumps({**asdict(layout), **(info or {})}))
    tmp = path.with_name(path.name + ".tmp")
    grid.save(tmp, format="PNG", pnginfo=png_info)
    tmp.replace(path)
    return layout


def grid_cell(path: str | Path, row: int, column: int) -> Image.Image:
    """One cell of a grid written by :func:`save_grid`, cut out by the layout stored in the PNG."""
    with Image.open(path) as grid:
        left, top, w, h = json.loads(grid.text[GRID_INFO_KEY])["cells"][row][column]
        return grid.convert("RGB").crop((left, top, left + w, top + h))

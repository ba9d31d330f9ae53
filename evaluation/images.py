"""Pixel conversion and PNG grids.

``to_uint8`` is the one place where model outputs in [-1, 1] become 8-bit pixels: round(127.5 (x + 1)), clipped.
(The D²-DPM/PTQD evaluation scripts converted twice; every path here goes through this function once.)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from ldm.fileio import write_atomic, write_numbered


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C] (C = 3; a 1-channel image is repeated to RGB)."""
    if x.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    pixels = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def make_grid(images: np.ndarray, nrow: int, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """uint8 [N, H, W, C] -> one [rows·(H+p)+p, nrow·(W+p)+p, C] image, filled row by row."""
    n, h, w, c = images.shape
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    rows = -(-n // nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, dtype=np.uint8)
    for k in range(n):
        r, col = divmod(k, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = images[k]
    return grid


def save_png(image: np.ndarray, path: str | os.PathLike, text: dict[str, str] | None = None) -> Path:
    """Write a uint8 [H, W, C] image atomically (temporary file, then rename); ``text`` goes in PNG tEXt chunks."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, _png_writer(image, text))


def save_png_numbered(image: np.ndarray, folder: str | os.PathLike, name: Callable[[int], str], start: int = 0,
                      text: dict[str, str] | None = None) -> Path:
    """Write a PNG under the first free ``name(i)``, i >= ``start``, never over an existing file (concurrent runs
    in one folder each get their own numbers: ``ldm.fileio.write_numbered``); returns its path."""
    return write_numbered(folder, name, _png_writer(image, text), start)


def _png_writer(image: np.ndarray, text: dict[str, str] | None) -> Callable[[Path], None]:
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    return lambda tmp: Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)


def labelled_rows(grid: np.ndarray, names: list[str], row_height: int, padding: int = 2) -> np.ndarray:
    """Prefix a grid with a white column naming each row."""
    from PIL import ImageDraw, ImageFont
    width = 8 + 7 * max(len(n) for n in names)
    img = Image.new("RGB", (width + grid.shape[1], grid.shape[0]), "white")
    img.paste(Image.fromarray(grid), (width, 0))
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    for r, name in enumerate(names):
        draw.text((4, padding + r * (row_height + padding) + row_height // 2 - 6), name, fill="black", font=font)
    return np.asarray(img)

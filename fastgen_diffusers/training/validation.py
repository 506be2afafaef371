"""Validation images written during training, as one grid image."""

from __future__ import annotations

import math
import os
from pathlib import Path

from diffusers.utils import make_image_grid
from PIL import Image


def save_image_grid(images: list[Image.Image], path: str | Path, columns: int | None = None, upscale: int = 4) -> Path:
    """Write `images` row by row (`columns` a row, default about square; empty cells black), enlarged `upscale`
    times (nearest-neighbour), atomically to `path`."""
    if not images:
        raise ValueError("`images` must not be empty.")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    blank = Image.new("RGB", images[0].size)
    grid = make_image_grid(images + [blank] * (rows * columns - len(images)), rows=rows, cols=columns)
    grid = grid.resize((grid.width * upscale, grid.height * upscale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    grid.save(partial, format="PNG")
    os.replace(partial, path)
    return path

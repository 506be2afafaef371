"""Validation images written during training."""

from __future__ import annotations

import math
import os
from pathlib import Path

from PIL import Image


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile equally sized images into one grid image, row by row."""
    if not images:
        raise ValueError("`images` must not be empty.")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def save_image_grid(images: list[Image.Image], path: str | Path, columns: int | None = None, upscale: int = 4) -> Path:
    """Write the grid (enlarged `upscale` times, nearest-neighbour) atomically to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(images, columns)
    grid = grid.resize((grid.width * upscale, grid.height * upscale), Image.Resampling.NEAREST)
    partial = path.with_name(path.name + ".partial")
    grid.save(partial, format="PNG")
    os.replace(partial, path)
    return path

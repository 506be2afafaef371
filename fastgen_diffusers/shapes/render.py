"""Drawing ShapesWorld images: deterministic from (attributes, seed), anti-aliased by supersampling."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .captions import ATTRIBUTE_NAMES, ATTRIBUTE_VALUES, BACKGROUNDS, COLOURS, POSITIONS, Attributes, parse_caption


IMAGE_SIZE = 32
SUPERSAMPLING = 8
# Centre of each grid column/row in pixels, and half-extent of each size: a large shape at a corner still fits.
GRID_CENTRES = (7.0, 16.0, 25.0)
HALF_EXTENTS = {"small": 3.5, "large": 6.0}
POSITION_JITTER = 1.0
COLOUR_JITTER = 12
BACKGROUND_JITTER = 6


def complete_attributes(attributes: Attributes, rng: np.random.Generator) -> Attributes:
    """Fill the attributes a partial caption leaves out with uniform random draws from `rng`."""
    values = attributes.to_dict()
    for name in ATTRIBUTE_NAMES:
        if values[name] is None:
            choices = ATTRIBUTE_VALUES[name]
            values[name] = choices[rng.integers(len(choices))]
    return Attributes(**values)


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "cross":
        w = 0.36 * r
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    return None  # circle is drawn as an ellipse


def render_attributes(attributes: Attributes, seed: int) -> Image.Image:
    """Draw the 32x32 image of complete `attributes`; `seed` sets the small jitters."""
    if not attributes.is_complete():
        raise ValueError(f"`attributes` must name every attribute to be drawn, got {attributes}.")
    rng = np.random.default_rng(seed)
    grey = int(np.clip(BACKGROUNDS[attributes.background] + rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1), 0, 255))
    colour = np.clip(np.array(COLOURS[attributes.colour]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255)
    column, row = POSITIONS[attributes.position]
    cx = GRID_CENTRES[column] + rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    cy = GRID_CENTRES[row] + rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    r = HALF_EXTENTS[attributes.size] * rng.uniform(0.95, 1.05)

    s = SUPERSAMPLING
    canvas = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), (grey, grey, grey))
    draw = ImageDraw.Draw(canvas)
    fill = tuple(int(c) for c in colour)
    polygon = _shape_polygon(attributes.shape, cx, cy, r)
    if polygon is None:
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=fill)
    else:
        draw.polygon([(x * s, y * s) for x, y in polygon], fill=fill)
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def render(caption: str, seed: int) -> Image.Image:
    """Draw the image for `caption`; attributes a partial caption leaves out are drawn at random from `seed`."""
    attributes = parse_caption(caption)
    attributes = complete_attributes(attributes, np.random.default_rng([seed, 1]))
    return render_attributes(attributes, seed)

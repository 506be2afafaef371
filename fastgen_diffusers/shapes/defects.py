"""Synthetic images that hold no single clean shape: what the judge must reject.

Each kind imitates a failure seen in one-step students on open prompts, built from real drawings so that
its colours and sizes are those of the world:

- "blend": the pixel mean of two drawings of one prompt with other colours and shapes (an L2 student's average);
- "two shapes": two drawings of different cells on one background;
- "two colours": one drawing whose left and right halves have different palette colours;
- "speckle": a drawing with strong per-pixel colour noise;
- "smooth blob": a soft Gaussian blob whose colour varies across it, on a grey background.
"""

from __future__ import annotations

import numpy as np

from .captions import ATTRIBUTE_NAMES, ATTRIBUTE_VALUES, BACKGROUNDS, COLOURS, POSITIONS, Attributes
from .render import GRID_CENTRES, render_attributes


DEFECT_KINDS = ("blend", "two shapes", "two colours", "speckle", "smooth blob")


def _random_attributes(rng: np.random.Generator, **fixed: str) -> Attributes:
    values = {n: ATTRIBUTE_VALUES[n][rng.integers(len(ATTRIBUTE_VALUES[n]))] for n in ATTRIBUTE_NAMES}
    return Attributes(**{**values, **fixed})


def _other(rng: np.random.Generator, name: str, value: str) -> str:
    choices = [v for v in ATTRIBUTE_VALUES[name] if v != value]
    return choices[rng.integers(len(choices))]


def _draw(attributes: Attributes, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(render_attributes(attributes, int(rng.integers(2**31)))).astype(np.float64)


def defect_image(kind: str, rng: np.random.Generator) -> np.ndarray:
    """One (32, 32, 3) uint8 image of defect `kind`, drawn from `rng`."""
    a = _random_attributes(rng)
    if kind == "blend":
        b = Attributes(**{**a.to_dict(), "colour": _other(rng, "colour", a.colour), "shape": _other(rng, "shape", a.shape)})
        image = (_draw(a, rng) + _draw(b, rng)) / 2
    elif kind == "two shapes":
        b = Attributes(**{**a.to_dict(), "position": _other(rng, "position", a.position)})
        first, second = _draw(a, rng), _draw(b, rng)
        # Paste the second drawing's shape (where it differs from its own background) onto the first.
        second_shape = np.abs(second - np.median(second.reshape(-1, 3), axis=0)).max(-1, keepdims=True) > 20
        image = np.where(second_shape, second, first)
    elif kind == "two colours":
        b = Attributes(**{**a.to_dict(), "colour": _other(rng, "colour", a.colour)})
        # Same seed, so the same geometry in the other colour; split near the shape's centre column.
        seed = int(rng.integers(2**31))
        left, right = (np.asarray(render_attributes(x, seed)).astype(np.float64) for x in (a, b))
        column = int(round(GRID_CENTRES[POSITIONS[a.position][0]] + rng.uniform(-1.5, 1.5)))
        image = np.concatenate([left[:, :column], right[:, column:]], axis=1)
    elif kind == "speckle":
        image = _draw(a, rng) + rng.normal(0.0, 40.0, size=(32, 32, 3))
    elif kind == "smooth blob":
        grey = BACKGROUNDS[a.background]
        y, x = np.mgrid[0:32, 0:32].astype(np.float64)
        cx, cy, width = rng.uniform(8, 24), rng.uniform(8, 24), rng.uniform(3, 7)
        weight = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * width**2))[..., None]
        colours = np.array(list(COLOURS.values()), dtype=np.float64)
        first, second = colours[rng.choice(len(colours), size=2, replace=False)]
        mix = ((x - cx) / 32 + 0.5)[..., None]
        fill = (1 - mix) * first + mix * second
        image = (1 - weight) * grey + weight * fill
    else:
        raise ValueError(f"`kind` must be one of {list(DEFECT_KINDS)}, got {kind!r}.")
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def defect_images(num_per_kind: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`num_per_kind` images of every defect kind, (N, 32, 32, 3) uint8 each, fixed by `seed`."""
    rng = np.random.default_rng([seed, 7])
    return {kind: np.stack([defect_image(kind, rng) for _ in range(num_per_kind)]) for kind in DEFECT_KINDS}

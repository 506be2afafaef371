"""The ShapesWorld vocabulary and caption grammar.

Every image has five attributes. A full caption names all of them in a fixed order::

    a {size} {colour} {shape} at the {position} on a {background} background

A partial caption keeps the same order and drops some phrases ("a red circle",
"a large square on a white background"). `parse_caption` inverts both.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields


SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "cyan": (30, 210, 220),
    "magenta": (220, 40, 200),
    "orange": (250, 140, 20),
    "purple": (120, 40, 170),
}
SIZES = ("small", "large")
# Grid cell (column, row) of each position word; the shape's centre sits in that cell.
POSITIONS = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
BACKGROUNDS = {"black": 0, "dark gray": 64, "gray": 128, "light gray": 192, "white": 255}

ATTRIBUTE_NAMES = ("size", "colour", "shape", "position", "background")
ATTRIBUTE_VALUES = {
    "size": SIZES,
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}

# (colour, shape) pairs never shown in training, to test composition.
HELD_OUT_PAIRS = (("red", "triangle"), ("green", "cross"), ("blue", "circle"), ("yellow", "square"))


@dataclass(frozen=True)
class Attributes:
    """Attributes of one image or prompt; `None` means the caption leaves it out."""

    size: str | None = None
    colour: str | None = None
    shape: str | None = None
    position: str | None = None
    background: str | None = None

    def __post_init__(self):
        for name in ATTRIBUTE_NAMES:
            value = getattr(self, name)
            if value is not None and value not in ATTRIBUTE_VALUES[name]:
                raise ValueError(f"`{name}` must be one of {list(ATTRIBUTE_VALUES[name])}, got {value!r}.")

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)

    def is_complete(self) -> bool:
        return all(getattr(self, f.name) is not None for f in fields(self))

    def is_held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT_PAIRS


def make_caption(attributes: Attributes) -> str:
    """Write the caption for `attributes`, leaving out the phrases of missing attributes."""
    a = attributes
    words = ["a"] + [w for w in (a.size, a.colour, a.shape) if w is not None]
    if a.position is not None:
        words.append(f"at the {a.position}")
    if a.background is not None:
        words.append(f"on a {a.background} background")
    if len(words) == 1:
        return ""
    return " ".join(words)


def _alternatives(values) -> str:
    # Longest first so "top left" wins over "top" and "dark gray" over "gray".
    return "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))


_CAPTION_PATTERN = re.compile(
    r"^a"
    rf"(?: (?P<size>{_alternatives(SIZES)}))?"
    rf"(?: (?P<colour>{_alternatives(COLOURS)}))?"
    rf"(?: (?P<shape>{_alternatives(SHAPES)}))?"
    rf"(?: at the (?P<position>{_alternatives(POSITIONS)}))?"
    rf"(?: on a (?P<background>{_alternatives(BACKGROUNDS)}) background)?$"
)


def parse_caption(caption: str) -> Attributes:
    """Read the attributes a (full or partial) ShapesWorld caption names.

    The empty caption names nothing. Anything outside the grammar raises `ValueError`.
    """
    text = " ".join(caption.strip().lower().split())
    if text == "":
        return Attributes()
    match = _CAPTION_PATTERN.match(text)
    if match is None or text == "a":
        raise ValueError(
            f"`caption` {caption!r} is not in the ShapesWorld grammar "
            "'a {size} {colour} {shape} at the {position} on a {background} background' "
            "(phrases may be left out, the rest kept in order)."
        )
    return Attributes(**match.groupdict())

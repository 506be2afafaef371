"""ShapesWorld: a text-to-image world with exact ground truth, small enough to train and judge on a CPU."""

from .captions import (
    ATTRIBUTE_NAMES,
    ATTRIBUTE_VALUES,
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    Attributes,
    make_caption,
    parse_caption,
)
from .dataset import EvalPrompt, build_dataset, evaluation_prompts
from .render import IMAGE_SIZE, render, render_attributes
